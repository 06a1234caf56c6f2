"""``MultiScaleTeacher``: one FCOS that sees the HR image and its 1/f LR copy, fused per level.

The LR level P(l) has the size of the HR level P(l+1) (msad/modeling/alignment.py), so one backbone and
one head serve both, the LR branch is trained against the HR ground truth at the HR strides, and
each aligned pair is mixed by a crossing-level fusion.  Loss = HR + LR + JOINT_WEIGHT x fused;
inference predicts from the fused features.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from fvcore.nn import weight_init
from torch import nn

from ..config import check_choice
from .alignment import Branch, level_shift, shift_levels
from .distill import batch_norms
from .fcos import AlignedFCOS

# What the teacher's inference can predict from (MODEL.MSAD.TEST_BRANCH).
TEST_BRANCHES = ("fused", "hr", "lr")


class CrossLevelFusion(nn.Module):
    """SE-style mixing of an aligned HR/LR feature pair with two softmax weights per image.

    concat (2C) -> global average pool -> Linear(2C -> hidden) -> ReLU -> Linear(hidden -> 2)
    -> softmax; output = w_hr * HR + w_lr * LR.  No biases, Caffe2-style Xavier init (official).
    """

    def __init__(self, channels, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(2 * channels, hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, 2, bias=False)
        for fc in (self.fc1, self.fc2):
            weight_init.c2_xavier_fill(fc)

    def weights(self, hr, lr):
        """(N, 2) mixing weights, each row summing to 1."""
        pooled = torch.cat([hr, lr], dim=1).mean(dim=(2, 3))
        return F.softmax(self.fc2(F.relu(self.fc1(pooled))), dim=1)

    def forward(self, hr, lr, weights=None):
        """The mix of `hr` and `lr` by their ``weights`` (computed here unless given)."""
        w = self.weights(hr, lr) if weights is None else weights
        return w[:, 0, None, None, None] * hr + w[:, 1, None, None, None] * lr


def add_branch_statistics(module: nn.Module):
    """Give each BatchNorm layer below `module` (BN, SyncBN, NaiveSyncBN) a second set of running
    statistics for the LR branch (buffers ``running_mean_lr``, ``running_var_lr``, started from
    its own); the affine weights stay shared.  Returns the layers."""
    norms = [m for m in batch_norms(module) if m.track_running_stats]
    for norm in norms:
        if norm.momentum is None:
            raise ValueError("MODEL.MSAD.BRANCH_BN needs BatchNorm with a momentum (a running "
                             "average), not a cumulative one")
        norm.register_buffer("running_mean_lr", norm.running_mean.clone())
        norm.register_buffer("running_var_lr", norm.running_var.clone())
    return norms


@contextmanager
def lr_statistics(norms):
    """Within the block, `norms` read and update their LR statistics; whichever layer runs the
    statistics (SyncBN's all-reduce included) is the layer's own."""
    def swap():
        for norm in norms:
            norm.running_mean, norm.running_mean_lr = norm.running_mean_lr, norm.running_mean
            norm.running_var, norm.running_var_lr = norm.running_var_lr, norm.running_var

    swap()
    try:
        yield
    finally:
        swap()


@META_ARCH_REGISTRY.register()
class MultiScaleTeacher(AlignedFCOS):
    """The FCOS input (``MODEL.FCOS``) plus its 1/``MODEL.MSAD.LR_FACTOR`` copy reading the aligned
    levels; the head reads their per-level fusion.

    Args:
        joint_weight: weight of the loss on the fused features (HR and LR losses weigh 1).
        fusion_hidden_dim: hidden width of each ``CrossLevelFusion``.
        test_branch: what inference predicts from: "fused", or one branch alone ("hr", "lr"),
            a diagnostic of what each branch has learnt.
        branch_bn: one set of BatchNorm running statistics per branch in the backbone.
        fusion_lr_factor: the fusion's learning rate as a factor of the base one.
        **kwargs: ``AlignedFCOS``'s, with two branches: the HR one first.
    """

    @configurable
    def __init__(self, *, joint_weight: float, fusion_hidden_dim: int, test_branch="fused",
                 branch_bn=False, fusion_lr_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        # {parameter name prefix: learning-rate factor}, read by the trainer's optimizer.
        self.lr_factors = {"fusion.": fusion_lr_factor} if fusion_lr_factor != 1.0 else {}
        self.branch_norms = add_branch_statistics(self.backbone) if branch_bn else []
        if branch_bn and not self.branch_norms:
            raise ValueError("MODEL.MSAD.BRANCH_BN needs BatchNorm layers that learn their "
                             "statistics in the backbone (MODEL.RESNETS.NORM 'BN' or 'SyncBN'); "
                             "this one has none")
        self.test_branch = check_choice("MODEL.MSAD.TEST_BRANCH", test_branch, TEST_BRANCHES)
        self.joint_weight = joint_weight
        channels = self.backbone.output_shape()[self.branches[0].levels[0]].channels
        self.fusion = nn.ModuleList(
            CrossLevelFusion(channels, fusion_hidden_dim) for _ in self.branches[0].levels)

    @classmethod
    def from_config(cls, cfg):
        kwargs = super().from_config(cfg)
        hr = kwargs["branches"][0]
        lr_factor = cfg.MODEL.MSAD.LR_FACTOR
        lr_levels = shift_levels(hr.levels, -level_shift(lr_factor, "MODEL.MSAD.LR_FACTOR"))
        kwargs["branches"] = [hr, Branch(hr.factor * lr_factor, tuple(lr_levels))]
        return dict(kwargs, joint_weight=cfg.MODEL.MSAD.JOINT_WEIGHT,
                    fusion_hidden_dim=cfg.MODEL.MSAD.FUSION_HIDDEN_DIM,
                    test_branch=cfg.MODEL.MSAD.TEST_BRANCH, branch_bn=cfg.MODEL.MSAD.BRANCH_BN,
                    fusion_lr_factor=cfg.MODEL.MSAD.FUSION_LR_FACTOR)

    def branch_backbone(self, x, index):
        if index == 1 and self.branch_norms:
            with lr_statistics(self.branch_norms):
                return self.backbone(x)
        return self.backbone(x)

    def weights_for_student(self):
        """With per-branch BatchNorm, the LR branch's statistics: a student sees the LR image."""
        weights = self.state_dict()
        for key in [k for k in weights if k.endswith(("running_mean_lr", "running_var_lr"))]:
            weights[key[:-len("_lr")]] = weights.pop(key)
        return weights

    def head_features(self, branch_levels):
        """Each aligned HR/LR pair, fused (or, at inference, one branch: ``test_branch``).  In
        training, the mean HR weight of each level's fusion goes to the event storage
        (``fusion_hr_weight/<level>`` in metrics.json)."""
        hr, lr = branch_levels
        if not self.training and self.test_branch != "fused":
            return hr if self.test_branch == "hr" else lr
        fused = []
        for name, fuse, h, l in zip(self.full_resolution_levels, self.fusion, hr, lr):
            weights = fuse.weights(h, l)
            if self.training:
                get_event_storage().put_scalar(f"fusion_hr_weight/{name}",
                                               weights[:, 0].mean().item())
            fused.append(fuse(h, l, weights))
        return fused

    def detection_losses(self, images, features, predictions, gt_instances):
        """HR + LR + JOINT_WEIGHT x fused; the three share one grid, so targets are assigned once."""
        anchors = self.anchor_generator(features.head_in)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        (hr, lr), losses = features.branch_levels, {}
        for prefix, branch_predictions, weight in (("hr", self.head(hr), 1.0),
                                                   ("lr", self.head(lr), 1.0),
                                                   ("fused", predictions, self.joint_weight)):
            losses.update(self.branch_losses(branch_predictions, anchors, gt_labels, gt_boxes,
                                             prefix, weight))
        return losses
