"""Students and how they hold their frozen teacher.

``MSADStudent`` is an FCOS on the LR image, distilled from a frozen multi-scale teacher: exactly
the low-resolution single-scale FCOS (LR levels P2-P6 of the 1/f copy, trained against the HR
ground truth at HR strides) plus an L1 pull of its FPN levels towards the teacher's fused
features at the aligned levels (all five; a lighter student on LR P3-P7 shares four).
``FrozenTeacherMixin`` (shared with ThumbDet) keeps the teacher outside the module tree: it is
not in the student's state_dict, optimizer or DDP wrapper, it stays in eval mode, and inference
never touches it.
"""
import logging
from functools import partial

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from .distill import IterationSchedule, aligned_feature_l1, freeze, warmup_factor
from .fcos import SingleScaleFCOS

logger = logging.getLogger(__name__)


class FrozenTeacherMixin:
    """A teacher held for training only; subclasses say what makes one compatible."""

    requires_teacher = True  # training without a teacher is an error

    @property
    def teacher(self):
        return self.__dict__.get("_teacher")

    def teacher_pairs(self, teacher):
        """(student index, teacher index) of the levels on the same full-resolution grid."""
        return [(i, list(teacher.in_features).index(name))
                for i, name in enumerate(self.in_features) if name in teacher.in_features]

    def check_teacher(self, teacher):
        """Raise if `teacher` cannot teach this student: no aligned level, other channels."""
        if not self.teacher_pairs(teacher):
            raise ValueError(
                "no level of the student aligns with a teacher level: the student's levels sit on "
                f"full-resolution levels {self.in_features}, the teacher's MODEL.FCOS.IN_FEATURES "
                f"are {list(teacher.in_features)}")
        t_channels = teacher.backbone.output_shape()[teacher.levels[min(teacher.levels)][0]].channels
        s_channels = self.backbone.output_shape()[self.levels[min(self.levels)][0]].channels
        if t_channels != s_channels:
            raise ValueError(f"teacher FPN has {t_channels} channels, the student's "
                             f"{s_channels} (MODEL.FPN.OUT_CHANNELS must match)")

    def attach_teacher(self, teacher):
        """Hold a frozen teacher for training; it stays in eval mode and gets no gradient."""
        if teacher is self or not hasattr(teacher, "distillation_features"):
            raise TypeError("the teacher must be a separate msad detector, got "
                            f"{type(teacher).__name__}")
        self.check_teacher(teacher)
        self.__dict__["_teacher"] = freeze(teacher)  # bypasses nn.Module registration on purpose

    def teacher_outputs(self, batched_inputs, with_head=False):
        """The teacher's distillation features (and head outputs), without gradients."""
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__} needs a teacher to train: train_net_S.py "
                               "attaches the one named by MODEL.MSAD.TEACHER.CONFIG_FILE/WEIGHTS")
        with torch.no_grad():
            self.teacher.eval()  # whatever train() calls happened since
            padded = self.teacher.preprocess_image(batched_inputs).tensor
            features = self.teacher.distillation_features(padded)
            return features, self.teacher.head(features) if with_head else None

    def init_from_teacher(self):
        """Copy the teacher's tensors whose names the student shares (backbone, head)."""
        own = self.state_dict()
        taken = {k: v for k, v in self.teacher.state_dict().items() if k in own}
        mismatched = [f"{k}: teacher {tuple(v.shape)}, student {tuple(own[k].shape)}"
                      for k, v in taken.items() if v.shape != own[k].shape]
        if mismatched or not taken:
            raise ValueError("MODEL.MSAD.STUDENT.INIT_FROM_TEACHER: the teacher's weights do not "
                             f"fit the student ({len(mismatched)} of another shape, e.g. "
                             f"{mismatched[:3]}); use the same MODEL.SLIMMABLE.WIDTH and "
                             "MODEL.FPN.OUT_CHANNELS, or set INIT_FROM_TEACHER False")
        self.load_state_dict(taken, strict=False)
        logger.info("Student initialised from the teacher: %d of %d tensors", len(taken), len(own))


@META_ARCH_REGISTRY.register()
class MSADStudent(FrozenTeacherMixin, SingleScaleFCOS):
    @configurable
    def __init__(self, *, kd_alpha: float, kd_temperature: float, kd_warmup_iters: int,
                 **kwargs):
        super().__init__(**kwargs)
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.kd_warmup_iters = kd_warmup_iters
        self.distill_warmup = 1.0  # set before each step by the hook of training_hooks()

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.FCOS.INPUT_RESOLUTION != "LR":
            raise ValueError("MSADStudent sees the low-resolution image: set "
                             "MODEL.FCOS.INPUT_RESOLUTION to 'LR', not "
                             f"{cfg.MODEL.FCOS.INPUT_RESOLUTION!r}")
        return dict(kd_alpha=cfg.MODEL.MSAD.KD_ALPHA, kd_temperature=cfg.MODEL.MSAD.KD_TEMPERATURE,
                    kd_warmup_iters=cfg.MODEL.MSAD.KD_WARMUP_ITERS, **super().from_config(cfg))

    def training_hooks(self):
        return [IterationSchedule("distill_warmup",
                                  partial(warmup_factor, warmup_iters=self.kd_warmup_iters))]

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)  # the student alone, on the LR image
        images = self.preprocess_image(batched_inputs)
        features = self.branch_features(images.tensor, self.input_factor)
        losses = self.forward_training(images, features, self.head(features),
                                       self.gt_instances(batched_inputs))
        if self.kd_alpha == 0:  # the ablation without distillation: no teacher pass needed
            return losses
        teacher_features, _ = self.teacher_outputs(batched_inputs)
        pairs = self.teacher_pairs(self.teacher)
        t = self.kd_temperature
        losses["loss_distill"] = self.kd_alpha * t * t * self.distill_warmup * aligned_feature_l1(
            [features[i] for i, _ in pairs], [teacher_features[j] for _, j in pairs], t)
        return losses
