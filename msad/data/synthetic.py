"""The bundled synthetic detection datasets: generation and registration.

Scenes are textured backgrounds with clutter and several object classes whose sizes run
log-uniformly from a few pixels to about half the image, drawn over each other so that some
are partly hidden.  At 0.5x and 0.25x input many of the small ones shrink to a few pixels,
which is the regime low-resolution detection is about.  The generator is deterministic: the
same seed gives the same bytes (JPEG encoding included) on the same library versions.

Two scenes (``SceneSpec``): ``msad_synth``, the main job's, and ``msad_detail``, the method
benchmark's, where small objects are told apart by a hole.  Importing :mod:`msad` registers
``<scene>_train`` and ``<scene>_val`` under Detectron2's dataset root (``$DETECTRON2_DATASETS``,
default ``datasets/``); the first use generates them.
"""
import fcntl
import json
import logging
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils.io import write_atomically
from .coco import load_coco_checked

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSpec:
    name: str
    num_images: int
    seed: int


@dataclass(frozen=True)
class SceneSpec:
    """What one synthetic dataset draws: its classes, image and object sizes, and its splits."""

    name: str  # registered as <name>_<split>, written under <dataset root>/<name>
    title: str  # the COCO file's description
    classes: tuple
    # A base hue per class (OpenCV hue, 0-180), a hint beside the shape; None: every object
    # gets a random hue, so that only the shape tells the classes apart.
    class_hues: tuple
    splits: tuple
    image_height_range: tuple
    image_width_range: tuple
    object_size_range: tuple  # longest side in pixels, sampled log-uniformly
    objects_per_image: tuple
    min_visible_fraction: float = 0.35  # more hidden than this and the object is not annotated
    background_saturation: float = 0.35  # share of the background noise's colour that is kept
    clutter_lines: tuple = (3, 8)  # how many lines are drawn over the background


# The bundled dataset.  Sizes chosen so that the CPU quickstart trains in minutes (see
# tools/make_synthetic_dataset.py to make a larger copy); images of at most 256 pixels, so that a
# native-size image pads to one 256x256 tile (msad/modeling/alignment.py).
SYNTH = SceneSpec(
    name="msad_synth", title="msad synthetic scenes",
    classes=("disk", "square", "triangle", "ring", "cross"), class_hues=(0, 30, 60, 100, 140),
    splits=(SplitSpec("train", 320, 0), SplitSpec("val", 80, 1)),
    image_height_range=(192, 256), image_width_range=(192, 256),
    object_size_range=(6, 128), objects_per_image=(3, 10))

# Where low resolution hurts (tools/compare_methods.py): small objects on 128-pixel images (one
# 128x128 tile, the teacher's padding), and pairs of classes of one hue told apart only by a
# hole that a 2x down-sampling blurs or drops (disk/ring, square/frame).
DETAIL = SceneSpec(
    name="msad_detail", title="msad detail scenes", classes=("disk", "ring", "square", "frame"),
    class_hues=(0, 0, 90, 90),
    splits=(SplitSpec("train", 800, 10), SplitSpec("val", 200, 11)),
    image_height_range=(112, 128), image_width_range=(112, 128),
    object_size_range=(10, 40), objects_per_image=(3, 8), clutter_lines=(1, 4))

SCENES = (SYNTH, DETAIL)
# The bundled dataset's facts, as other modules and tests name them.
CLASSES = SYNTH.classes
SPLITS = SYNTH.splits
DATASET_DIR = SYNTH.name


def dataset_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def split_paths(split, root=None, scene=SYNTH):
    base = os.path.join(root or dataset_root(), scene.name)
    return os.path.join(base, f"{split}.json"), os.path.join(base, split)


def _background(rng, h, w, scene):
    # Low-frequency colour noise at three scales, plus a lighting gradient and line clutter.
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90.0), (16, 40.0), (64, 15.0)):
        coarse = rng.uniform(-1, 1, size=(max(2, h * cells // 256), max(2, w * cells // 256), 3))
        img += amp * cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    # Backgrounds are far less saturated than the objects, as in most photographs.
    keep = scene.background_saturation
    img = img.mean(axis=2, keepdims=True) * (1 - keep) + img * keep
    img += rng.uniform(60, 190, size=3).astype(np.float32)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    img += (30 * (np.cos(angle) * gx / w + np.sin(angle) * gy / h))[..., None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(*scene.clutter_lines, endpoint=True))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _shape_mask(rng, name, size, h, w):
    """Mask (h, w) of one object of class `name` with longest side about `size`."""
    mask = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
    r = max(size / 2.0, 2.0)
    if name == "disk":
        cv2.ellipse(mask, (cx, cy), (int(r), int(r * rng.uniform(0.7, 1.0))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif name == "ring":
        cv2.circle(mask, (cx, cy), int(r), 1, -1)
        cv2.circle(mask, (cx, cy), int(r * 0.55), 0, -1)
    else:
        if name in ("square", "frame"):
            pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32) * 0.72
        elif name == "triangle":
            pts = np.array([[0, -1], [0.87, 0.5], [-0.87, 0.5]], np.float32)
        else:  # cross
            a, b = 1.0, 0.33
            pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a],
                            [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]], np.float32)
        t = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], np.float32)
        poly = (pts @ rot.T) * r + np.array([cx, cy], np.float32)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1, cv2.LINE_8)
        if name == "frame":  # the square with the ring's hole: a square one
            hole = (poly - np.array([cx, cy], np.float32)) * 0.55 + np.array([cx, cy], np.float32)
            cv2.fillPoly(mask, [np.round(hole).astype(np.int32)], 0, cv2.LINE_8)
    return mask.astype(bool)


