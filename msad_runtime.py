"""Run a detector exported by msad's ``tools/export_model.py``, without PyTorch or Detectron2.

One file, so that it can be copied onto the machine that runs the model, beside the folder the
export wrote (``model.onnx`` or ``model.ts``, and ``model.json``).  It needs numpy, Pillow (the
resize Detectron2 applies at test time, so that the model is given the pixels it was evaluated
on) and a backend: onnxruntime or OpenVINO for ONNX files, torch only for TorchScript files.

    from msad_runtime import Detector
    detector = Detector("exported/student")       # the export's folder, or its model file
    found = detector(cv2.imread("street.jpg"))    # a BGR uint8 image, as OpenCV reads it
    for box, score, name in zip(found.boxes, found.scores, found.class_names):
        ...                                       # box: x0, y0, x1, y1 in the image's pixels
"""
import hashlib
import json
import math
import os
from typing import List, NamedTuple

import numpy as np
from PIL import Image, ImageOps

METADATA = "model.json"
FORMAT_VERSION = 1
# Backends able to run each export format; the first is the default.
BACKENDS = {"onnx": ("onnxruntime", "openvino"), "torchscript": ("torchscript",)}


class ExportError(ValueError):
    """An exported model that cannot be used as its metadata says."""


class Detections(NamedTuple):
    boxes: np.ndarray  # (N, 4) float32: x0, y0, x1, y1 in the given image's pixels
    scores: np.ndarray  # (N,) float32, sorted from the highest
    classes: np.ndarray  # (N,) int64 class indices
    class_names: List[str]  # (N,)


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path):
    """(model file, metadata) of an export: `path` is its folder, its model file or its
    model.json."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    meta_path = os.path.join(folder, METADATA)
    if not os.path.isfile(meta_path):
        raise ExportError(f"{path}: no {METADATA} beside it; export the model with "
                          "tools/export_model.py, which writes one")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        version, model_file = meta["msad_export"], meta["file"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{meta_path} is not the metadata of an msad export "
                          f"({type(e).__name__}: {e})") from e
    if version != FORMAT_VERSION:
        raise ExportError(f"{meta_path}: export format version {version}; this runtime reads "
                          f"version {FORMAT_VERSION}")
    model_path = os.path.join(folder, model_file)
    if not os.path.isdir(path) and os.path.basename(path) not in (METADATA, model_file):
        raise ExportError(f"{path}: {meta_path} describes {model_file}, not this file")
    if not os.path.isfile(model_path):
        raise ExportError(f"{meta_path} describes {model_path}, which does not exist")
    return model_path, meta


def backend_package(name):
    """The module of a backend, or an ExportError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ExportError(f"this backend needs the {name} package (pip install {name})") from e


def p90(values):
    """The 90th percentile of a list of numbers: the smallest value at least 90 % of them do
    not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def resized_shape(height, width, short_edge, max_size):
    """(height, width) after Detectron2's ResizeShortestEdge (short edge 0: unchanged)."""
    if short_edge == 0:
        return height, width
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


