#!/usr/bin/env python
"""Run a trained msad detector on your pictures, a video or a webcam, and draw what it finds.

    python tools/demo.py --config-file output/quickstart/seed0/student/config.yaml \\
        --weights output/quickstart/seed0/student/model_final.pth \\
        --input photos/ "more/*.png" one.jpg --output out/ [--confidence-threshold 0.5]
    python tools/demo.py ... --video-input clip.mp4 --output out/clip.mp4
    python tools/demo.py ... --input small/ --input-scale low --output out/   # already 1/f images
    python tools/demo.py --weights exported/student --input photos/ --output out/   # an export

Writes one picture per image (or one video) with the detections drawn by Detectron2's
``Visualizer`` and the model's class names, plus a COCO-results JSON (``detections.json`` in an
output folder, ``<name>.json`` beside an output file): one entry per detection with the file
(and frame), the box [x, y, w, h] in the input's pixels, score, category id and name.  Only
detections scoring at least --confidence-threshold are drawn and listed.  A progress bar shows
images (frames) per second; the end prints the model's latency per image (median, p90).

A file in a folder that is not a readable image is skipped and counted (--strict stops on it);
missing inputs, an empty folder, a glob that matches nothing, a video OpenCV cannot open, and an
--output that would overwrite an input stop before the model is loaded.  Without --output the
results are shown in a window, which needs an OpenCV built with a GUI (not the headless one
tools/setup.sh installs).

--weights may name a model exported by tools/export_model.py (its folder, model.onnx or model.ts):
it runs with msad_runtime (onnxruntime, --backend openvino, or TorchScript) and needs no config.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import time

import cv2
import numpy as np
import tqdm

import msad  # noqa: F401  (first: it registers the bundled data and quiets upstream notices)
import msad_runtime
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import Visualizer
from msad.data.coco import coco_results
from msad.data.label_formats import IMAGE_EXTENSIONS
from msad.export.exporter import ExportedPredictor, is_export
from msad.export.predictor import Predictor
from msad.modeling.alignment import INPUT_SCALES
from msad.utils.io import write_atomically

# Codecs tried in turn for a video: (fourcc, file extension).  Headless OpenCV wheels have no
# H.264 encoder; mp4v, else Motion JPEG, is what they can write.
VIDEO_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))
WINDOW = "msad demo"


class DemoError(Exception):
    """A problem with the demo's inputs or outputs, reported as one line."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file",
                        help="the model's config (its training OUTPUT_DIR holds it as config.yaml)"
                        "; not for an exported model")
    parser.add_argument("--weights", required=True,
                        help="the model's checkpoint, or an exported model (folder or file)")
    parser.add_argument("--backend", help="an exported model's runtime: onnxruntime (default "
                        "for ONNX), openvino or torchscript")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders and glob patterns")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0")
    parser.add_argument("--output", help="a folder, or a file for one image or a video; "
                        "default: show the results in a window")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="draw and list detections scoring at least this (default 0.5)")
    parser.add_argument("--input-scale", choices=INPUT_SCALES,
                        help="'low': the images are already 1/MODEL.FCOS.INPUT_FACTOR of the "
                        "training resolution (default: the config's MODEL.FCOS.INPUT_SCALE)")
    parser.add_argument("--draw-scale", type=float, default=1.0,
                        help="draw pictures and videos this many times the input's size (for "
                        "small images, whose labels would cover them); boxes in the JSON stay in "
                        "the input's pixels")
    parser.add_argument("--strict", action="store_true",
                        help="stop at a file that is not a readable image instead of skipping it")
    parser.add_argument("--max-frames", type=int, help="stop a video or webcam after this many")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


# ---- inputs and outputs, resolved before the model is loaded -----------------------------------
def expand_inputs(items):
    """The files named by --input: files as given, a folder's files (sorted, not hidden), a glob's
    matches (sorted)."""
    files = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n) for n in os.listdir(item)
                           if not n.startswith(".") and os.path.isfile(os.path.join(item, n)))
            if not found:
                raise DemoError(f"--input {item}: the folder holds no file")
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not found:
                raise DemoError(f"--input {item}: the pattern matches no file")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise DemoError(f"--input {item}: no such file or folder")
        files.extend(found)
    return files


def picture_paths(files, output):
    """Where each input's picture goes, and the JSON: in the folder `output`, or at `output`
    itself for one image given a file name with an image extension."""
    if len(files) == 1 and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS \
            and not os.path.isdir(output):
        return [output], os.path.splitext(output)[0] + ".json"
    if os.path.isfile(output):
        raise DemoError(f"--output {output} is a file: several images need a folder")
    paths, used = [], set()
    for f in files:
        stem, ext = os.path.splitext(os.path.basename(f))
        name, k = stem + ext, 1
        while name in used:  # the same name in two input folders
            name, k = f"{stem}_{k}{ext}", k + 1
        used.add(name)
        paths.append(os.path.join(output, name))
    return paths, os.path.join(output, "detections.json")


