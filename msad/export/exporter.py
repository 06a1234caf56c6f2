"""Exporting a trained detector to TorchScript or ONNX, with the metadata to run it anywhere.

The graph is traced with Detectron2's ``TracingAdapter`` from one image and takes any size: its
input is the image as the predictor gives it to the model (channels in ``INPUT.FORMAT``, after the
test resize, CHW float32 on 0-255); normalisation, padding, the down-sampling of a low-resolution
branch (ThumbDet's learned one included) and, by default, decoding and NMS are inside it.  With
post-processing its outputs are ``boxes`` (N x 4, in the given image's pixels), ``classes``,
``scores`` and ``image_size``; without it, each level's raw head outputs (class logits, box
regression in stride units, centerness logits) for users who decode themselves.  ``model.json``
beside the file holds what running it needs (``msad_runtime.py`` reads it): class names, input
format and test resize, the model's factor and padding, the outputs, the decoding settings, and
the file's sha256.
"""
import contextlib
import json
import logging
import os
import warnings

import cv2
import numpy as np
import torch
from detectron2.data.catalog import Metadata
from detectron2.export import TracingAdapter
from detectron2.structures import Boxes, Instances

import msad_runtime

from ..checkpoint.model_info import dataset_id_list, dataset_id_mapping
from ..config import check_choice, inference_sizes, load_config
from ..data.synthetic import make_image
from ..utils.io import write_atomically
from .predictor import Predictor

logger = logging.getLogger(__name__)

MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
EXTENSIONS = tuple(os.path.splitext(f)[1] for f in MODEL_FILES.values())
# ONNX opsets the export supports: NonMaxSuppression with a dynamic number of boxes needs 11;
# the newest is the newest torch.onnx's TorchScript-based exporter writes.
MIN_OPSET = 11
DEFAULT_OPSET = 17
OUTPUT_NAMES = {"pred_boxes": "boxes", "pred_classes": "classes", "scores": "scores"}
RAW_KINDS = ("logits", "box_regression", "centerness")
# How the model decodes its raw outputs (Detectron2's FCOS), for those who decode them.
DECODING_RULE = (
    "Cell (y, x) of a level is at ((x + 0.5) * stride, (y + 0.5) * stride) in the given image's "
    "pixels; its box is (cx - l * stride, cy - t * stride, cx + r * stride, cy + b * stride) "
    "with l, t, r, b = max(box_regression, 0). A class of a cell is a candidate where "
    "sigmoid(logit) > score_thresh; its score is sqrt(sigmoid(logit) * sigmoid(centerness)). "
    "Each level keeps its topk_candidates best candidates (by the score, or by the product "
    "under the square root when topk_ranking is 'product'); then class-wise NMS at nms_thresh "
    "over all levels, and the max_detections best are kept.")


def max_opset():
    # Private, but the only place torch says which opsets its TorchScript-based exporter writes
    # (checked against torch 2.14.1; tests/test_upstream.py fails when it goes).
    from torch.onnx import _constants

    return _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


def check_format(fmt, opset):
    """Raise, naming what to change, if `fmt` cannot be written here with `opset`."""
    check_choice("--format", fmt, list(MODEL_FILES))
    if fmt != "onnx":
        return
    for package, use in (("onnx", "torch.onnx writes the file with it"),
                         ("onnxruntime", "the export is checked by running it")):
        try:
            __import__(package)
        except ImportError as e:
            raise RuntimeError(f"--format onnx needs the {package} package ({use}): pip install "
                               "onnx onnxruntime (tools/setup.sh installs both)") from e
    if not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"--opset {opset} is not supported: this export needs an opset from "
                         f"{MIN_OPSET} (NonMaxSuppression) to {max_opset()} (the newest this "
                         f"torch {torch.__version__} writes)")


