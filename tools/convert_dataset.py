#!/usr/bin/env python
"""Convert Pascal VOC or YOLO detection labels to a COCO-format JSON, which the trainers read.

    python tools/convert_dataset.py voc --annotations VOC/Annotations --images VOC/JPEGImages \\
        --output voc_train.json [--classes aeroplane bicycle ... | --classes-file names.txt] \\
        [--keep-difficult]
    python tools/convert_dataset.py yolo --labels data/labels/train --images data/images/train \\
        --classes-file data.yaml --output yolo_train.json

Then train on it with DATASETS.COCO_INSTANCES "[['mine_train', 'voc_train.json', 'VOC/JPEGImages']]"
(see README, "Your own data").  msad.data.label_formats says how coordinates, difficult objects and
unlabelled images are treated.  An existing --output is not overwritten (--force does).
"""
import argparse
import collections
import json
import os
import sys

from msad.data.label_formats import read_class_names, voc_to_coco, yolo_to_coco
from msad.utils.io import write_atomically


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    formats = parser.add_subparsers(dest="format", required=True)
    voc = formats.add_parser("voc", help="Pascal VOC: one XML per image")
    voc.add_argument("--annotations", required=True, help="folder of .xml files")
    voc.add_argument("--keep-difficult", action="store_true",
                     help="train and evaluate on objects flagged difficult (default: ignored, "
                     "as iscrowd)")
    yolo = formats.add_parser("yolo", help="YOLO: one .txt per image, normalised boxes")
    yolo.add_argument("--labels", required=True, help="folder of .txt files, laid out as --images")
    for sub in (voc, yolo):
        sub.add_argument("--images", required=True, help="folder of the images")
        sub.add_argument("--output", required=True, help="the COCO JSON to write")
        sub.add_argument("--force", action="store_true", help="overwrite --output")
        names = sub.add_mutually_exclusive_group(required=sub is yolo)
        names.add_argument("--classes", nargs="+", help="class names, in order")
        names.add_argument("--classes-file", help="class names: a text file, one per line, "
                           "or a YOLO data.yaml")
    args = parser.parse_args(argv)
    try:
        for flag, folder in (("--images", args.images),
                             ("--annotations" if args.format == "voc" else "--labels",
                              getattr(args, "annotations", None) or getattr(args, "labels", None))):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{flag} {folder}: no such folder")
        if os.path.exists(args.output) and not args.force:
            raise FileExistsError(f"--output {args.output} exists: add --force to replace it")
        classes = read_class_names(args.classes_file) if args.classes_file else args.classes
        if args.format == "voc":
            coco = voc_to_coco(args.annotations, args.images, classes, args.keep_difficult)
        else:
            coco = yolo_to_coco(args.labels, args.images, classes)
    except (OSError, ValueError) as e:
        sys.exit(f"convert_dataset: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_atomically(args.output, "w", lambda f: json.dump(coco, f))
    counts = collections.Counter(a["category_id"] for a in coco["annotations"] if not a["iscrowd"])
    labelled = len({a["image_id"] for a in coco["annotations"]})
    print(f"Wrote {args.output}: {len(coco['images'])} images ({len(coco['images']) - labelled} "
          f"without labels), {len(coco['annotations'])} boxes "
          f"({sum(a['iscrowd'] for a in coco['annotations'])} ignored as difficult)")
    for c in coco["categories"]:
        print(f"  {c['id']:3d} {c['name']}: {counts[c['id']]} boxes")


if __name__ == "__main__":
    main()
