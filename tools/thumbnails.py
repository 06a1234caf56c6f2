#!/usr/bin/env python
"""Show what a ThumbDet down-sampler learned: source | bicubic thumbnail | learned thumbnail.

    python tools/thumbnails.py --config-file configs/quickstart/thumbdet_4x.yaml \\
        --weights output/quickstart/seed0/thumbdet_4x/model_final.pth [--num-images 4] [--output DIR]

Writes one PNG per image, the three shown at the same display size (thumbnails enlarged with
nearest-neighbour, so their real pixels stay visible), into --output (default: beside the
weights), and prints each thumbnail's contrast: its per-channel standard deviation over the
image's (1.0 keeps the image's; bicubic blurs a little below).
"""
import argparse
import os
import statistics

import msad  # noqa: F401  (first: it registers the bundled data and quiets upstream notices)
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from msad.benchmark.pictures import write_comparisons
from msad.checkpoint.detection_checkpoint import SafeCheckpointer
from msad.config import load_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="a ThumbDet checkpoint")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--output", help="default: the folder of --weights")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts + ["MODEL.DEVICE", "cpu"])
    if not os.path.isfile(args.weights):
        parser.error(f"--weights: no such file {args.weights}")
    model = build_model(cfg).eval()
    SafeCheckpointer(model, source="--weights").load(args.weights)
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.num_images]
    written = write_comparisons(model, dicts, args.output or os.path.dirname(args.weights),
                                cfg.INPUT.FORMAT)
    for path, contrast in written:
        print(path, "  contrast (thumbnail std / image std): " + ", ".join(
            f"{name} {value:.2f}x" for name, value in contrast.items()))
    print("mean contrast over the images: " + ", ".join(
        f"{name} {statistics.mean(c[name] for _, c in written):.2f}x" for name in written[0][1]))


if __name__ == "__main__":
    main()
