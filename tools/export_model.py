#!/usr/bin/env python
"""Export a trained msad detector to TorchScript or ONNX, and check it against PyTorch.

    python tools/export_model.py --config-file output/x/config.yaml \\
        --weights output/x/model_final.pth --format onnx [--input-scale low] \\
        [--no-postprocess] [--opset 17] [--sample-image img.jpg] --output exported/x

Writes ``model.onnx`` (or ``model.ts``) and ``model.json`` into --output; ``msad_runtime.py``
(numpy, Pillow and onnxruntime, no torch) or ``tools/demo.py --weights exported/x`` runs them.
The graph is traced on --sample-image (default: a synthetic scene), then run on a second image
of another shape and compared with eager PyTorch: the number of detections and the largest box
and score differences are printed, and the export fails (exit 1, its files kept to look into) if
they disagree beyond --tolerance.  A folder that already holds an export is refused.
"""
import argparse
import json
import os
import sys

import cv2

import msad_runtime
from msad.export.exporter import (CHECK_SHAPE, DEFAULT_OPSET, MODEL_FILES, TRACE_SHAPE, agrees,
                                  check_format, check_output_folder, compare, export,
                                  predictor_for_export, synthetic_image)
from msad.modeling.alignment import INPUT_SCALES

def read(path, what):
    image = cv2.imread(path)
    if image is None:
        raise FileNotFoundError(f"{what} {path}: not a readable image")
    return image


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--format", required=True, choices=sorted(MODEL_FILES))
    parser.add_argument("--output", required=True, help="the folder to write into")
    low = "images already 1/MODEL.FCOS.INPUT_FACTOR of the training resolution"
    parser.add_argument("--input-scale", choices=INPUT_SCALES,
                        help=f"'low': export the low-resolution detector for {low}")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="output each level's raw head outputs instead of detections")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--sample-image", help="the image to trace on (default: synthetic)")
    parser.add_argument("--check-image", help="the image to compare on (default: synthetic, "
                        "of another shape than the sample)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest box/score (raw: output) difference accepted")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_format(args.format, args.opset)  # before the model is built
        check_output_folder(args.output)
        sample = read(args.sample_image, "--sample-image") if args.sample_image \
            else synthetic_image(0, TRACE_SHAPE)
        check = read(args.check_image, "--check-image") if args.check_image \
            else synthetic_image(1, CHECK_SHAPE)
        predictor = predictor_for_export(args.config_file, args.weights, args.opts,
                                         args.input_scale)
        path = export(predictor, args.format, args.output, sample, not args.no_postprocess,
                      args.opset)
        detector = msad_runtime.Detector(args.output)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"export_model: {e}")
    comparison = compare(predictor, detector, check)
    size = detector.preprocess(check).shape[1:]
    print(f"Wrote {path} and {os.path.join(args.output, msad_runtime.METADATA)} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    traced = tuple(predictor.model_input(sample)["image"].shape[1:])
    print(f"Traced at {traced[0]}x{traced[1]}, checked at {size[0]}x{size[1]} with "
          f"{detector.backend}: {json.dumps(comparison)}")
    if not agrees(comparison, args.tolerance):
        sys.exit(f"export_model: the exported model disagrees with PyTorch beyond --tolerance "
                 f"{args.tolerance}: {comparison} (its files are kept in {args.output} to look "
                 "into)")


if __name__ == "__main__":
    main()
