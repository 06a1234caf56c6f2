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
import math
import os
import statistics
import sys
import warnings

import cv2
import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import msad  # noqa: E402,F401
from msad.checkpoint.detection_checkpoint import SafeCheckpointer
from msad.config import load_config  # noqa: E402
from msad.modeling.resample import downsample

DISPLAY_SCALE = 2  # the source is shown at twice its size


def titled(image_rgb, title):
    bar = np.full((28, image_rgb.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, image_rgb])


def compare(model, image_rgb, input_format="RGB"):
    """One RGB picture: the source, its bicubic and its learned thumbnail, equally large; and
    each thumbnail's contrast: its per-channel standard deviation over the image's, averaged.

    The model is fed the image in its INPUT.FORMAT; the thumbnails are shown in RGB.
    """
    if getattr(model, "downsampler", None) is None:
        raise ValueError(f"{type(model).__name__} has no learned down-sampler to show "
                         "(use a ThumbDet config)")
    h, w = image_rgb.shape[:2]
    f = model.factor
    size = (w * DISPLAY_SCALE, h * DISPLAY_SCALE)
    model_input = image_rgb if input_format == "RGB" else image_rgb[:, :, ::-1]
    image = torch.as_tensor(np.ascontiguousarray(model_input.transpose(2, 0, 1)),
                            dtype=torch.float32)
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        unit = model.unit_range(images.tensor)
        thumbs = {"bicubic": downsample(unit, f, "bicubic"),
                  "learned": model.thumbnail(images)}
    panels = [titled(cv2.resize(image_rgb, size, interpolation=cv2.INTER_NEAREST),
                     f"source {w}x{h}")]
    th, tw = math.ceil(h / f), math.ceil(w / f)
    source_std = unit[0, :, :h, :w].flatten(1).std(dim=1)
    contrast = {}
    for name, thumb in thumbs.items():
        thumb = thumb[0, :, :th, :tw]
        contrast[name] = (thumb.flatten(1).std(dim=1) / source_std).mean().item()
        pixels = (thumb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        if input_format != "RGB":
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        panels.append(titled(cv2.resize(pixels, size, interpolation=cv2.INTER_NEAREST),
                             f"{name} {f}x: {tw}x{th}, contrast {contrast[name]:.2f}x"))
    return np.hstack(panels), contrast


def write_comparisons(model, dataset_dicts, output_dir, input_format="RGB"):
    """Write one comparison picture per image; return [(its path, its thumbnails' contrast)]."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for d in dataset_dicts:
        picture, contrast = compare(model, read_image(d["file_name"], format="RGB"), input_format)
        path = os.path.join(output_dir, f"thumbnails_{d['image_id']}.png")
        cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        written.append((path, contrast))
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="a ThumbDet checkpoint")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--output", help="default: the folder of --weights")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
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
