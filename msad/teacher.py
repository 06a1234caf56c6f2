"""``MultiScaleTeacher``: one FCOS that sees the HR image and its 1/f LR copy, fused per level.

The LR level P(l) has the size of the HR level P(l+1) (msad/alignment.py), so one backbone and
one head serve both, the LR branch is trained against the HR ground truth at the HR strides, and
each aligned pair is mixed by a crossing-level fusion.  Loss = HR + LR + JOINT_WEIGHT x fused;
inference predicts from the fused features.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from fvcore.nn import weight_init
from torch import nn

from .alignment import aligned_levels
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
    @configurable
    def __init__(self, *, lr_factor: int, joint_weight: float, fusion_hidden_dim: int, **kwargs):
        super().__init__(factors=[1, lr_factor], **kwargs)
        self.lr_factor = lr_factor
        self.joint_weight = joint_weight
        channels = self.backbone.output_shape()[self.levels[1][0]].channels
        self.fusion = nn.ModuleList(
            CrossLevelFusion(channels, fusion_hidden_dim) for _ in self.levels[1])

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        levels = aligned_levels(cfg.MODEL.FCOS.IN_FEATURES, 1, backbone.output_shape())
        return dict(lr_factor=cfg.MODEL.MSAD.LR_FACTOR, joint_weight=cfg.MODEL.MSAD.JOINT_WEIGHT,
                    fusion_hidden_dim=cfg.MODEL.MSAD.FUSION_HIDDEN_DIM,
                    **cls.fcos_kwargs_from_config(cfg, backbone, levels))

    def multiscale_features(self, padded):
        """HR levels, the aligned LR levels, and their per-level fusion."""
        hr = self.branch_features(padded, 1)
        lr = self.branch_features(padded, self.lr_factor)
        fused = [fuse(h, l) for fuse, h, l in zip(self.fusion, hr, lr)]
        return hr, lr, fused

    def distillation_features(self, padded):
        """What the teacher teaches with: the fused levels."""
        return self.multiscale_features(padded)[2]

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        hr, lr, fused = self.multiscale_features(images.tensor)
        if not self.training:
            results = self.forward_inference(images, fused, self.head(fused))
            return self.postprocess(results, batched_inputs, images.image_sizes)
        # The three branches share one grid, so targets are assigned once.
        anchors = self.anchor_generator(hr)
        gt_labels, gt_boxes = self.label_anchors(anchors, self.gt_instances(batched_inputs))
        losses = {}
        for prefix, features, weight in (("hr", hr, 1.0), ("lr", lr, 1.0),
                                         ("fused", fused, self.joint_weight)):
            losses.update(self.branch_losses(self.head(features), anchors, gt_labels, gt_boxes,
                                             prefix, weight))
        return losses
