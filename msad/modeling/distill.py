"""Distillation: the frozen-teacher holder every distilled detector declares, and its losses.

``DistilledDetector`` is how a meta-architecture says "I am distilled from a teacher": the
trainer of train_net_S.py (``msad.engine.defaults.DistillationTrainer``) builds the teacher named by
``MODEL.TEACHER`` for it, and train_net_T.py refuses it.  The teacher is kept outside the module
tree: it is not in the student's state_dict, optimizer or DDP wrapper, it stays in eval mode, and
inference never touches it.
"""
import logging
import math
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice
from .fcos import AlignedFCOS

logger = logging.getLogger(__name__)


# How feature maps are prepared before the distillation L1 (MODEL.MSAD.KD_NORMALIZE).
KD_NORMALIZATIONS = ("none", "channel")
# The frozen teacher's BatchNorm while it teaches (MODEL.TEACHER.BN_MODE).
TEACHER_BN_MODES = ("eval", "train")


def check_kd_normalize(normalize):
    check_choice("MODEL.MSAD.KD_NORMALIZE", normalize, KD_NORMALIZATIONS)


def standardize_channels(x: torch.Tensor, eps=1e-5) -> torch.Tensor:
    """Each channel of (N, C, H, W) at zero mean and unit variance over the batch and locations."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def aligned_feature_l1(student: List[torch.Tensor], teacher: List[torch.Tensor], temperature,
                       normalize="none"):
    """MSAD feature distillation: sum over aligned levels of mean |student/T - teacher/T|,
    after standardising each level's channels with `normalize` "channel"."""
    check_kd_normalize(normalize)
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student levels but {len(teacher)} teacher levels")
    total = 0.0
    for level, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"aligned level {level}: student features {tuple(s.shape)} vs "
                             f"teacher features {tuple(t.shape)}")
        if normalize == "channel":
            s, t = standardize_channels(s), standardize_channels(t)
        total = total + F.l1_loss(s / temperature, t / temperature)
    return total


def warmup_factor(iteration, warmup_iters):
    """Linear ramp min(1, iteration / warmup_iters); 1 without warm-up."""
    return 1.0 if warmup_iters <= 0 else min(1.0, iteration / warmup_iters)


def batch_norms(model):
    """The BatchNorm layers of `model` that can use batch statistics."""
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]


def freeze(model):
    """Eval mode and no gradients: how every teacher is held."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class DistilledDetector:
    """Mixin, listed before the ``AlignedFCOS`` it extends: a detector distilled from a frozen
    teacher (any msad detector), held for training only.

    Subclasses say whether they can train without a teacher (``teacher_required``), what makes a
    teacher fit (``check_teacher``), and which attributes follow the trainer's iteration
    (``iteration_schedules``).
    """

    teacher_required = True  # training without a teacher is an error

    def iteration_schedules(self) -> Dict[str, Callable[[int], float]]:
        """{attribute: schedule}: the trainer sets ``self.<attribute> = schedule(iteration)``
        before every step (msad.engine.hooks.IterationSchedule), so a resumed run continues it."""
        return {}

    @property
    def teacher(self):
        return self.__dict__.get("_teacher")

    def padding(self):
        # While distilling, the teacher runs on a batch padded like the student's, so that
        # aligned levels have the same size: pad to what both need.
        own = super().padding()
        if self.training and self.teacher is not None:
            return math.lcm(own, self.teacher.padding())
        return own

    def teacher_pairs(self, teacher):
        """(student index, teacher index) of the levels on the same full-resolution grid."""
        theirs = list(teacher.full_resolution_levels)
        return [(i, theirs.index(name)) for i, name in enumerate(self.full_resolution_levels)
                if name in theirs]

    def check_teacher(self, teacher):
        """Raise if `teacher` cannot teach this student: no aligned level, other channels."""
        if not self.teacher_pairs(teacher):
            raise ValueError(
                "no level of the student aligns with a teacher level: the student's levels sit on "
                f"full-resolution levels {self.full_resolution_levels}, the teacher's on "
                f"{teacher.full_resolution_levels} (MODEL.FCOS.IN_FEATURES at "
                "MODEL.FCOS.INPUT_FACTOR of each)")
        t_channels = teacher.backbone.output_shape()[teacher.branches[0].levels[0]].channels
        s_channels = self.backbone.output_shape()[self.branches[0].levels[0]].channels
        if t_channels != s_channels:
            raise ValueError(f"teacher FPN has {t_channels} channels, the student's "
                             f"{s_channels} (MODEL.FPN.OUT_CHANNELS must match)")

    def attach_teacher(self, teacher, bn_mode="eval"):
        """Hold a frozen teacher for training; it stays in eval mode (its BatchNorm layers in
        train mode with `bn_mode` "train") and gets no gradient."""
        if teacher is self or not isinstance(teacher, AlignedFCOS):
            raise TypeError("the teacher must be a separate msad detector, got "
                            f"{type(teacher).__name__}")
        check_choice("MODEL.TEACHER.BN_MODE", bn_mode, TEACHER_BN_MODES)
        if bn_mode == "train" and not batch_norms(teacher):
            raise ValueError("MODEL.TEACHER.BN_MODE 'train' needs BatchNorm layers in the "
                             "teacher; its norm layers are frozen or of another kind")
        if getattr(teacher, "test_branch", "fused") != "fused":
            raise ValueError("a teacher teaches from its fused features: its "
                             f"MODEL.MSAD.TEST_BRANCH must be 'fused', not {teacher.test_branch!r}")
        self.check_teacher(teacher)
        self.__dict__["_teacher"] = freeze(teacher)  # bypasses nn.Module registration on purpose
        self.__dict__["_teacher_bn_mode"] = bn_mode

    def teacher_outputs(self, batched_inputs, with_head=False):
        """The levels the teacher's head reads (and its outputs), without gradients, on a batch
        padded like the student's."""
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} needs a teacher to train: train_net_S.py "
                               "attaches the one named by MODEL.TEACHER.CONFIG_FILE/WEIGHTS")
        with torch.no_grad():
            self.teacher.eval()  # whatever train() calls happened since
            if self.__dict__.get("_teacher_bn_mode") == "train":
                # Batch statistics, as the official code's teacher; its running statistics move
                # (in each process, never saved), its weights do not.
                for module in batch_norms(self.teacher):
                    module.train()
            images = self.teacher.preprocess_image(batched_inputs, self.padding())
            features = self.teacher.extract(images).head_in
            return features, self.teacher.head(features) if with_head else None

    def init_from_teacher(self):
        """Copy the teacher's tensors whose names the student shares (backbone, head)."""
        own = self.state_dict()
        taken = {k: v for k, v in self.teacher.weights_for_student().items() if k in own}
        mismatched = [f"{k}: teacher {tuple(v.shape)}, student {tuple(own[k].shape)}"
                      for k, v in taken.items() if v.shape != own[k].shape]
        if mismatched or not taken:
            raise ValueError("MODEL.TEACHER.INIT_STUDENT: the teacher's weights do not fit the "
                             f"student ({len(mismatched)} of another shape, e.g. "
                             f"{mismatched[:3]}); use the same backbone (MODEL.BACKBONE.NAME, "
                             "MODEL.SLIMMABLE.WIDTH or MODEL.TORCHVISION.ARCH) and "
                             "MODEL.FPN.OUT_CHANNELS, or set INIT_STUDENT False")
        self.load_state_dict(taken, strict=False)
        logger.info("Student initialised from the teacher: %d of %d tensors", len(taken), len(own))
