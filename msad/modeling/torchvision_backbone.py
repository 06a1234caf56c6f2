"""Backbones in torchvision's layout, started from torchvision's own ImageNet files.

ResNet-18/34/50/101 are stock Detectron2 ResNets in torchvision's variant (v1.5: the stride in
the 3x3 conv), whose parameters are torchvision's, renamed.  MobileNetV2 is torchvision's own
``features``, read at the ends of its stride-4/8/16/32 stages as Detectron2 names ResNet stages
(res2-res5).  Both end in the FPN every backbone here has (msad/modeling/backbone.py), so the HR/LR level
alignment, the padding rule and distillation work unchanged.

The ImageNet file (``MODEL.TORCHVISION.PRETRAINED``) is read as torchvision writes it
(``resnet50-0676ba61.pth``, ``mobilenet_v2-b0353104.pth``, ...), weights only; its keys and
shapes are checked against torchvision's model of ``MODEL.TORCHVISION.ARCH`` before anything is
loaded, and the ImageNet classifier is left out.
"""
import logging
import re
from functools import partial

import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicStem, ResNet

from ..checkpoint.detection_checkpoint import load_state_dict_file
from .backbone import build_fpn

logger = logging.getLogger(__name__)

RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
ARCHS = (*RESNET_DEPTHS, "mobilenet_v2")
# Norms MobileNetV2 can take: its 16- and 24-channel layers rule out GroupNorm's 32 groups.
BATCH_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN", "FrozenBN")
# The ImageNet classifier: in the file, not in a backbone.
CLASSIFIER_PREFIXES = ("fc.", "classifier.")

_RESNET_KEY = re.compile(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)")


def torchvision_resnet_key(key):
    """The Detectron2 ResNet name of torchvision ResNet parameter `key` (None: the classifier)."""
    if key.startswith(CLASSIFIER_PREFIXES):
        return None
    if key.startswith("conv1.") or key.startswith("bn1."):
        return "stem.conv1." + ("norm." if key.startswith("bn1.") else "") + key.split(".", 1)[1]
    match = _RESNET_KEY.fullmatch(key)
    if not match:
        raise KeyError(f"'{key}' is not a torchvision ResNet parameter")
    stage, block, layer, field = match.groups()
    if layer.startswith("bn"):  # bn{j} normalises conv{j}
        layer = f"conv{layer[2:]}.norm"
    elif layer.startswith("downsample"):
        layer = "shortcut" if layer.endswith("0") else "shortcut.norm"
    return f"res{int(stage) + 1}.{block}.{layer}.{field}"