def _texture(rng, base_hue, h, w):
    hue = (base_hue + int(rng.integers(-12, 13))) % 180
    hsv = np.empty((h, w, 3), np.float32)
    hsv[..., 0] = hue
    hsv[..., 1] = rng.uniform(120, 255)
    value = rng.uniform(90, 255) + rng.normal(0, 18, size=(h, w))
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    hsv[..., 2] = np.clip(value + 35 * gy, 0, 255)  # shading from above
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def make_image(rng, image_id, scene=SYNTH):
    """One scene: BGR image and its COCO annotations (boxes of the visible parts)."""
    h = int(rng.integers(*scene.image_height_range, endpoint=True))
    w = int(rng.integers(*scene.image_width_range, endpoint=True))
    img = _background(rng, h, w, scene)
    owner = np.full((h, w), -1, np.int32)  # index of the object visible at each pixel
    objects = []
    lo, hi = (math.log(s) for s in scene.object_size_range)
    for k in range(int(rng.integers(*scene.objects_per_image, endpoint=True))):
        cls = int(rng.integers(len(scene.classes)))
        mask = _shape_mask(rng, scene.classes[cls], math.exp(rng.uniform(lo, hi)), h, w)
        if mask.sum() < 4:
            continue
        hue = scene.class_hues[cls] if scene.class_hues else int(rng.integers(180))
        img[mask] = _texture(rng, hue, h, w)[mask]
        owner[mask] = k
        objects.append((k, cls, int(mask.sum())))
    annotations = []
    for k, cls, full_area in objects:
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0 or len(xs) < scene.min_visible_fraction * full_area:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append({"image_id": image_id, "category_id": cls + 1, "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs))})
    img = cv2.GaussianBlur(img, (3, 3), 0.6)  # soften aliased edges like a camera would
    return img, annotations


def generate_split(json_file, image_dir, num_images, seed, progress=None, scene=SYNTH):
    """Write `num_images` scenes of `scene` as JPEGs plus a COCO JSON; deterministic in `seed`."""
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        img, anns = make_image(rng, i + 1, scene)
        file_name = f"{i + 1:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {file_name}")
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(buf.tobytes())
        images.append({"id": i + 1, "file_name": file_name, "height": img.shape[0],
                       "width": img.shape[1]})
        for a in anns:
            a["id"] = len(annotations) + 1
            annotations.append(a)
        if progress:
            progress(i + 1, num_images)
    coco = {"info": {"description": f"{scene.title}, seed {seed}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(scene.classes)]}
    # Written last and atomically: a JSON on disk means the split is complete.
    write_atomically(json_file, "w", lambda f: json.dump(coco, f, sort_keys=True))
    return coco


def ensure_split(spec: SplitSpec, root=None, scene=SYNTH):
    json_file, image_dir = split_paths(spec.name, root, scene)
    if os.path.exists(json_file):
        return json_file, image_dir
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    # Training processes of one run all load the split: one generates it, the others wait.
    with open(os.path.join(os.path.dirname(json_file), f".{spec.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(json_file):
            logger.info("Generating the synthetic %s split of %s (%d images) in %s",
                        spec.name, scene.name, spec.num_images, os.path.dirname(json_file))
            generate_split(json_file, image_dir, spec.num_images, spec.seed, scene=scene)
    return json_file, image_dir


def register_synthetic(root=None):
    """Register ``<scene>_{train,val}`` of every scene (``msad_synth``, ``msad_detail``); their
    files are generated when first loaded."""
    for scene in SCENES:
        for spec in scene.splits:
            name = f"{scene.name}_{spec.name}"
            if name in DatasetCatalog.list():
                continue
            json_file, image_dir = split_paths(spec.name, root, scene)

            def load(spec=spec, name=name, scene=scene):
                json_file, image_dir = ensure_split(spec, root, scene)
                return load_coco_checked(json_file, image_dir, name)

            DatasetCatalog.register(name, load)
            MetadataCatalog.get(name).set(json_file=json_file, image_root=image_dir,
                                          evaluator_type="coco", thing_classes=list(scene.classes))


