"""HR/LR pre-processing and the level pairing LR P(l) <-> HR P(l + log2 factor).

Defined once here and used by the teacher, the single-scale FCOS (HR and LR baselines) and the
student.  Padding the normalised batch to a multiple of 256 makes the pairing exact: a level of
the 1/factor image has the same spatial size as the level log2(factor) steps coarser of the full
image, so both can be trained and compared on one grid in full-resolution pixel coordinates.
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList

RESAMPLE_MODES = ("nearest", "bilinear", "bicubic")


def level_shift(factor) -> int:
    shift = math.log2(factor) if factor >= 1 else -1.0
    if not shift.is_integer() or shift < 0:
        raise ValueError(f"MODEL.MSAD.LR_FACTOR must be a power of two >= 1, got {factor}")
    return int(shift)


def aligned_levels(levels: List[str], factor, available=None) -> List[str]:
    """Names of the 1/factor image's levels that align with full-resolution `levels`."""
    shift = level_shift(factor)
    out = [f"p{int(name[1:]) - shift}" for name in levels]
    if available is not None:
        missing = [name for name in out if name not in available]
        if missing:
            raise ValueError(
                f"levels {levels} at factor {factor} need backbone levels {out}, but the "
                f"backbone gives only {sorted(available)} (missing {missing}): add the matching "
                "res stage to MODEL.FPN.IN_FEATURES")
    return out


def check_alignment(size_divisibility, factor, strides: Dict[str, int], lr_levels: List[str]):
    """The padded size must keep every LR level an exact 1/stride of an exact 1/factor image."""
    need = factor * max(strides[name] for name in lr_levels)
    if size_divisibility % need:
        raise ValueError(f"MODEL.MSAD.SIZE_DIVISIBILITY={size_divisibility} must be a multiple "
                         f"of {need} (factor {factor} x coarsest LR stride) for exact alignment")


def normalize_and_pad(images: List[torch.Tensor], pixel_mean, pixel_std, size_divisibility):
    """Normalise each CHW image and batch them, padded with zeros to `size_divisibility`."""
    images = [(x - pixel_mean) / pixel_std for x in images]
    return ImageList.from_tensors(images, size_divisibility)


def downsample(x: torch.Tensor, factor, mode="nearest") -> torch.Tensor:
    """The 1/factor copy of a padded NCHW batch, exactly (H/factor, W/factor) in size."""
    if factor == 1:
        return x
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"MODEL.MSAD.LR_RESAMPLE must be one of {RESAMPLE_MODES}, got {mode!r}")
    size = (x.shape[-2] // factor, x.shape[-1] // factor)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
