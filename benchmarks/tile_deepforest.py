#!/usr/bin/env python
"""Real aerial photographs with boxes, for measurements by hand: the annotated NEON images that
ship inside the PyPI package deepforest 2.1.0 (MIT licence; not a dependency of msad), cut into
256x256 COCO-format tiles.

    pip download --no-deps deepforest==2.1.0 -d /tmp/deepforest
    python -m zipfile -e /tmp/deepforest/deepforest-2.1.0-py3-none-any.whl /tmp/deepforest/x
    python benchmarks/tile_deepforest.py /tmp/deepforest/x/deepforest/data datasets/trees

train: one plot of the YELL site; val: another YELL plot and one plot each of the OSBS and SOAP
sites (other forests), every class as "Tree".  A tree cut by a tile's edge is kept, clipped, when
at least half of its box is inside; tiles without a tree are left out.  benchmarks/trees.args
trains on it.
"""
import argparse
import json
import os
import xml.etree.ElementTree as ET

from PIL import Image

TILE = 256
SPLITS = {"train": ["2019_YELL_2_528000_4978000_image_crop2"],
          "val": ["2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061"]}


def tile_starts(length):
    """Tile origins along one side: every TILE pixels, the last one flush with the edge."""
    starts = list(range(0, max(length - TILE, 0) + 1, TILE))
    return starts if starts[-1] + TILE >= length else starts + [length - TILE]


def voc_boxes(path):
    root = ET.parse(path).getroot()
    return [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in root.iter("object")]


def boxes_in_tile(boxes, x, y):
    """COCO [x, y, w, h] boxes of the trees at least half inside the tile at (x, y), clipped."""
    kept = []
    for x1, y1, x2, y2 in boxes:
        cx1, cy1, cx2, cy2 = max(x1, x), max(y1, y), min(x2, x + TILE), min(y2, y + TILE)
        if cx2 - cx1 >= 4 and cy2 - cy1 >= 4 and \
                (cx2 - cx1) * (cy2 - cy1) >= 0.5 * (x2 - x1) * (y2 - y1):
            kept.append([cx1 - x, cy1 - y, cx2 - cx1, cy2 - cy1])
    return kept


def write_split(source, output, split, names):
    os.makedirs(os.path.join(output, split), exist_ok=True)
    images, annotations = [], []
    for name in names:
        image = Image.open(os.path.join(source, name + ".png")).convert("RGB")
        boxes = voc_boxes(os.path.join(source, name + ".xml"))
        for y in tile_starts(image.height):
            for x in tile_starts(image.width):
                kept = boxes_in_tile(boxes, x, y)
                if not kept:
                    continue
                file_name = f"{name}_{x}_{y}.png"
                image.crop((x, y, x + TILE, y + TILE)).save(os.path.join(output, split, file_name))
                images.append({"id": len(images) + 1, "file_name": file_name, "width": TILE,
                               "height": TILE})
                annotations += [{"id": len(annotations) + i + 1, "image_id": len(images),
                                 "category_id": 1, "bbox": box, "area": box[2] * box[3],
                                 "iscrowd": 0} for i, box in enumerate(kept)]
    with open(os.path.join(output, f"{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "Tree"}]}, f)
    print(f"{split}: {len(images)} tiles, {len(annotations)} trees")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="deepforest's data folder (deepforest/data in the wheel)")
    parser.add_argument("output", help="where to write train/, val/, train.json, val.json")
    args = parser.parse_args()
    for split, names in SPLITS.items():
        write_split(args.source, args.output, split, names)


if __name__ == "__main__":
    main()