def check_not_inputs(outputs, inputs):
    """Refuse outputs that would replace an input."""
    given = {os.path.realpath(p) for p in inputs}
    for path in outputs:
        if os.path.realpath(path) in given:
            raise DemoError(f"--output would overwrite the input {path}: choose another folder")


def has_gui():
    try:
        cv2.namedWindow(WINDOW)
        return True
    except cv2.error:
        return False


def open_video(source, what):
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise DemoError(f"{what}: OpenCV cannot open it as a video")
    return capture


def video_paths(output, stem):
    """The video file for `output` (a folder gets <stem>.mp4) and its fall-backs, one per codec
    of VIDEO_CODECS: mp4v writes the .mp4 itself, MJPG an .avi of the same name."""
    path = os.path.join(output, stem + ".mp4") if os.path.isdir(output) or not \
        os.path.splitext(output)[1] else output
    candidates = []
    for fourcc, ext in VIDEO_CODECS:
        if path.lower().endswith(ext):
            candidates.append((fourcc, path))
        elif fourcc == "MJPG":
            candidates.append((fourcc, os.path.splitext(path)[0] + ext))
    return candidates


def video_writer(candidates, fps, size):
    """(an opened cv2.VideoWriter, its path, its codec), the first of `candidates` that opens."""
    os.makedirs(os.path.dirname(os.path.abspath(candidates[0][1])), exist_ok=True)
    for fourcc, path in candidates:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if writer.isOpened():
            return writer, path, fourcc
        writer.release()
    raise DemoError(f"--output {candidates[0][1]}: this OpenCV can write none of the codecs "
                    f"{[c for c, _ in candidates]}")


# ---- detections --------------------------------------------------------------------------------
def confident(instances, threshold):
    return instances[instances.scores >= threshold]


def enlarged(image, instances, scale):
    """The image and its detections `scale` times larger, for drawing (Detectron2's
    VideoVisualizer has no scale of its own)."""
    if scale == 1:
        return image, instances
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    boxes = Boxes(instances.pred_boxes.tensor * scale)
    return image, Instances(image.shape[:2], pred_boxes=boxes, scores=instances.scores,
                            pred_classes=instances.pred_classes)


def latency_summary(latencies, count, seconds, unit):
    ms = [1000 * t for t in latencies]
    return (f"{count} {unit} in {seconds:.1f} s ({count / seconds:.2f} {unit}/s end to end); "
            f"model latency per {unit[:-1]}: median {statistics.median(ms):.1f} ms, "
            f"p90 {msad_runtime.p90(ms):.1f} ms")