def check_output_folder(output_dir):
    """Refuse a folder that holds an export already: nothing is overwritten."""
    existing = [name for name in (*MODEL_FILES.values(), msad_runtime.METADATA)
                if os.path.exists(os.path.join(output_dir, name))]
    if existing:
        raise FileExistsError(f"--output {output_dir} already holds {', '.join(existing)}: "
                              "export into another folder, or remove them")


def detections(model, image):
    """What the exported graph computes with post-processing: the image's detections."""
    return model([{"image": image}])[0]["instances"]


def raw_outputs(model, image):
    """... and without: every level's head outputs, on the padded image."""
    images = model.preprocess_image([{"image": image}])
    return tuple(model.head(model.extract(images).head_in))


def output_names(model, adapter, postprocess):
    if postprocess:  # TracingAdapter flattens Instances as its sorted fields, then image_size
        return [OUTPUT_NAMES[k] for k in adapter.outputs_schema.keys] + ["image_size"]
    return [f"{kind}_{level}" for kind in RAW_KINDS for level in model.full_resolution_levels]


def metadata(predictor, fmt, postprocess, names, opset, model_file):
    """model.json: what running the exported file needs, and where it came from."""
    cfg, model = predictor.cfg, predictor.model
    min_size, max_size = inference_sizes(cfg, model.given_factor)
    strides = [s // model.given_factor for s in model.anchor_generator.strides]
    return {
        "msad_export": msad_runtime.FORMAT_VERSION,
        "file": os.path.basename(model_file),
        "sha256": msad_runtime.file_sha256(model_file),
        "format": fmt,
        "opset": opset if fmt == "onnx" else None,
        "architecture": cfg.MODEL.META_ARCHITECTURE,
        "input": {
            "name": "image",
            "layout": "CHW float32 on 0-255, after the test resize; normalised and padded "
                      "inside the model",
            "format": cfg.INPUT.FORMAT,
            "min_size_test": min_size,
            "max_size_test": max_size,
            "input_scale": "low" if model.given_factor > 1 else "full",
            "input_factor": model.branches[0].factor,
            "size_divisibility": model.padding(),
        },
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
        "postprocess": postprocess,
        "outputs": names,
        "levels": [{"name": n, "stride": s}
                   for n, s in zip(model.full_resolution_levels, strides)],
        "decoding": {"rule": DECODING_RULE,
                     "score_thresh": model.test_score_thresh,
                     "topk_candidates": model.test_topk_candidates,
                     "topk_ranking": model.topk_ranking,
                     "nms_thresh": model.test_nms_thresh,
                     "max_detections": model.max_detections_per_image},
        "thing_classes": list(predictor.metadata.thing_classes),
        "thing_dataset_ids": dataset_id_list(predictor.metadata),
    }


@contextlib.contextmanager
def quiet_tracing():
    """Tracing warns at every Python int it records as a constant; the exported graph is
    checked against the eager model instead (``compare``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(dynamic_axes|legacy TorchScript).*")
        yield


def export(predictor: Predictor, fmt, output_dir, sample, postprocess=True,
           opset=DEFAULT_OPSET):
    """Export the predictor's model, traced on the BGR image `sample`, into `output_dir`:
    returns the model file's path (model.json is written beside it)."""
    check_format(fmt, opset)
    check_output_folder(output_dir)
    model = predictor.model  # msad.Predictor never attaches a training teacher
    image = predictor.model_input(sample)["image"]
    adapter = TracingAdapter(model, (image,), detections if postprocess else raw_outputs)
    adapter.eval()
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, MODEL_FILES[fmt])
    with torch.no_grad(), quiet_tracing():
        adapter(image)  # sets the output schema
        names = output_names(model, adapter, postprocess)
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
            write_atomically(path, "wb", lambda f: torch.jit.save(traced, f))
        else:
            dynamic = {"image": {1: "height", 2: "width"}}
            write_atomically(path, "wb", lambda f: torch.onnx.export(
                adapter, (image,), f, input_names=["image"], output_names=names,
                dynamic_axes=dynamic, opset_version=opset, dynamo=False))
    info = metadata(predictor, fmt, postprocess, names, opset, path)
    write_atomically(os.path.join(output_dir, msad_runtime.METADATA), "w",
                     lambda f: json.dump(info, f, indent=2))
    return path


