"""Pictures people would rather look at than read: detections on an image, and what a ThumbDet
down-sampler learned (source | bicubic thumbnail | learned thumbnail, equally large)."""
import math
import os

import cv2
import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

from ..modeling.resample import downsample

DISPLAY_SCALE = 2  # the source is shown at twice its size


def titled(image_rgb, title):
    bar = np.full((28, image_rgb.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, image_rgb])


def compare_thumbnails(model, image_rgb, input_format="RGB"):
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
        image_rgb = read_image(d["file_name"], format="RGB")
        picture, contrast = compare_thumbnails(model, image_rgb, input_format)
        path = os.path.join(output_dir, f"thumbnails_{d['image_id']}.png")
        cv2.imwrite(path, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        written.append((path, contrast))
    return written


def panel(image_rgb, metadata, title, scale, instances=None, boxes=None, labels=None):
    """One titled picture of the image with either predictions or ground-truth boxes."""
    canvas = Visualizer(image_rgb, metadata, scale=scale)
    if instances is not None:
        canvas = canvas.draw_instance_predictions(instances)
    else:
        canvas = canvas.overlay_instances(boxes=boxes, labels=labels)
    return titled(canvas.get_image(), title)


def grid(panels, columns):
    """Equal-sized panels in rows of `columns`, the last row filled with white."""
    blank = np.full_like(panels[0], 255)
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    return np.vstack([np.hstack(row + [blank] * (columns - len(row))) for row in rows])


def top_detections(model, sample, keep, score_thresh=0.3):
    """The `keep` best detections above `score_thresh`, so that the picture stays readable."""
    with torch.no_grad():
        instances = model([sample])[0]["instances"].to("cpu")
    instances = instances[instances.scores > score_thresh]
    return instances[instances.scores.argsort(descending=True)[:keep]]
