#!/usr/bin/env python
"""Count what each model costs in multiply-accumulates (MACs), with fvcore.

Two tables, printed and written as JSON (--output):

1. MSAD's "capacity": backbone MACs relative to the width-1.0 slimmable ResNet-50 on an
   800x1333 image; the teacher counts its HR and its 0.5x LR pass, the student its LR pass.
   Three columns per number: the paper's value, the value counted on our ResNet at that width,
   and the idealised w^2 x (1 + 1/4) (teacher) or w^2 / 4 (student).  The paper's column is the
   idealised one rounded to two decimals; counted, the 3-channel stem scales with w rather than
   w^2 and the borders of odd-sized maps round up, which is where the two differ.
2. End-to-end inference MACs of every model (backbone, FPN, head, fusion, down-sampler
   separately) at --size, as the model really runs: one inference forward of the model is
   watched, and every call of each of its parts (its child modules: the teacher's backbone runs
   twice) is counted on the very inputs it got, so the count follows the model's own code.
   Images are padded as the model pads them (``branch_input_sizes``).

Counted: convolutions and linear layers (fvcore's handles), not norms, activations, resizing.

    python tools/measure_capacity.py [--size 800 1333] [--output output/capacity.json]
"""
import argparse
import json
import math
import os
import sys
import warnings
from collections import Counter

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*torch.meshgrid.*", category=UserWarning)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402

import msad  # noqa: E402,F401
from msad.config import NO_IMAGENET_START, load_config  # noqa: E402
from msad.modeling.backbone import build_slimmable_resnet

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
_IGNORED_OPS = ("aten::batch_norm", "aten::group_norm", "aten::upsample_nearest2d",
                "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d")


def count_macs(module, *inputs):
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle(**{op: None for op in _IGNORED_OPS})
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=list(CAPACITY_SIZE),
                        metavar=("H", "W"), help="image size of the end-to-end table")
    parser.add_argument("--output", default="output/capacity.json")
    parser.add_argument("--capacity-only", action="store_true")
    args = parser.parse_args()

    rows, reference = capacity_table()
    print(f"MSAD capacity: backbone MACs / width-1.0 ResNet-50 at 800x1333 "
          f"({reference / 1e9:.2f} GMACs)")
    print(f"{'width':>6} {'role':<8} {'paper':>6} {'counted':>8} {'idealised':>10}")
    for r in rows:
        print(f"{r['width']:6.2f} {r['role']:<8} {r['paper']:6.2f} {r['counted']:8.3f} "
              f"{r['idealised']:10.4f}")
    result = {"capacity": rows, "capacity_reference_gmacs": reference / 1e9}

    if not args.capacity_only:
        size = tuple(args.size)
        print(f"\nEnd-to-end inference GMACs at {size[0]}x{size[1]} (width 1.0, zoo configs):")
        table = end_to_end_table(size)
        keys = ["backbone", "fpn", "head", "fusion", "downsampler", "total"]
        print(f"{'model':<28} {'backbone input':<20}" + "".join(f"{k:>12}" for k in keys)
              + f"{'vs HR':>8}")
        for r in table:
            cells = "".join(f"{r.get(k, 0.0):12.1f}" for k in keys)
            inputs = " + ".join("x".join(map(str, i)) for i in r["backbone_inputs"])
            print(f"{r['model']:<28} {inputs:<20}{cells}"
                  f"{r['total'] / table[0]['total']:8.2f}")
        result.update(end_to_end=table, size=list(size))

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()