class Detector:
    """An exported msad detector: BGR uint8 images in, ``Detections`` in their pixels out.

    Args:
        path: the export's folder, its model file or its model.json.
        backend: "onnxruntime" (default for ONNX), "openvino" or "torchscript".
        device: onnxruntime providers (default: CUDA when onnxruntime has it, else CPU) or an
            OpenVINO device name (default "CPU"); ignored by TorchScript (CPU).
    """

    def __init__(self, path, backend=None, device=None):
        self.model_path, self.metadata = read_metadata(path)
        meta = self.metadata
        actual = file_sha256(self.model_path)
        if actual != meta["sha256"]:
            raise ExportError(
                f"{self.model_path} is not the file its {METADATA} describes (sha256 {actual[:12]}"
                f"..., expected {meta['sha256'][:12]}...): export the model again, or keep each "
                "model file with its own metadata")
        if meta.get("format") not in BACKENDS:
            raise ExportError(f"{self.model_path}: its {METADATA} names format "
                              f"{meta.get('format')!r}, not one of {list(BACKENDS)}")
        backends = BACKENDS[meta["format"]]
        self.backend = backend or backends[0]
        if self.backend not in backends:
            raise ExportError(f"a {meta['format']} model runs with {list(backends)}, "
                              f"not {self.backend!r}")
        self.run = getattr(self, f"_load_{self.backend}")(device)
        self.input = meta["input"]
        self.class_names = meta["thing_classes"]

    # ---- backends: each returns a function from the CHW float32 image to the output arrays --
    def _load_onnxruntime(self, device):
        onnxruntime = backend_package("onnxruntime")

        providers = device or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                               if p in onnxruntime.get_available_providers()]
        session = onnxruntime.InferenceSession(self.model_path, providers=providers)
        names = [o.name for o in session.get_outputs()]
        self._check_outputs(names)
        input_name = session.get_inputs()[0].name
        return lambda image: session.run(None, {input_name: image})

    def _load_openvino(self, device):
        openvino = backend_package("openvino")

        # f32: OpenVINO would otherwise run in bf16 on CPUs that have it, off by ~1e-3.
        compiled = openvino.Core().compile_model(self.model_path, device or "CPU",
                                                 {"INFERENCE_PRECISION_HINT": "f32"})
        # An OpenVINO output may carry several names: the ONNX one is among them.
        self._check_outputs([next((n for n in self.metadata["outputs"] if n in o.get_names()),
                                  o.get_any_name()) for o in compiled.outputs])
        request = compiled.create_infer_request()

        def run(image):
            results = request.infer([image])
            return [np.asarray(results[o]) for o in compiled.outputs]
        return run

    def _load_torchscript(self, device):
        torch = backend_package("torch")
        backend_package("torchvision")  # registers the torchvision::nms the graph calls

        module = torch.jit.load(self.model_path, map_location="cpu").eval()

        def run(image):
            with torch.no_grad():
                outputs = module(torch.from_numpy(image))
            return [o.numpy() for o in outputs]
        return run

    def _check_outputs(self, names):
        if names != self.metadata["outputs"]:
            raise ExportError(f"{self.model_path} has outputs {names}, its {METADATA} says "
                              f"{self.metadata['outputs']}")

    # ---- the pipeline ------------------------------------------------------------------------
    def preprocess(self, image):
        """The model's input for a BGR uint8 (H, W, 3) image: in the training channel order,
        resized as Detectron2's test resize does, CHW float32 (normalised inside the model)."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                and image.dtype == np.uint8):
            raise ValueError("Detector takes BGR uint8 images of shape (H, W, 3), got "
                             f"{type(image).__name__} {getattr(image, 'shape', '')} "
                             f"{getattr(image, 'dtype', '')}")
        if self.input["format"] == "RGB":
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        new_h, new_w = resized_shape(height, width, self.input["min_size_test"],
                                     self.input["max_size_test"])
        if (new_h, new_w) != (height, width):
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
                (new_w, new_h), Image.BILINEAR))
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, image) -> Detections:
        if not self.metadata["postprocess"]:
            raise ExportError(f"{self.model_path} was exported with --no-postprocess: its "
                              "outputs are the raw per-level maps (Detector.run gives them)")
        chw = self.preprocess(image)
        outputs = dict(zip(self.metadata["outputs"], self.run(chw)))
        boxes = outputs["boxes"].astype(np.float32).reshape(-1, 4)
        # The model answers in the pixels of the image it was given: scale back to the caller's.
        boxes *= np.array([image.shape[1] / chw.shape[2], image.shape[0] / chw.shape[1]] * 2,
                          dtype=np.float32)
        classes = outputs["classes"].astype(np.int64)
        return Detections(boxes, outputs["scores"].astype(np.float32), classes,
                          [self.class_names[c] for c in classes])


def peak_rss_mb():
    """This process's peak resident memory in MiB: VmHWM, which a new program starts afresh
    (getrusage's maxrss keeps the parent's peak through fork and exec), where Linux has it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    """python msad_runtime.py EXPORT IMAGE... [--backend B] [--benchmark RUNS]: print each
    image's detections as JSON lines, or time the model on the first image (one JSON line:
    latency of the model alone, median and p90 in ms, and this process's peak RSS in MiB)."""
    import argparse
    import statistics
    import time

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("export", help="the export's folder or model file")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--backend", help="onnxruntime, openvino or torchscript")
    parser.add_argument("--benchmark", type=int, metavar="RUNS", help="time RUNS runs")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        detector = Detector(args.export, args.backend)
        images = []
        for path in args.images:
            # Upright as its EXIF orientation says, BGR: as OpenCV and Detectron2 read it.
            image = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[:, :, ::-1]
            images.append(np.ascontiguousarray(image))
    except (ExportError, OSError) as e:
        raise SystemExit(f"msad_runtime: {e}")
    if args.benchmark:
        chw = detector.preprocess(images[0])
        times = []
        for i in range(args.warmup + args.benchmark):
            start = time.perf_counter()
            detector.run(chw)
            if i >= args.warmup:
                times.append(1000 * (time.perf_counter() - start))
        print(json.dumps({"backend": detector.backend, "input": list(chw.shape[1:]),
                          "latency_ms_median": statistics.median(times),
                          "latency_ms_p90": p90(times),
                          "peak_memory_mb": peak_rss_mb()}))
        return
    for path, image in zip(args.images, images):
        found = detector(image)
        print(json.dumps({"file": path, "detections": [
            {"bbox": [round(float(v), 2) for v in box], "score": round(float(score), 4),
             "class": name} for box, score, name in zip(*found[:2], found.class_names)]}))


if __name__ == "__main__":
    main()
