#!/usr/bin/env python
"""Convert a published MSAD checkpoint (dvlab-research/MSAD) into this project's teacher or student.

    python tools/convert_official_msad.py SLR100-50-T.pth --role teacher --width 1.0 \\
        -o converted/SLR100-50-T/model_final.pth
    python tools/convert_official_msad.py SLR100-50-S.pth --role student --width 1.0 \\
        -o converted/SLR100-50-S/model_final.pth

The model is built from configs/MSAD/official/SLR<width>-50-<T|S>.yaml (--config to choose
another), with as many classes as the file's classifier; every one of its parameters must come
from the file (msad/checkpoint/official.py says how each is mapped).  Writes the weights, and beside them
the config they run with (config.yaml) and model_info.json (class names: COCO's for 80 classes);
prints what was mapped, what was left out and why.  --role teacher on a student's file extracts
the teacher it holds.  A file that is not an official MSAD checkpoint, or of another width, is
refused naming the keys; nothing existing is overwritten.
"""
import argparse
import logging
import os
import sys

import torch

import msad  # noqa: F401  (first: it registers the bundled data and quiets upstream notices)
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from msad.checkpoint.model_info import MODEL_INFO, write_model_info
from msad.checkpoint.official import (ROLES, checkpoint_num_classes, convert, official_config,
                                      read_official)
from msad.config import OFFICIAL_WIDTH_LIST, TRAINING_CONFIG, load_config
from msad.utils.io import write_atomically

COCO_CLASSES = 80
logger = logging.getLogger("convert_official_msad")
# One mapping of each kind, printed as examples.
EXAMPLES = ("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.weight",
            "backbone.fpn_lateral2.weight", "head.cls_subnet.0.weight", "head.cls_score.weight",
            "head.scales", "fusion.0.fc1.weight")


def class_names(num_classes):
    """COCO's names and ids (Detectron2's registration) for an 80-class model, else none."""
    return MetadataCatalog.get("coco_2017_val") if num_classes == COCO_CLASSES else Metadata()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="an official TFCOS (teacher) or SFCOS (student) file")
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--width", required=True, type=float, choices=OFFICIAL_WIDTH_LIST)
    parser.add_argument("-o", "--output", required=True, help="the converted weights (.pth)")
    parser.add_argument("--config", help="the config to build the model from (default: "
                        "configs/MSAD/official/SLR<width>-50-<T|S>.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        folder = os.path.dirname(os.path.abspath(args.output))
        for path in (args.output, os.path.join(folder, TRAINING_CONFIG),
                     os.path.join(folder, MODEL_INFO)):
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists: give -o a file in a folder of its own")
        state, found = read_official(args.checkpoint, args.role, args.width)
        width = args.width
        num_classes = checkpoint_num_classes(state, args.role)
        config = args.config or official_config(args.role, width)
        cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.FCOS.NUM_CLASSES", num_classes,
                                   "MODEL.WEIGHTS", os.path.abspath(args.output),
                                   "OUTPUT_DIR", folder])
        if cfg.MODEL.SLIMMABLE.WIDTH != width:
            raise ValueError(f"--config {config} builds width {cfg.MODEL.SLIMMABLE.WIDTH}, the "
                             f"checkpoint is width {width}")
        model = build_model(cfg)
        conversion = convert(state, args.role, width, model.state_dict())
        model.load_state_dict(conversion.state, strict=True)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"convert_official_msad: {e}")

    os.makedirs(folder, exist_ok=True)
    write_atomically(args.output, "wb", lambda f: torch.save(
        {"model": conversion.state, "__author__": f"official MSAD {args.role}, converted by "
         f"msad from {os.path.basename(args.checkpoint)}"}, f))
    write_atomically(os.path.join(folder, TRAINING_CONFIG), "w", lambda f: f.write(cfg.dump()))
    write_model_info(cfg, class_names(num_classes))
    print(f"Official {found} checkpoint {args.checkpoint}: width {width}, {num_classes} classes")
    if found == "student" and args.role == "teacher":
        logger.warning("This is the teacher inside a student's file: its BatchNorm statistics "
                       "kept moving while the student trained; the official teacher file is the "
                       "teacher as trained")
    print(f"Mapped {len(conversion.mapped)} tensors onto {type(model).__name__} "
          f"({sum(v.numel() for v in conversion.state.values()) / 1e6:.1f} M values), e.g.")
    for ours in EXAMPLES:
        if ours in conversion.mapped:
            print(f"  {conversion.mapped[ours]} -> {ours}")
    for why, keys in conversion.dropped.items():
        print(f"Left out {len(keys)} tensors: {why} (e.g. {keys[0]})")
    reasons = sorted(set(conversion.filled.values()))
    for why in reasons:
        keys = [k for k, v in conversion.filled.items() if v == why]
        print(f"Set {len(keys)} tensors without an official source: {why} (e.g. {keys[0]})")
    print(f"Wrote {args.output}, {TRAINING_CONFIG} and {MODEL_INFO} in {folder}")
    print(f"Evaluate: train_net_{'TS'[args.role == 'student']}.py --config-file "
          f"{os.path.relpath(config)} --eval-only MODEL.WEIGHTS {args.output}")


if __name__ == "__main__":
    main()
