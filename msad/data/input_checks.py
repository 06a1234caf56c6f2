"""Training and test data that fail early and by name, or are repaired and counted.

* Image files: a missing file is found before training starts; an unreadable one (truncated,
  not an image, another size than its record says) when the data loader reaches it.  Either
  stops the run naming the file (``DATALOADER.BAD_IMAGES raise``), or, in training with
  ``DATALOADER.BAD_IMAGES skip``, is left out and counted in the log.  Evaluation always stops:
  a skipped image would silently change the metrics.
* Grayscale, palette and 4-channel images are converted to ``INPUT.FORMAT`` by Detectron2's
  ``read_image`` (PIL ``convert``); nothing here needs to handle them.
* Boxes are clipped to their image; boxes of zero or negative size, or wholly outside the image,
  are dropped.  Both are counted in the log.  Images left without boxes follow
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` as in Detectron2.
"""
import copy
import logging
import math
import os

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image

from ..config import inference_sizes

EXIF_ORIENTATION = 0x0112

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("raise", "skip")


class BadImageError(ValueError):
    """An image file that cannot be used, named in the message."""


def is_bad_image_error(error):
    """True for errors about the image itself: missing, not an image, truncated, corrupt (PIL
    raises OSErrors without an errno), of another size than its record."""
    return isinstance(error, (FileNotFoundError, SizeMismatchError)) or (
        isinstance(error, OSError) and error.errno is None)


def check_bad_image_policy(policy):
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"DATALOADER.BAD_IMAGES={policy!r} is not one of {BAD_IMAGE_POLICIES}")
    return policy


def _clipped_box(annotation, height, width):
    """(the annotation's box as XYXY, that box clipped to the image or None if nothing of it is
    left)."""
    box = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)
    if not all(math.isfinite(v) for v in box):
        return box, None
    x0, y0, x1, y1 = (min(max(v, 0.0), limit) for v, limit in zip(box, (width, height) * 2))
    if x1 <= x0 or y1 <= y0:
        return box, None
    return box, [x0, y0, x1, y1]


def upright_size(path):
    """(width, height) of an image file after its EXIF rotation, as Detectron2 reads it, from
    the file's header; OSError if it cannot be read."""
    with Image.open(path) as image:
        width, height = image.size
        transposed = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    return (height, width) if transposed else (width, height)


def _record_size(record):
    """(height, width) from the record, or else from the image file's header; None if the file
    cannot be read."""
    if "height" in record and "width" in record:
        return record["height"], record["width"]
    try:
        width, height = upright_size(record["file_name"])
    except OSError:
        return None
    return height, width


def check_training_records(dataset_dicts, bad_images="raise"):
    """Dataset dicts with missing images handled by `bad_images` and boxes clipped or dropped.

    The input list is not modified.  Counts (and a few examples) go to the log.
    """
    check_bad_image_policy(bad_images)
    missing = {d["file_name"] for d in dataset_dicts if not os.path.isfile(d["file_name"])}
    if missing and bad_images == "raise":
        raise BadImageError(f"{len(missing)} of {len(dataset_dicts)} training images do not exist, "
                            f"e.g. {sorted(missing)[:3]}; set DATALOADER.BAD_IMAGES skip to train "
                            "without them")
    if missing:
        logger.warning("Skipping %d training images whose files do not exist, e.g. %s",
                       len(missing), sorted(missing)[:3])
    checked, clipped, dropped = [], [], []
    for record in dataset_dicts:
        if record["file_name"] in missing:
            continue
        record = copy.copy(record)
        kept = []
        size = _record_size(record) if record.get("annotations") else None
        for annotation in record.get("annotations", []):
            if size is None:  # unreadable: the data mapper stops or skips it by name
                kept.append(annotation)
                continue
            box, clipped_box = _clipped_box(annotation, *size)
            example = f"{os.path.basename(record['file_name'])} {list(annotation['bbox'])}"
            if clipped_box is None:
                dropped.append(example)
                continue
            if clipped_box != box:
                clipped.append(example)
                annotation = {**annotation, "bbox": clipped_box, "bbox_mode": BoxMode.XYXY_ABS}
            kept.append(annotation)
        if "annotations" in record:
            record["annotations"] = kept
        checked.append(record)
    if clipped:
        logger.warning("Clipped %d boxes that extend outside their image, e.g. %s",
                       len(clipped), clipped[:3])
    if dropped:
        logger.warning("Dropped %d boxes of zero or negative size or outside their image, e.g. %s",
                       len(dropped), dropped[:3])
    return checked


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` that names the file of an image it cannot use.

    With ``bad_images="skip"`` (training only) it returns None for such an image, so that
    Detectron2's ``MapDataset`` takes another one, and counts them in the log.
    """

    @configurable
    def __init__(self, is_train: bool, *, bad_images: str = "raise", **kwargs):
        super().__init__(is_train, **kwargs)
        self.bad_images = check_bad_image_policy(bad_images)
        self.skipped = set()  # files skipped by this copy of the mapper (one per loader worker)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if not is_train:  # the test resize of the images the detector is given
            cfg = cfg.clone()
            cfg.defrost()
            cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = inference_sizes(cfg)
        kwargs = super().from_config(cfg, is_train)
        kwargs["bad_images"] = cfg.DATALOADER.BAD_IMAGES if is_train else "raise"
        return kwargs

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SizeMismatchError) as e:
            if not is_bad_image_error(e):
                raise  # the machine's trouble (open files, I/O, permissions), not the image's
            message = f"cannot use image {dataset_dict['file_name']}: {type(e).__name__}: {e}"
            if self.bad_images == "raise":
                hint = "; set DATALOADER.BAD_IMAGES skip to skip it" if self.is_train else ""
                raise BadImageError(message + hint) from e
            if dataset_dict["file_name"] not in self.skipped:  # each epoch meets it again
                self.skipped.add(dataset_dict["file_name"])
                logger.warning("%s; skipped (%d bad images skipped by this data-loader worker)",
                               message, len(self.skipped))
            return None
