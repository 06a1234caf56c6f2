"""Input scales, the level pairing and the padding they need: defined once, used by every model.

A *branch* of a detector sees the padded image at 1/factor (1 = full resolution) and reads levels
of that input, named in the input's own terms (``p2`` of the half-size image is its stride-4
level).  Level P(l) of the 1/f input lies on the grid of the full image's P(l + log2 f), so
branches of different factors, and students and teachers, pair their levels by those
full-resolution names, and every head predicts in the full image's pixels.

The pairing is exact when the padded size is a multiple of every level's stride in full-image
pixels (factor x stride): then each level is exactly 1/stride of its input and aligned levels of
two branches have the same size.  ``required_divisibility`` is that multiple (128 for full-image
P3-P7, alone or with half-size P2-P6); a configured ``MODEL.FCOS.SIZE_DIVISIBILITY`` may only
raise it.
"""
import math
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList

RESAMPLE_MODES = ("nearest", "area", "bilinear", "bicubic")
# What a detector is given: the full-resolution image, or one already 1/INPUT_FACTOR of it.
INPUT_SCALES = ("full", "low")


def level_index(name: str, key="MODEL.FCOS.IN_FEATURES") -> int:
    if not (name[:1] == "p" and name[1:].isdigit()):
        raise ValueError(f"{key}: {name!r} is not an FPN level name like 'p3'")
    return int(name[1:])


def level_shift(factor, key="MODEL.FCOS.INPUT_FACTOR") -> int:
    """log2(factor): how many levels a 1/factor input's names sit below full resolution."""
    shift = math.log2(factor) if factor >= 1 else -1.0
    if not shift.is_integer() or shift < 0:
        raise ValueError(f"{key} must be a power of two >= 1, got {factor}")
    return int(shift)


def shift_levels(levels: Sequence[str], shift: int) -> List[str]:
    """Level names moved `shift` levels coarser (negative: finer)."""
    return [f"p{level_index(name) + shift}" for name in levels]


class Branch(NamedTuple):
    """One input of a detector: the padded image at 1/factor, and the levels read from it."""

    factor: int
    levels: Tuple[str, ...]  # in the input's own terms

    @property
    def full_resolution_levels(self) -> List[str]:
        """The levels' names on the full image's grid: P(l + log2 factor)."""
        return shift_levels(self.levels, level_shift(self.factor))

    def strides(self, strides: Dict[str, int]) -> List[int]:
        """The levels' strides in full-image pixels."""
        return [strides[name] * self.factor for name in self.levels]


def check_levels(branch: Branch, available, key="MODEL.FCOS.IN_FEATURES"):
    """Raise, naming the config keys, if the backbone does not give a level the branch reads."""
    missing = [name for name in branch.levels if name not in available]
    if missing:
        raise ValueError(
            f"{key}: the 1/{branch.factor} input's levels {list(branch.levels)} need backbone "
            f"levels {missing} that it does not give (it gives {sorted(available)}): add the "
            "matching res stage to MODEL.FPN.IN_FEATURES or set MODEL.FPN.NUM_TOP_LEVELS")


def required_divisibility(branches: Sequence[Branch], strides: Dict[str, int]) -> int:
    """The padding multiple that keeps every branch's levels exact and aligned: the coarsest
    stride in full-image pixels of any level any branch reads."""
    return max(max(b.strides(strides)) for b in branches)


def padding_multiple(configured: int, branches: Sequence[Branch], strides: Dict[str, int]):
    """The padding multiple of a model: `configured` (0 = what its levels need), checked."""
    need = required_divisibility(branches, strides)
    if configured == 0:
        return need
    if configured < 0 or configured % need:
        branch = max(branches, key=lambda b: max(b.strides(strides)))
        level = max(branch.levels, key=lambda name: strides[name])
        raise ValueError(
            f"MODEL.FCOS.SIZE_DIVISIBILITY={configured} must be a multiple of {need} (factor "
            f"{branch.factor} x stride {strides[level]} of {level}, the coarsest level read) for "
            "exact alignment; 0 pads to exactly that")
    return configured


def padded_size(image_size, divisibility) -> Tuple[int, int]:
    return tuple(math.ceil(s / divisibility) * divisibility for s in image_size)


def normalize_and_pad(images: List[torch.Tensor], pixel_mean, pixel_std, size_divisibility):
    """Normalise each CHW image and batch them, padded with zeros to `size_divisibility`."""
    images = [(x - pixel_mean) / pixel_std for x in images]
    return ImageList.from_tensors(images, size_divisibility)


def check_resample(mode, key="MODEL.FCOS.INPUT_RESAMPLE"):
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"{key} must be one of {RESAMPLE_MODES}, got {mode!r}")


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
