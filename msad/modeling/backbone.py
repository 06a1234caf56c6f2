"""ResNet at width w plus FPN P2-P7, built from Detectron2's own ResNet and FPN classes.

Every width of the slimmable ResNet is exactly a stock Detectron2 ResNet (BottleneckBlock, stride
in the 3x3 conv) with narrower channels, so no slimmable-op rewrite is needed and no parameter is
ever unused (DDP needs no ``find_unused_parameters``).
"""
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN
from fvcore.nn import weight_init
from torch import nn
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

from ..checkpoint.slimmable import load_slimmable_resnet

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def check_width(width, width_list):
    if width not in width_list:
        raise ValueError(f"MODEL.SLIMMABLE.WIDTH={width} is not one of "
                         f"MODEL.SLIMMABLE.WIDTH_LIST={list(width_list)}")


def resnet_channels(width):
    """(stem, [res2..res5 out], [res2..res5 bottleneck]) channels of the ResNet at `width`."""
    out2, mid2 = int(256 * width), int(64 * width)
    return int(64 * width), [out2 * 2**i for i in range(4)], [mid2 * 2**i for i in range(4)]


def build_slimmable_resnet(cfg, input_shape):
    depth, width = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.SLIMMABLE.WIDTH
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not supported; use one of "
                         f"{sorted(BLOCKS_PER_STAGE)}")
    check_width(width, cfg.MODEL.SLIMMABLE.WIDTH_LIST)
    norm = cfg.MODEL.RESNETS.NORM
    stem_channels, out_channels, mid_channels = resnet_channels(width)
    stem = BasicStem(input_shape.channels, stem_channels, norm=norm)
    stages, in_channels = [], stem_channels
    for i, blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        stages.append(ResNet.make_stage(
            BottleneckBlock, blocks, stride_per_block=[1 if i == 0 else 2] + [1] * (blocks - 1),
            in_channels=in_channels, out_channels=out_channels[i],
            bottleneck_channels=mid_channels[i], stride_in_1x1=False, norm=norm))
        in_channels = out_channels[i]
    # The stages FPN reads, and res5 for the levels above P5.
    out_features = sorted(set(cfg.MODEL.FPN.IN_FEATURES) | {"res5"})
    resnet = ResNet(stem, stages, out_features=out_features)
    if cfg.MODEL.SLIMMABLE.PRETRAINED:
        load_slimmable_resnet(resnet, cfg.MODEL.SLIMMABLE.PRETRAINED, width,
                              cfg.MODEL.SLIMMABLE.WIDTH_LIST)
    # Freezing after loading, so that FrozenBN layers receive the checkpoint's statistics.
    return resnet.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


class LevelsAboveP5(nn.Module):
    """P6 = conv3x3/2(res5) and, with two levels, P7 = conv3x3/2(relu(P6)), as MSAD's code.

    Like Detectron2's ``LastLevelP6P7`` (same parameter names, so checkpoints interchange), but
    also offers P6 alone for detectors whose coarsest level is P6 and would leave P7 unused.
    """

    def __init__(self, in_channels, out_channels, num_levels, in_feature="res5"):
        super().__init__()
        if num_levels not in (1, 2):
            raise ValueError(f"MODEL.FPN.NUM_TOP_LEVELS must be 1 or 2, got {num_levels}")
        self.num_levels = num_levels
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        if num_levels == 2:
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in self.children():
            weight_init.c2_xavier_fill(module)

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))] if self.num_levels == 2 else [p6]


def build_fpn(cfg, bottom_up):
    """Detectron2's FPN on MODEL.FPN.IN_FEATURES of `bottom_up` (res2-res5 as Detectron2's
    ResNet names its stages), P6(/P7) from res5: every backbone of this project ends here."""
    res5_channels = bottom_up.output_shape()["res5"].channels
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LevelsAboveP5(res5_channels, out_channels, cfg.MODEL.FPN.NUM_TOP_LEVELS),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_slimmable_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet at MODEL.SLIMMABLE.WIDTH, FPN on MODEL.FPN.IN_FEATURES, P6(/P7) from res5."""
    return build_fpn(cfg, build_slimmable_resnet(cfg, input_shape))
