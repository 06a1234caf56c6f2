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


def freeze(model):
    """Eval mode and no gradients: how every teacher is held."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class IterationSchedule(HookBase):
    """Sets ``model.<attribute> = schedule(trainer.iter)`` before every step, and logs it.

    Reading the trainer's iteration (not counting calls) makes a resumed run continue the
    schedule where it stopped: the distillation warm-up ramp, ThumbDet's training phase.
    """

    def __init__(self, attribute, schedule):
        self.attribute = attribute
        self.schedule = schedule

    def before_step(self):
        value = self.schedule(self.trainer.iter)
        setattr(unwrap(self.trainer.model), self.attribute, value)
        self.trainer.storage.put_scalar(self.attribute, value, smoothing_hint=False)
