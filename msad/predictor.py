"""Running a trained detector on images: ``msad.Predictor``, and the facts kept beside a checkpoint
so that it runs without its training data.

Training writes ``model_info.json`` into OUTPUT_DIR, beside the checkpoints: the class names
and the config values the weights were trained with that inference depends on.  ``Predictor``
reads it from the folder of the weights it loads: the class names come from it, and a config
that disagrees with it on what the weights mean (input format, pixel statistics, factor, number
of classes, architecture) is refused rather than run to give wrong boxes.
"""
import functools
import json
import logging
import os
from typing import List, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import Instances

from .checkpoint import SafeCheckpointer, write_atomically
from .config import NO_IMAGENET_START, inference_sizes, load_config

logger = logging.getLogger(__name__)

MODEL_INFO = "model_info.json"
# Config values inference depends on.  A config that disagrees with the weights on these runs
# but gives wrong detections: refused.
MUST_MATCH = ("MODEL.META_ARCHITECTURE", "MODEL.FCOS.NUM_CLASSES", "MODEL.FCOS.INPUT_FACTOR",
              "INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")
# ... and on these it may differ on purpose (another test size, another camera): logged.
MAY_DIFFER = ("MODEL.FCOS.INPUT_RESAMPLE", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST")


def config_value(cfg, key):
    """The value of a dotted config key, as JSON stores it (tuples become lists)."""
    return json.loads(json.dumps(functools.reduce(getattr, key.split("."), cfg)))


def dataset_id_list(metadata):
    """Class index -> the dataset's category id, as a list (None where the metadata has none)."""
    ids = metadata.get("thing_dataset_id_to_contiguous_id")
    return None if ids is None else [k for k, _ in sorted(ids.items(), key=lambda kv: kv[1])]


def dataset_id_mapping(ids):
    """The inverse of ``dataset_id_list``: Detectron2's thing_dataset_id_to_contiguous_id."""
    return ids and {k: i for i, k in enumerate(ids)}


def write_model_info(cfg, metadata):
    """Write OUTPUT_DIR/model_info.json for the model `cfg` trains on the dataset of `metadata`
    (Detectron2's: its class names and their ids in the dataset's files, where it has them)."""
    info = {"thing_classes": metadata.get("thing_classes"),
            # class index -> the dataset's category id, for COCO-format results
            "thing_dataset_ids": dataset_id_list(metadata),
            "config": {key: config_value(cfg, key) for key in MUST_MATCH + MAY_DIFFER}}
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_atomically(os.path.join(cfg.OUTPUT_DIR, MODEL_INFO), "w",
                     lambda f: json.dump(info, f, indent=2))


def read_model_info(weights):
    """(path, contents) of the model_info.json beside `weights`; (path, None) if there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), MODEL_INFO)
    if not os.path.isfile(path):
        return path, None
    try:
        with open(path) as f:
            info = json.load(f)
        return path, {"thing_classes": info["thing_classes"],
                      "thing_dataset_ids": info.get("thing_dataset_ids"),
                      "config": dict(info["config"])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a model_info.json written by msad's training: "
                         f"{type(e).__name__}: {e}") from e


def check_model_info(cfg, info, path):
    """Refuse a config that disagrees with the one the weights were trained with (`info`, read
    from `path`) on what the weights mean; log where it differs on purpose."""
    trained = info["config"]
    wrong = [f"{key} {config_value(cfg, key)!r} (trained with {trained[key]!r})"
             for key in MUST_MATCH if key in trained and config_value(cfg, key) != trained[key]]
    if wrong:
        raise ValueError(
            f"the config disagrees with {path}, written when these weights were trained: "
            + "; ".join(wrong) + ". Use the config they were trained with (their OUTPUT_DIR "
            "holds it as config.yaml), or override those keys")
    for key in MAY_DIFFER:
        if key in trained and config_value(cfg, key) != trained[key]:
            logger.info("%s is %r here, %r in training (%s)", key, config_value(cfg, key),
                        trained[key], path)


def class_metadata(cfg, info):
    """The model's class names (and the dataset's category ids, where known): from its
    model_info.json, else from a registered dataset of the config, else "class 0", "class 1"..."""
    num_classes = cfg.MODEL.FCOS.NUM_CLASSES
    known = []
    if info:
        known.append((info["thing_classes"], dataset_id_mapping(info["thing_dataset_ids"])))
    for dataset in (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN):
        metadata = MetadataCatalog.get(dataset)
        known.append((metadata.get("thing_classes"),
                      metadata.get("thing_dataset_id_to_contiguous_id")))
    for names, ids in known:
        if names and len(names) == num_classes:
            return {"thing_classes": list(names),
                    **({"thing_dataset_id_to_contiguous_id": ids} if ids else {})}
    logger.warning("No class names for the %d classes of this model (no %s beside its weights, "
                   "no registered dataset of its config with as many classes): using "
                   "'class <i>'", num_classes, MODEL_INFO)
    return {"thing_classes": [f"class {i}" for i in range(num_classes)]}


class Predictor:
    """Detectron2's ``DefaultPredictor`` for msad detectors: BGR images in, ``Instances`` out.

    Built from a config and weights (default ``cfg.MODEL.WEIGHTS``); reads the images in
    ``INPUT.FORMAT``, applies the test resize and returns boxes in the given image's pixels.
    ``input_scale="low"`` (or ``MODEL.FCOS.INPUT_SCALE low``) makes a factor-f detector take
    images that are already 1/f of its training resolution.  ``metadata.thing_classes`` names the
    classes (for Detectron2's ``Visualizer``).

        predictor = Predictor.from_files("output/x/config.yaml", "output/x/model_final.pth")
        instances = predictor(cv2.imread("image.jpg"))
    """

    def __init__(self, cfg, weights=None, input_scale=None):
        cfg = cfg.clone()
        cfg.defrost()
        if input_scale is not None:
            cfg.MODEL.FCOS.INPUT_SCALE = input_scale
        cfg.merge_from_list(NO_IMAGENET_START)  # the weights below hold every parameter
        weights = weights or cfg.MODEL.WEIGHTS
        if not weights:
            raise ValueError("Predictor needs weights: give them, or set MODEL.WEIGHTS")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights: no such file {weights}")
        info_path, info = read_model_info(weights)
        if info is not None:
            check_model_info(cfg, info, info_path)
        self.cfg = cfg
        self.metadata = Metadata(name=weights, **class_metadata(cfg, info))
        self.model = build_model(cfg).eval()
        SafeCheckpointer(self.model, source="weights", complete=True).load(weights)
        min_size, max_size = inference_sizes(cfg)
        self.resize = T.ResizeShortestEdge([min_size, min_size], max_size)
        self.input_format = cfg.INPUT.FORMAT

    @classmethod
    def from_files(cls, config_file, weights=None, opts=(), input_scale=None):
        """The predictor of a config file (with `opts` overrides) and weights."""
        return cls(load_config(config_file, opts), weights, input_scale)

    def model_input(self, image: np.ndarray) -> dict:
        """What the model is given for one BGR uint8 image (H, W, 3)."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError("Predictor takes BGR images as numpy arrays of shape (H, W, 3), got "
                             f"{type(image).__name__} {getattr(image, 'shape', '')}")
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        return {"image": tensor, "height": height, "width": width}

    def batch(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """Detections of several images in one forward pass, each in its own pixels."""
        with torch.no_grad():
            outputs = self.model([self.model_input(image) for image in images])
        return [output["instances"].to("cpu") for output in outputs]

    def __call__(self, image: np.ndarray) -> Instances:
        return self.batch([image])[0]
