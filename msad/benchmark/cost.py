"""What a model costs: multiply-accumulates (MACs) counted with fvcore, and inference time.

MACs count convolutions and linear layers (fvcore's handles), not norms, activations or resizing.
``model_macs`` watches one inference forward of the model and counts every call of each of its
parts (its child modules: the teacher's backbone runs twice) on the very inputs it got, so the
count follows the model's own code; images are padded as the model pads them.
"""
import math
import os
import statistics
import sys
import time
from collections import Counter

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis
from torch import nn

from ..config import NO_IMAGENET_START, REPO, load_config
from ..modeling.backbone import build_slimmable_resnet

# MSAD README, "Capacity" column: width -> (teacher, student).
PAPER_CAPACITY = {0.25: (0.08, 0.02), 0.5: (0.31, 0.06), 0.75: (0.70, 0.14), 1.0: (1.25, 0.25)}
CAPACITY_SIZE = (800, 1333)
MODELS = (
    ("HR FCOS", "configs/MSAD/HR-FCOS-R50.yaml"),
    ("MSAD teacher", "configs/MSAD/SLR100-50-T.yaml"),
    ("MSAD student", "configs/MSAD/SLR100-50-S.yaml"),
    ("MSAD student, light", "configs/MSAD/SLR100-50-S-light.yaml"),
    ("ThumbDet 2x", "configs/ThumbDet/ThumbDet-2x.yaml"),
    ("ThumbDet 4x", "configs/ThumbDet/ThumbDet-4x.yaml"),
    ("bicubic 2x", "configs/ThumbDet/Bicubic-2x.yaml"),
    ("bicubic 4x", "configs/ThumbDet/Bicubic-4x.yaml"),
    *((f"{name}, {backbone}", f"configs/{folder}/torchvision/{prefix}-{config}.yaml")
      for backbone, prefix in (("tv R50", "R50"), ("MNV2", "MNV2"))
      for name, folder, config in (("HR FCOS", "MSAD", "HR-FCOS"), ("MSAD teacher", "MSAD", "T"),
                                   ("MSAD student", "MSAD", "S"),
                                   ("ThumbDet 4x", "ThumbDet", "ThumbDet-4x"))),
)
# Every backbone BatchNorm frozen (no per-branch statistics then): fvcore's trace of a frozen
# BatchNorm has no aten::batch_norm, which set_op_handle(..., None) does not stop it counting.
FROZEN_NORMS = ("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.TORCHVISION.NORM", "FrozenBN",
                "MODEL.MSAD.BRANCH_BN", "False")
# Counted at the same cost in every model, so left out: norms, activations, resizing.
IGNORED_OPS = ("aten::batch_norm", "aten::group_norm", "aten::upsample_nearest2d",
                "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d")


def count_macs(module, *inputs):
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle(**{op: None for op in IGNORED_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def resnet_macs(width, size, depth=50):
    cfg = load_config(os.path.join(REPO, "configs/MSAD/Base-FCOS.yaml"), [
        "MODEL.SLIMMABLE.WIDTH", width, *NO_IMAGENET_START,
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.RESNETS.DEPTH", depth])
    resnet = build_slimmable_resnet(cfg, ShapeSpec(channels=3)).eval()
    return count_macs(resnet, torch.zeros(1, 3, *size))


def capacity_table(size=CAPACITY_SIZE):
    """Rows of (width, role, paper, counted, idealised) for the eight MSAD capacity numbers."""
    lr_size = tuple(math.ceil(s / 2) for s in size)
    reference = resnet_macs(1.0, size)
    rows = []
    for width, (paper_t, paper_s) in PAPER_CAPACITY.items():
        hr = resnet_macs(width, size) / reference
        lr = resnet_macs(width, lr_size) / reference
        rows.append({"width": width, "role": "teacher", "paper": paper_t, "counted": hr + lr,
                     "idealised": width**2 * 1.25})
        rows.append({"width": width, "role": "student", "paper": paper_s, "counted": lr,
                     "idealised": width**2 * 0.25})
    return rows, reference


def model_macs(model, size):
    """MACs of one inference pass by part (each child module of the model; the backbone split
    into ResNet and FPN), and the size of each branch's input, for one size image."""
    calls = []
    hooks = [module.register_forward_hook(
        lambda module, args, output, part=part: calls.append((part, module, args)))
        for part, child in model.named_children()
        for module in (child if isinstance(child, nn.ModuleList) else [child])
        if next(module.parameters(), None) is not None]  # not the anchor generator
    try:
        with torch.no_grad():
            model([{"image": torch.zeros(3, *size)}])
    finally:
        for hook in hooks:
            hook.remove()
    parts = Counter()
    for part, module, args in calls:
        tensors = tuple(a for a in args if not isinstance(a, (list, tuple))
                        or all(torch.is_tensor(t) for t in a))  # not the images' sizes
        if part == "backbone":
            resnet = count_macs(module.bottom_up, *tensors)
            parts["backbone"] += resnet
            parts["fpn"] += count_macs(module, *tensors) - resnet
        else:
            parts[part] += count_macs(module, *tensors)
    parts["total"] = sum(parts.values())
    return dict(parts), model.branch_input_sizes(size)


def end_to_end_table(size):
    rows = []
    for name, config in MODELS:
        cfg = load_config(os.path.join(REPO, config), [
            "MODEL.DEVICE", "cpu", *NO_IMAGENET_START, *FROZEN_NORMS])
        model = build_model(cfg).eval()
        parts, inputs = model_macs(model, size)
        rows.append({"model": name, "config": config, "backbone_inputs": [list(i) for i in inputs],
                     **{k: v / 1e9 for k, v in parts.items()}})
        print(f"  counted {name}", file=sys.stderr, flush=True)
    return rows


def time_inference(model, samples):
    """Median milliseconds per image, batch 1, after two warm-up images."""
    times = []
    with torch.no_grad():
        for i, sample in enumerate(samples):
            start = time.perf_counter()
            model([sample])
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
