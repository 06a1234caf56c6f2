"""Distillation losses and the hook that schedules them."""
from typing import List

import torch
import torch.nn.functional as F
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel


def aligned_feature_l1(student: List[torch.Tensor], teacher: List[torch.Tensor], temperature):
    """MSAD feature distillation: sum over aligned levels of mean |student/T - teacher/T|."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student levels but {len(teacher)} teacher levels")
    total = 0.0
    for level, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(f"aligned level {level}: student features {tuple(s.shape)} vs "
                             f"teacher features {tuple(t.shape)}")
        total = total + F.l1_loss(s / temperature, t / temperature)
    return total


def warmup_factor(iteration, warmup_iters):
    """Linear ramp min(1, iteration / warmup_iters); 1 without warm-up."""
    return 1.0 if warmup_iters <= 0 else min(1.0, iteration / warmup_iters)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class DistillationWarmup(HookBase):
    """Sets the model's ``distill_warmup`` from the trainer's iteration before every step.

    Reading the trainer's iteration (not counting calls) makes the ramp resume where it was.
    """

    def __init__(self, warmup_iters):
        self.warmup_iters = warmup_iters

    def before_step(self):
        factor = warmup_factor(self.trainer.iter, self.warmup_iters)
        unwrap(self.trainer.model).distill_warmup = factor
        self.trainer.storage.put_scalar("distill_warmup", factor, smoothing_hint=False)
