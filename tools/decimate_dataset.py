#!/usr/bin/env python
"""Write a 1/factor copy of a COCO-format split: what a camera of lower resolution would see.

    python tools/decimate_dataset.py --json datasets/msad_synth/val.json \\
        --images datasets/msad_synth/val --factor 2 --output datasets/msad_synth_val_lr2

Each image becomes its nearest-neighbour decimation (every factor-th pixel of every factor-th
row: exactly what a model trained with MODEL.FCOS.INPUT_RESAMPLE nearest makes inside), or with
--resample area the mean of each factor x factor block (closer to a smaller sensor); boxes and
areas are divided by the factor.  Writes <output>/annotations.json and <output>/images/.
Evaluate a low-resolution detector on it with MODEL.FCOS.INPUT_SCALE low.
"""
import argparse
import json
import os
import sys

import cv2


def decimate(image, factor, resample):
    if resample == "nearest":
        return image[::factor, ::factor]
    h, w = image.shape[:2]
    size = (-(-w // factor), -(-h // factor))  # ceil, as nearest keeps the last partial block
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="COCO-format annotation file")
    parser.add_argument("--images", required=True, help="folder its file_names are relative to")
    parser.add_argument("--factor", type=int, required=True, choices=[2, 4])
    parser.add_argument("--resample", default="nearest", choices=["nearest", "area"])
    parser.add_argument("--output", required=True, help="folder to write (must not exist)")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"--output {args.output} exists; choose a new folder")
    try:
        with open(args.json) as f:
            coco = json.load(f)
        images = coco["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"--json {args.json}: not a COCO-format file ({e})")
    os.makedirs(os.path.join(args.output, "images"))
    f = args.factor
    for i, record in enumerate(images, 1):
        path = os.path.join(args.images, record["file_name"])
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if image is None:
            sys.exit(f"decimate_dataset: cannot read image {path}")
        small = decimate(image, f, args.resample)
        record["file_name"] = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        cv2.imwrite(os.path.join(args.output, "images", record["file_name"]), small)
        record["height"], record["width"] = small.shape[:2]
        print(f"\r{i}/{len(images)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for ann in coco.get("annotations", []):
        ann["bbox"] = [v / f for v in ann["bbox"]]
        ann["area"] = ann.get("area", 0) / (f * f)
        ann.pop("segmentation", None)
    with open(os.path.join(args.output, "annotations.json"), "w") as out:
        json.dump(coco, out)
    print(f"{len(images)} images, {len(coco.get('annotations', []))} boxes at 1/{f} -> "
          f"{os.path.join(args.output, 'annotations.json')}")


if __name__ == "__main__":
    main()
