"""``MultiScaleTeacher``: one FCOS that sees the HR image and its 1/f LR copy, fused per level.

The LR level P(l) has the size of the HR level P(l+1) (msad/alignment.py), so one backbone and
one head serve both, the LR branch is trained against the HR ground truth at the HR strides, and
each aligned pair is mixed by a crossing-level fusion.  Loss = HR + LR + JOINT_WEIGHT x fused;
inference predicts from the fused features.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from fvcore.nn import weight_init
from torch import nn

from .alignment import Branch, level_shift, shift_levels
from .fcos import AlignedFCOS


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

    def forward(self, hr, lr):
        w = self.weights(hr, lr)
        return w[:, 0, None, None, None] * hr + w[:, 1, None, None, None] * lr


@META_ARCH_REGISTRY.register()
class MultiScaleTeacher(AlignedFCOS):
    """The FCOS input (``MODEL.FCOS``) plus its 1/``MODEL.MSAD.LR_FACTOR`` copy reading the aligned
    levels; the head reads their per-level fusion.

    Args:
        joint_weight: weight of the loss on the fused features (HR and LR losses weigh 1).
        fusion_hidden_dim: hidden width of each ``CrossLevelFusion``.
        **kwargs: ``AlignedFCOS``'s, with two branches: the HR one first.
    """

    @configurable
    def __init__(self, *, joint_weight: float, fusion_hidden_dim: int, **kwargs):
        super().__init__(**kwargs)
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
                    fusion_hidden_dim=cfg.MODEL.MSAD.FUSION_HIDDEN_DIM)

    def head_features(self, branch_levels):
        """Each aligned HR/LR pair, fused."""
        hr, lr = branch_levels
        return [fuse(h, l) for fuse, h, l in zip(self.fusion, hr, lr)]

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
