"""The 1/factor copy of an image batch, in eager PyTorch and in an ONNX graph.

Eager PyTorch resizes with ``F.interpolate`` (antialiased for the bilinear and bicubic modes).
torch.onnx's TorchScript-based exporter writes neither the antialiased resize nor an area resize
of a size known only at run time, so while exporting the same filters run as fixed strided
convolutions: the exported graph gives the thumbnail eager PyTorch gives.
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..config import check_choice

RESAMPLE_MODES = ("nearest", "area", "bilinear", "bicubic")


def check_resample(mode, key="MODEL.FCOS.INPUT_RESAMPLE"):
    check_choice(key, mode, RESAMPLE_MODES)


def downsample(x: torch.Tensor, factor, mode="nearest", size=None) -> torch.Tensor:
    """The 1/factor copy of a padded NCHW batch, exactly (H/factor, W/factor) in size (or `size`,
    for a batch that the factor does not divide: eager PyTorch only)."""
    if factor == 1:
        return x
    check_resample(mode)
    size = size or (x.shape[-2] // factor, x.shape[-1] // factor)
    if torch.onnx.is_in_onnx_export() and mode != "nearest":
        # torch.onnx's TorchScript-based exporter writes neither the antialiased resize nor an
        # area resize of a size known only at run time: the same filters as fixed convolutions.
        if mode == "area":  # the mean of each factor x factor block
            return F.avg_pool2d(x, factor)
        return resize_by_convolution(x, factor, mode)
    if mode in ("nearest", "area"):  # area: the mean of each factor x factor block
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _cubic(x, a=-0.5):
    """The bicubic filter antialiased resizing uses (a = -0.5, as Pillow's)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


# The filters of F.interpolate(..., antialias=True) and their support, in output pixels.
ANTIALIAS_FILTERS = {"bilinear": (lambda x: max(0.0, 1 - abs(x)), 1), "bicubic": (_cubic, 2)}


def antialias_taps(factor: int, mode: str) -> Tuple[List[float], int]:
    """The unnormalised weights F.interpolate(antialias=True) gives the input pixels around one
    output pixel when shrinking by the integer `factor`, and how many lie before its block.

    Output pixel j is centred on input coordinate factor * (j + 0.5); its filter, stretched by
    the factor, reaches inputs factor * j + o for the offsets o of the returned taps."""
    fn, support = ANTIALIAS_FILTERS[mode]
    first = math.floor(factor / 2 - support * factor + 0.5)
    last = math.floor(factor / 2 + support * factor + 0.5)  # exclusive
    return [fn((o - (factor - 1) / 2) / factor) for o in range(first, last)], -first


def resize_by_convolution(x: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """F.interpolate(x, scale 1/factor, mode, antialias=True) for sizes the factor divides, as
    two strided depthwise convolutions (exportable to ONNX): each axis is filtered with the
    zero-padded taps and divided by the same filter of ones, which is how the antialiased resize
    renormalises the weights that fall outside the image."""
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"resize_by_convolution: the factor {factor} does not divide the size "
                         f"{tuple(x.shape[-2:])}")
    taps, pad = antialias_taps(factor, mode)
    kernel = x.new_tensor(taps)
    n, c = x.shape[:2]
    x = x.flatten(0, 1)[:, None]  # every channel on its own: a one-channel filter serves all
    ones = torch.ones_like(x[:1])
    for shape, stride, padding in (((1, 1, 1, len(taps)), (1, factor), (0, pad)),
                                   ((1, 1, len(taps), 1), (factor, 1), (pad, 0))):
        weight = kernel.reshape(shape)
        x = (F.conv2d(x, weight, stride=stride, padding=padding)
             / F.conv2d(ones, weight, stride=stride, padding=padding))
        ones = ones[..., ::stride[0], ::stride[1]]
    return x.reshape(n, c, *x.shape[-2:])