def eager_raw(predictor, image):
    """The eager model's raw outputs for a BGR image, in export order."""
    with torch.no_grad():
        outputs = raw_outputs(predictor.model, predictor.model_input(image)["image"])
    return [t.numpy() for level_outputs in outputs for t in level_outputs]


def compare(predictor: Predictor, detector: "msad_runtime.Detector", image):
    """How far the exported model is from the eager one on a BGR image: a dict with the number
    of detections of each and the largest box and score differences (raw exports: the largest
    difference of any output)."""
    if not detector.metadata["postprocess"]:
        exported = detector.run(detector.preprocess(image))
        eager = eager_raw(predictor, image)
        same = len(exported) == len(eager) and all(
            a.shape == b.shape for a, b in zip(exported, eager))
        return {"outputs": len(eager), "shapes_equal": same, "max_output_diff": max(
            (float(np.abs(a - b).max()) for a, b in zip(exported, eager)), default=0.0)
            if same else float("inf")}
    found, instances = detector(image), predictor(image)
    result = {"detections": len(found.scores), "eager_detections": len(instances)}
    if len(found.scores) == len(instances):
        result.update(
            classes_equal=bool((found.classes == instances.pred_classes.numpy()).all()),
            max_box_diff=float(np.abs(found.boxes - instances.pred_boxes.tensor.numpy()).max(
                initial=0.0)),
            max_score_diff=float(np.abs(found.scores - instances.scores.numpy()).max(
                initial=0.0)))
    return result


def agrees(comparison, tolerance):
    """Whether a ``compare`` result means the same detections within `tolerance`."""
    if "outputs" in comparison:
        return comparison["shapes_equal"] and comparison["max_output_diff"] <= tolerance
    return (comparison["detections"] == comparison["eager_detections"]
            and comparison.get("classes_equal", True)
            and max(comparison.get("max_box_diff", 0), comparison.get("max_score_diff", 0))
            <= tolerance)


def predictor_for_export(config_file, weights, opts=(), input_scale=None):
    """The predictor whose model is exported: on the CPU, without a training teacher."""
    cfg = load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    return Predictor(cfg, weights, input_scale)


def is_export(path):
    """Whether `path` names an exported model (its folder or file) rather than a checkpoint."""
    return os.path.isdir(path) or path.endswith(EXTENSIONS + (msad_runtime.METADATA,))


class ExportedPredictor:
    """An exported model run by ``msad_runtime`` behind ``msad.Predictor``'s interface: BGR
    images in, ``Instances`` in their pixels out, ``metadata`` for Detectron2's ``Visualizer``."""

    def __init__(self, path, backend=None):
        self.detector = msad_runtime.Detector(path, backend)
        meta = self.detector.metadata
        ids = dataset_id_mapping(meta["thing_dataset_ids"])
        self.metadata = Metadata(name=self.detector.model_path,
                                 thing_classes=meta["thing_classes"],
                                 **({"thing_dataset_id_to_contiguous_id": ids} if ids else {}))

    def __call__(self, image: np.ndarray) -> Instances:
        found = self.detector(image)
        return Instances(image.shape[:2], pred_boxes=Boxes(torch.from_numpy(found.boxes)),
                         scores=torch.from_numpy(found.scores),
                         pred_classes=torch.from_numpy(found.classes))


# The trace and check images' shapes (H, W): landscape and portrait, so that after the test
# resize the check runs the graph at another size than it was traced at.
TRACE_SHAPE, CHECK_SHAPE = (480, 640), (600, 400)


def synthetic_image(seed, shape):
    """A bundled-data-like scene (shapes on a textured background), resized to `shape`."""
    image, _ = make_image(np.random.default_rng(seed), seed)
    return cv2.resize(image, shape[::-1], interpolation=cv2.INTER_LINEAR)
