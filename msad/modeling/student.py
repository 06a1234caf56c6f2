"""``MSADStudent``: the low-resolution FCOS, distilled from a frozen multi-scale teacher.

Exactly the single-scale FCOS on the 1/f image (``MODEL.FCOS.INPUT_FACTOR`` 2, its levels P2-P6
on the full image's P3-P7 grid, trained against the HR ground truth at HR strides) plus an L1
pull of its FPN levels towards the teacher's fused features at the aligned levels (all five; a
lighter student on the half-size image's P3-P7 shares four).
"""
from functools import partial

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage

from .distill import DistilledDetector, aligned_feature_l1, check_kd_normalize, warmup_factor
from .fcos import SingleScaleFCOS


@META_ARCH_REGISTRY.register()
class MSADStudent(DistilledDetector, SingleScaleFCOS):
    """Args:
        kd_alpha, kd_temperature: the distillation loss is kd_alpha x T^2 x warm-up x the sum
            over aligned levels of mean |student / T - teacher / T|; kd_alpha 0 trains without
            the teacher's features (the ablation).
        kd_warmup_iters: the warm-up ramps from 0 to 1 over this many iterations.
        kd_normalize: "none", or "channel": both feature maps standardised per channel first.
        kd_levels: the shared levels to distill, full-resolution names; empty: all of them.
        grad_share_period: every this many iterations (0: never), log the distillation and
            detection gradients' norms at the FPN outputs and the distillation's share.
        **kwargs: ``AlignedFCOS``'s.
    """

    @configurable
    def __init__(self, *, kd_alpha: float, kd_temperature: float, kd_warmup_iters: int,
                 kd_normalize="none", kd_levels=(), grad_share_period=20, **kwargs):
        super().__init__(**kwargs)
        check_kd_normalize(kd_normalize)
        if grad_share_period < 0:
            raise ValueError(f"MODEL.MSAD.GRAD_SHARE_PERIOD must be 0 (never) or more, got "
                             f"{grad_share_period}")
        unknown = sorted(set(kd_levels) - set(self.full_resolution_levels))
        if unknown:
            raise ValueError(f"MODEL.MSAD.KD_LEVELS names {unknown}, which the student does not "
                             f"have: its levels are {list(self.full_resolution_levels)} on the "
                             "full-resolution grid")
        self.kd_levels = tuple(kd_levels)
        self.kd_alpha = kd_alpha
        self.kd_temperature = kd_temperature
        self.kd_warmup_iters = kd_warmup_iters
        self.kd_normalize = kd_normalize
        self.grad_share_period = grad_share_period
        self.distill_warmup = 1.0  # set before each step, see iteration_schedules()

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.FCOS.INPUT_FACTOR == 1:
            raise ValueError("MSADStudent sees a low-resolution image: set MODEL.FCOS.INPUT_FACTOR "
                             "to 2 or more, not 1")
        return dict(kd_alpha=cfg.MODEL.MSAD.KD_ALPHA, kd_temperature=cfg.MODEL.MSAD.KD_TEMPERATURE,
                    kd_warmup_iters=cfg.MODEL.MSAD.KD_WARMUP_ITERS,
                    kd_normalize=cfg.MODEL.MSAD.KD_NORMALIZE, kd_levels=cfg.MODEL.MSAD.KD_LEVELS,
                    grad_share_period=cfg.MODEL.MSAD.GRAD_SHARE_PERIOD, **super().from_config(cfg))

    def iteration_schedules(self):
        return {"distill_warmup": partial(warmup_factor, warmup_iters=self.kd_warmup_iters)}

    def extra_losses(self, batched_inputs, images, features, predictions):
        if self.kd_alpha == 0:  # the ablation without distillation: no teacher pass needed
            return {}
        teacher_features, _ = self.teacher_outputs(batched_inputs)
        pairs = self.distilled_pairs(self.teacher)
        t = self.kd_temperature
        mine = features.head_in
        return {"loss_distill": self.kd_alpha * t * t * self.distill_warmup * aligned_feature_l1(
            [mine[i] for i, _ in pairs], [teacher_features[j] for _, j in pairs], t,
            self.kd_normalize)}

    def distilled_pairs(self, teacher):
        """The aligned (student, teacher) level indices that the loss pulls together."""
        pairs = self.teacher_pairs(teacher)
        if not self.kd_levels:
            return pairs
        return [(i, j) for i, j in pairs if self.full_resolution_levels[i] in self.kd_levels]

    def check_teacher(self, teacher):
        super().check_teacher(teacher)
        if not self.distilled_pairs(teacher):
            raise ValueError(f"MODEL.MSAD.KD_LEVELS {list(self.kd_levels)}: none of them is "
                             "shared with the teacher, whose levels are "
                             f"{list(teacher.full_resolution_levels)}")

    def record_diagnostics(self, features, losses):
        """How much of the gradient reaching the FPN outputs is the distillation's."""
        storage = get_event_storage()
        # On the iterations that end a period, as Detectron2's metrics writer counts them: a
        # value put on another one would be written later as a row of an earlier iteration.
        if not (self.grad_share_period and "loss_distill" in losses
                and (storage.iter + 1) % self.grad_share_period == 0):
            return
        levels = features.head_in
        detection = sum(v for k, v in losses.items() if k != "loss_distill")
        norms = {}
        for name, loss in (("distill", losses["loss_distill"]), ("detection", detection)):
            grads = torch.autograd.grad(loss, levels, retain_graph=True, allow_unused=True)
            norms[name] = torch.sqrt(sum((g * g).sum() for g in grads if g is not None)).item()
            storage.put_scalar(f"grad_norm/{name}", norms[name], smoothing_hint=False)
        total = norms["distill"] + norms["detection"]
        storage.put_scalar("grad_share/distill", norms["distill"] / total if total else 0.0,
                           smoothing_hint=False)
