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
from detectron2.structures import ImageList

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


