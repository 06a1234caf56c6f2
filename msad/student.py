"""``MSADStudent``: an FCOS on the LR image, distilled from a frozen multi-scale teacher.

The student is exactly the low-resolution single-scale FCOS (LR levels P2-P6 of the 1/f copy,
trained against the HR ground truth at HR strides).  In training it also pulls its FPN levels
towards the teacher's fused features at the aligned levels.  The teacher is held outside the
module tree (see ``attach_teacher``): it is not in the student's state_dict, optimizer or DDP
wrapper, and inference never touches it.
"""
import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from .distill import aligned_feature_l1
from .fcos import SingleScaleFCOS

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class MSADStudent(SingleScaleFCOS):
    @configurable
    def __init__(self, *, kd_alpha: float, kd_temperature: float, **kwargs):
        super().__init__(**kwargs)
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.distill_warmup = 1.0  # set before each step by distill.DistillationWarmup
        self.__dict__["_teacher"] = None  # bypasses nn.Module registration on purpose

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.FCOS.INPUT_RESOLUTION != "LR":
            raise ValueError("MSADStudent sees the low-resolution image: set "
                             "MODEL.FCOS.INPUT_RESOLUTION to 'LR', not "
                             f"{cfg.MODEL.FCOS.INPUT_RESOLUTION!r}")
        return dict(kd_alpha=cfg.MODEL.MSAD.KD_ALPHA, kd_temperature=cfg.MODEL.MSAD.KD_TEMPERATURE,
                    **super().from_config(cfg))

    @property
    def teacher(self):
        return self._teacher

    def attach_teacher(self, teacher):
        """Hold a frozen teacher for training; it stays in eval mode and gets no gradient."""
        if teacher is self or not hasattr(teacher, "multiscale_features"):
            raise TypeError(f"the teacher must be a separate MultiScaleTeacher, got "
                            f"{type(teacher).__name__}")
        if list(teacher.in_features) != list(self.in_features):
            raise ValueError(f"teacher MODEL.FCOS.IN_FEATURES {teacher.in_features} differ from "
                             f"the student's {self.in_features}: the levels cannot be aligned")
        t_channels = teacher.backbone.output_shape()[teacher.levels[1][0]].channels
        s_channels = self.backbone.output_shape()[self.levels[self.input_factor][0]].channels
        if t_channels != s_channels:
            raise ValueError(f"teacher FPN has {t_channels} channels, the student's "
                             f"{s_channels} (MODEL.FPN.OUT_CHANNELS must match)")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.__dict__["_teacher"] = teacher

    def init_from_teacher(self):
        """Copy the teacher's backbone and head into the student (same names and shapes)."""
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

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)  # the student alone, on the LR image
        images = self.preprocess_image(batched_inputs)
        features = self.branch_features(images.tensor, self.input_factor)
        losses = self.forward_training(images, features, self.head(features),
                                       self.gt_instances(batched_inputs))
        if self.teacher is None:
            raise RuntimeError("MSADStudent needs a teacher to train: train_net_S.py attaches "
                               "the one named by MODEL.MSAD.TEACHER.CONFIG_FILE / WEIGHTS")
        with torch.no_grad():
            self.teacher.eval()  # whatever train() calls happened since
            _, _, fused = self.teacher.multiscale_features(
                self.teacher.preprocess_image(batched_inputs).tensor)
        t = self.kd_temperature
        losses["loss_distill"] = (self.kd_alpha * t * t * self.distill_warmup
                                  * aligned_feature_l1(features, fused, t))
        return losses