def build_torchvision_resnet(depth, norm, out_features, in_channels=3):
    """torchvision's ResNet-`depth` as a Detectron2 ``ResNet``, its stages named res2-res5."""
    stride_in_1x1 = {"stride_in_1x1": False} if depth >= 50 else {}  # BasicBlock has no 1x1
    stem = BasicStem(in_channels, 64, norm=norm)
    stages = ResNet.make_default_stages(depth, norm=norm, **stride_in_1x1)
    return ResNet(stem, stages, out_features=out_features)


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 ``features`` (its own modules and parameter names), with the
    outputs of its stride-4/8/16/32 stages as res2-res5 (24, 32, 96 and 1280 channels: res5
    ends with the 1x1 conv to 1280, so every ImageNet parameter but the classifier is used).

    Args:
        norm: a Detectron2 norm name for every BatchNorm of torchvision's model (``BATCH_NORMS``).
        out_features: the stages to return, among res2-res5.
    """

    # The index in ``features`` of the last layer of each stage (stem: stride 2).
    STAGE_ENDS = {"stem": 1, "res2": 3, "res3": 6, "res4": 13, "res5": 18}

    def __init__(self, norm, out_features):
        super().__init__()
        if norm not in BATCH_NORMS:
            raise ValueError(f"MODEL.TORCHVISION.NORM={norm!r}: MobileNetV2 takes one of "
                             f"{BATCH_NORMS}")
        self._out_feature_strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        unknown = sorted(set(out_features) - set(self._out_feature_strides))
        if unknown:
            raise ValueError(f"MobileNetV2 has no stage {unknown}: it gives res2-res5 "
                             "(MODEL.FPN.IN_FEATURES)")
        self.features = torchvision.models.mobilenet_v2(
            norm_layer=partial(get_norm, norm)).features
        self._out_features = [name for name in self.STAGE_ENDS if name in out_features]
        self._out_feature_channels = {name: self.features[end].out_channels
                                      for name, end in self.STAGE_ENDS.items() if name != "stem"}
        self._outputs_at = {self.STAGE_ENDS[name]: name for name in self._out_features}

    def forward(self, x):
        outputs = {}
        for i, layer in enumerate(self.features[:max(self._outputs_at) + 1]):
            x = layer(x)
            if i in self._outputs_at:
                outputs[self._outputs_at[i]] = x
        return outputs

    def freeze(self, freeze_at=0):
        """Detectron2's convention: 1 freezes the stem, 2 the stem and res2, and so on; frozen
        BatchNorms become ``FrozenBatchNorm2d``.  Returns self."""
        start = 0
        for index, end in enumerate(self.STAGE_ENDS.values(), start=1):
            if freeze_at >= index:
                for i in range(start, end + 1):
                    for p in self.features[i].parameters():
                        p.requires_grad = False
                    self.features[i] = FrozenBatchNorm2d.convert_frozen_batchnorm(
                        self.features[i])
            start = end + 1
        return self


def load_torchvision_weights(bottom_up, arch, path):
    """Initialise `bottom_up` (built for torchvision's `arch`) from torchvision's ImageNet file
    `path`, after checking that the file holds exactly that architecture's tensors."""
    what = "MODEL.TORCHVISION.PRETRAINED"
    state = {k: v for k, v in load_state_dict_file(path, what).items()
             if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):  # torchvision's own layout: names and shapes, no memory
        reference = {k: v.shape for k, v in torchvision.models.get_model(arch).state_dict().items()
                     if not k.endswith("num_batches_tracked")}
    missing = [k for k in reference if k not in state]
    unknown = [k for k in state if k not in reference]
    reshaped = [f"{k}: file {tuple(state[k].shape)}, {arch} {tuple(v)}"
                for k, v in reference.items() if k in state and state[k].shape != v]
    if missing or unknown or reshaped:
        raise ValueError(
            f"{what}={path} does not hold torchvision's {arch} (MODEL.TORCHVISION.ARCH): "
            f"{len(missing)} of the {len(reference)} keys {arch} expects are missing "
            f"{missing[:3]}, {len(unknown)} keys found are not {arch}'s {unknown[:3]}, "
            f"{len(reshaped)} of another shape {reshaped[:2]}")
    rename = (lambda k: None if k.startswith(CLASSIFIER_PREFIXES) else k) \
        if arch == "mobilenet_v2" else torchvision_resnet_key
    mapped = {rename(k): v for k, v in state.items() if rename(k) is not None}
    left_out = sorted(k for k in state if rename(k) is None)
    result = bottom_up.load_state_dict(mapped, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if not_loaded or result.unexpected_keys:  # the mapping and the model disagree: a bug here
        raise RuntimeError(f"torchvision {arch} weights do not fit the backbone: not loaded "
                           f"{not_loaded[:3]}, unexpected {result.unexpected_keys[:3]}")
    logger.info("Loaded torchvision %s ImageNet weights from %s: %d tensors mapped; left out: "
                "%s (the ImageNet classifier)", arch, path, len(mapped), ", ".join(left_out))


@BACKBONE_REGISTRY.register()
def build_torchvision_fpn_backbone(cfg, input_shape: ShapeSpec):
    """torchvision's MODEL.TORCHVISION.ARCH at MODEL.TORCHVISION.NORM, its ImageNet weights
    from MODEL.TORCHVISION.PRETRAINED, stages frozen up to MODEL.BACKBONE.FREEZE_AT, then the
    FPN on MODEL.FPN.IN_FEATURES and P6(/P7) from res5."""
    spec = cfg.MODEL.TORCHVISION
    if spec.ARCH not in ARCHS:
        raise ValueError(f"MODEL.TORCHVISION.ARCH={spec.ARCH!r} is not one of {ARCHS}")
    # The stages FPN reads, and res5 for the levels above P5.
    out_features = sorted(set(cfg.MODEL.FPN.IN_FEATURES) | {"res5"})
    if spec.ARCH == "mobilenet_v2":
        if input_shape.channels != 3:
            raise ValueError(f"MobileNetV2 takes 3 input channels, not {input_shape.channels}")
        bottom_up = MobileNetV2Backbone(spec.NORM, out_features)
    else:
        bottom_up = build_torchvision_resnet(RESNET_DEPTHS[spec.ARCH], spec.NORM, out_features,
                                             input_shape.channels)
    if spec.PRETRAINED:
        load_torchvision_weights(bottom_up, spec.ARCH, spec.PRETRAINED)
    # Freezing after loading, so that FrozenBN layers receive the checkpoint's statistics.
    return build_fpn(cfg, bottom_up.freeze(cfg.MODEL.BACKBONE.FREEZE_AT))
