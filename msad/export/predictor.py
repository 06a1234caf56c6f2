"""Running a trained detector on images: ``msad.Predictor``.

It reads the ``model_info.json`` beside the weights it loads (msad/checkpoint/model_info.py): the
class names come from it, and a config that disagrees with it on what the weights mean is
refused rather than run to give wrong boxes.
"""
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

from ..checkpoint.detection_checkpoint import SafeCheckpointer
from ..checkpoint.model_info import (MODEL_INFO, check_model_info, dataset_id_mapping,
                                     read_model_info)
from ..config import NO_IMAGENET_START, inference_sizes, load_config

logger = logging.getLogger(__name__)


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
        min_size, max_size = inference_sizes(cfg, self.model.given_factor)
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
