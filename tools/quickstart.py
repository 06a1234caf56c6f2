#!/usr/bin/env python
"""The main job: MSAD end to end on the bundled synthetic data, on the CPU.

Trains the HR single-scale FCOS, the multi-scale teacher, the LR FCOS without distillation, the
same LR FCOS started from the teacher's weights without distillation (the ablation), the student
distilled from that teacher, and the 4x-thumbnail detectors (bicubic, and ThumbDet's learned
down-sampler distilled from the HR FCOS) (configs/quickstart/), evaluates each on the val split,
times inference, and prints one table.  Every stage is seeded (SEED of the configs, or --seed),
so a rerun on the same machine prints the same APs; --seeds N trains every model N times (seeds
--seed, --seed + 1, ...) and shows the mean ± std over them.  Writes into --output (default
output/quickstart/): seed<S>/<model>/ (each model's Detectron2 output directory) and
seed<S>/<model>.log, summary.json (the table, with each seed's metrics), detections.png (one val
image: its ground truth, then each model's best detections), thumbnails_<id>.png (source,
bicubic and learned 4x thumbnails) and ap_vs_cost.png/.svg (AP against GMACs and against
latency); the pictures, GMACs and timings use the first seed's models.

    python tools/quickstart.py [--output DIR] [--seed S] [--seeds N] [--reuse-trained]
        [CONFIG OVERRIDES for every model]

On your own data, the same pipeline and outputs: --train and --val each take LABELS IMAGES, where
LABELS is a COCO-format JSON or a folder of Pascal VOC .xml or YOLO .txt labels (converted into
--output/data/; YOLO needs --classes or --classes-file).  The number of classes comes from the
data; images whose longer side is at most 1333 are used at their own size, larger ones are
resized as COCO is (shorter side 800).  --width, --iters (the schedule scaled alike),
--thumbnail-factor 2|4 and --no-thumbnails set the rest:

    python tools/quickstart.py --train labels/train images/train --val labels/val images/val \
        --classes-file data.yaml --iters 3000 --output output/mine
"""
import argparse
import os
import signal
import sys
import time

import msad  # noqa: F401  (first: it registers the bundled data and quiets upstream notices)
from msad.benchmark.pipeline import (add_schedule_arguments, check_at_least, checked_overrides,
                                     schedule_overrides)
from msad.benchmark.quickstart import own_data_overrides, pipeline, train_stages
from msad.benchmark.report import write_report
from msad.config import REPO, load_config
from msad.data.coco import register_coco_from_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/quickstart")
    parser.add_argument("--seed", type=int,
                        help="seed of the first run (default: SEED of the quickstart configs, 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every model this many times, with seeds --seed, --seed + 1, "
                        "...; the table shows mean ± std over them")
    parser.add_argument("--timing-images", type=int, default=22)
    parser.add_argument("--reuse-trained", action="store_true",
                        help="skip training a model whose model_final.pth is already in --output")
    data = parser.add_argument_group(
        "your own data (default: the bundled synthetic data)",
        "LABELS is a COCO-format .json, a folder of Pascal VOC .xml files or a folder of YOLO "
        ".txt files (see tools/convert_dataset.py)")
    data.add_argument("--train", nargs=2, metavar=("LABELS", "IMAGES"))
    data.add_argument("--val", nargs=2, metavar=("LABELS", "IMAGES"))
    names = data.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", help="class names in order (VOC, YOLO)")
    names.add_argument("--classes-file", help="class names: one per line, or a YOLO data.yaml")
    parser.add_argument("--width", type=float, help="ResNet width (default: the configs' 0.25)")
    parser.add_argument("--thumbnail-factor", type=int, choices=(2, 4), default=4,
                        help="factor of the bicubic and ThumbDet thumbnails")
    parser.add_argument("--no-thumbnails", action="store_true",
                        help="leave out the bicubic and ThumbDet thumbnail detectors")
    add_schedule_arguments(parser, None, "the configs' 600")
    args = parser.parse_args(argv)
    check_at_least(parser, {"--timing-images": (3, " (two are warm-up)"), "--seeds": (1, ""),
                            "--iters": (1, "")}, args)
    if bool(args.train) != bool(args.val):
        parser.error("--train and --val go together")
    args.overrides = checked_overrides(parser, args.overrides,
                                       {"SEED": "--seed", "OUTPUT_DIR": "--output"})
    stages = pipeline(args.thumbnail_factor, not args.no_thumbnails)
    if args.seed is None:
        args.seed = load_config(os.path.join(REPO, stages[0].config), args.overrides).SEED
    check_at_least(parser, {"--seed": (0, " (Detectron2 draws a random seed for a negative one, "
                                          "which no rerun repeats)")}, args)
    args.output = os.path.abspath(args.output)  # the training scripts run from the repository
    os.makedirs(args.output, exist_ok=True)
    try:
        overrides = ((own_data_overrides(args.train, args.val, args.classes or args.classes_file,
                                         args.output) if args.train else [])
                     + (schedule_overrides(args.iters) if args.iters else [])
                     + (["MODEL.SLIMMABLE.WIDTH", str(args.width)] if args.width else [])
                     + args.overrides)
        register_coco_from_config(load_config(os.path.join(REPO, stages[0].config), overrides))
    except (OSError, ValueError) as e:  # labels that cannot be read or converted, named
        raise SystemExit(f"quickstart: {e}") from None
    seeds = list(range(args.seed, args.seed + args.seeds))
    # SIGTERM (a scheduler, a timeout) unwinds like Ctrl-C, so the running stage is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    job_start = time.time()
    train_stages(stages, args.output, seeds, overrides, args.reuse_trained)
    try:
        write_report(stages, args.output, seeds, overrides, args.timing_images,
                     time.time() - job_start, job_start)
    except (OSError, ValueError) as e:  # a stage that left no evaluation, named
        raise SystemExit(f"quickstart: {e}") from None


if __name__ == "__main__":
    main()