class Timer:
    """Runs the predictor and keeps its latencies."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.latencies = []

    def __call__(self, image):
        start = time.perf_counter()
        instances = self.predictor(image)
        self.latencies.append(time.perf_counter() - start)
        return instances


def run_images(args, predictor, files, pictures, json_path):
    """Detect, draw and list every image of `files`: pictures to `pictures` (None: a window)."""
    timer, results, skipped = Timer(predictor), [], []
    start = time.perf_counter()
    bar = tqdm.tqdm(files, unit="img", dynamic_ncols=True, disable=len(files) == 1)
    for index, path in enumerate(bar):
        try:
            image = read_image(path, format="BGR")
        except (OSError, ValueError) as e:  # not an image, truncated, unsupported mode
            if args.strict:
                raise DemoError(f"cannot read {path} as an image: {e}") from e
            skipped.append(path)
            bar.write(f"skipping {path}: not a readable image ({type(e).__name__})")
            continue
        instances = confident(timer(image), args.confidence_threshold)
        results += coco_results(instances, predictor.metadata, file_name=path, image_id=index + 1)
        drawn = Visualizer(image[:, :, ::-1], predictor.metadata,
                           scale=args.draw_scale).draw_instance_predictions(
            instances).get_image()[:, :, ::-1]
        if pictures:
            os.makedirs(os.path.dirname(os.path.abspath(pictures[index])), exist_ok=True)
            if not cv2.imwrite(pictures[index], drawn):
                raise DemoError(f"--output: OpenCV cannot write {pictures[index]}")
        else:
            cv2.imshow(WINDOW, drawn)
            if cv2.waitKey(0) == 27:  # Esc
                break
        bar.set_postfix_str(f"{len(results)} detections")
    if not timer.latencies:
        raise DemoError(f"none of the {len(files)} input files is a readable image")
    if json_path:
        write_atomically(json_path, "w", lambda f: json.dump(results, f))
        print(f"Wrote {len(timer.latencies)} pictures to "
              f"{os.path.dirname(pictures[0]) or '.'} and {len(results)} detections to {json_path}")
    print(latency_summary(timer.latencies, len(timer.latencies), time.perf_counter() - start,
                          "images"))
    if skipped:
        what = "file that is not a readable image" if len(skipped) == 1 else \
            "files that are not readable images"
        print(f"Skipped {len(skipped)} {what}: {skipped[:5]}{' ...' if len(skipped) > 5 else ''}")


def run_video(args, predictor, capture, name, candidates):
    """Detect and draw every frame: the video to the first of `candidates` that opens (None: a
    window)."""
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if args.max_frames:
        total = min(total, args.max_frames) if total > 0 else args.max_frames
    visualizer = VideoVisualizer(predictor.metadata)
    timer, results, writer, path = Timer(predictor), [], None, None
    start = time.perf_counter()
    bar = tqdm.tqdm(total=total if total > 0 else None, unit="frame", dynamic_ncols=True)
    frame_index = 0
    try:
        while not args.max_frames or frame_index < args.max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            instances = confident(timer(frame), args.confidence_threshold)
            results += coco_results(instances, predictor.metadata, file_name=name,
                                    frame=frame_index)
            drawn = visualizer.draw_instance_predictions(
                *enlarged(frame[:, :, ::-1], instances, args.draw_scale))
            drawn = np.ascontiguousarray(drawn.get_image()[:, :, ::-1])
            if candidates:
                if writer is None:  # the frame size is known now
                    writer, path, codec = video_writer(candidates, fps,
                                                       (drawn.shape[1], drawn.shape[0]))
                    bar.write(f"Writing {path} (codec {codec}, {fps:g} frames/s)")
                writer.write(drawn)
            else:
                cv2.imshow(WINDOW, drawn)
                if cv2.waitKey(1) == 27:
                    break
            frame_index += 1
            bar.update(1)
    except KeyboardInterrupt:  # a webcam runs until stopped: keep what was written
        bar.write("Interrupted")
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    if not frame_index:
        raise DemoError(f"{name}: no frame could be read")
    if path:
        json_path = os.path.splitext(path)[0] + ".json"
        write_atomically(json_path, "w", lambda f: json.dump(results, f))
        print(f"Wrote {frame_index} frames to {path} and {len(results)} detections to {json_path}")
    print(latency_summary(timer.latencies, frame_index, time.perf_counter() - start, "frames"))


def load_predictor(args):
    """msad.Predictor for a checkpoint and its config; ExportedPredictor for an export."""
    if not is_export(args.weights):
        if not args.config_file:
            raise DemoError("--config-file: a checkpoint needs its config (an exported model "
                            "does not)")
        return Predictor.from_files(args.config_file, args.weights, args.opts, args.input_scale)
    extra = [flag for flag, given in (("--config-file", args.config_file), ("--opts", args.opts))
             if given]
    if extra:
        raise DemoError(f"--weights {args.weights} is an exported model, which carries its "
                        f"settings in its model.json: drop {' and '.join(extra)}")
    predictor = ExportedPredictor(args.weights, args.backend)
    exported_scale = predictor.detector.input["input_scale"]
    if args.input_scale and args.input_scale != exported_scale:
        raise DemoError(f"--input-scale {args.input_scale}: {args.weights} was exported for "
                        f"input scale {exported_scale!r} (export it again with --input-scale "
                        f"{args.input_scale})")
    return predictor


def main(argv=None):
    args = parse_args(argv)
    try:
        # Inputs and outputs first: a mistake there is found before the model is loaded.
        if not args.output and not has_gui():
            raise DemoError("this OpenCV has no GUI (headless) to show the results in: "
                            "give --output")
        if args.input:
            files = expand_inputs(args.input)
            pictures, json_path = picture_paths(files, args.output) if args.output else (None, None)
            if pictures:
                check_not_inputs(pictures + [json_path], files)
        else:
            name = args.video_input or "webcam"
            if args.video_input and not os.path.isfile(args.video_input):
                raise DemoError(f"--video-input {args.video_input}: no such file")
            candidates = video_paths(args.output, os.path.splitext(os.path.basename(name))[0]) \
                if args.output else None
            if candidates:
                check_not_inputs([p for _, p in candidates] +
                                 [os.path.splitext(candidates[0][1])[0] + ".json"], [name])
            capture = open_video(args.video_input or 0, f"--video-input {args.video_input}"
                                 if args.video_input else "--webcam: camera 0")
        predictor = load_predictor(args)
        if args.input:
            run_images(args, predictor, files, pictures, json_path)
        else:
            run_video(args, predictor, capture, name, candidates)
    # Bad inputs, configs and weights: one line naming the file, key or value.
    except (DemoError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"demo: {e}")


if __name__ == "__main__":
    main()
