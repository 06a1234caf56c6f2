#!/usr/bin/env python
"""Inference latency, throughput and peak memory of several configs, side by side.

    python tools/benchmark.py --configs configs/MSAD/HR-FCOS-R50.yaml configs/MSAD/SLR100-50-T.yaml \\
        configs/MSAD/SLR100-50-S.yaml [--device cpu|cuda] [--size 800 1333] [--batch 4] [--train]
    python tools/benchmark.py --configs configs/MSAD/SLR100-50-S.yaml configs/MSAD/SLR100-50-S.yaml:low \\
        --runtimes eager torchscript onnxruntime openvino

Every config is measured in one run, each in a fresh process (so that peak memory is its own),
and reported with ratios to the first: on shared, noisy machines only ratios measured side by
side mean anything.  Latency: median and p90 over --runs single images after --warmup; throughput:
images per second at --batch; peak memory of inference: CUDA peak allocated on a GPU, peak RSS
on the CPU.  --train adds the time and peak memory of one training step (forward, backward,
SGD) at --batch; students get a
teacher of their teacher's config, randomly initialised (its cost, not its accuracy, matters).
--compile (inference only), --channels-last and --amp (CUDA) apply to every model and are
reported.  Weights
are random: speed does not depend on them.

--runtimes adds the exported model (tools/export_model.py, with post-processing) run by
TorchScript, onnxruntime or OpenVINO (those installed) beside eager PyTorch, on the CPU: each is
timed on one image by ``msad_runtime.py --benchmark`` in a process of its own (onnxruntime and
OpenVINO without torch, so their peak memory is theirs) and compared with eager on the same
config and input.  A config followed by ":low" is given images already 1/MODEL.FCOS.INPUT_FACTOR
of --size (its low-resolution input, MODEL.FCOS.INPUT_SCALE low).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

import msad  # noqa: F401  (first: it registers the bundled data and quiets upstream notices)
import msad_runtime
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from msad.checkpoint.detection_checkpoint import SafeCheckpointer
from msad.config import NO_IMAGENET_START, REPO, load_config
from msad.export.exporter import export, predictor_for_export

RUNTIMES = ("eager", "torchscript", "onnxruntime", "openvino")
EXPORT_FORMATS = {"torchscript": "torchscript", "onnxruntime": "onnx", "openvino": "onnx"}
RUNTIME_PACKAGES = {"torchscript": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def config_spec(spec):
    """(config file, input scale) of a --configs entry: "file.yaml" or "file.yaml:low"."""
    path, _, scale = spec.partition(":")
    return path, scale or "full"


def input_size(model, size):
    """The benchmark image's (H, W): --size, or as much smaller as the model is given images
    (its low-resolution input)."""
    return tuple(math.ceil(s / model.given_factor) for s in size)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def inputs(batch, size, device, with_boxes=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    out = []
    for _ in range(batch):
        d = {"image": (torch.rand(3, h, w, generator=g) * 255).to(device), "height": h, "width": w}
        if with_boxes:
            inst = Instances((h, w))
            xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            inst.gt_classes = torch.randint(0, 5, (8,), generator=g)
            d["instances"] = inst
        out.append(d)
    return out


def timed(fn, device, runs, warmup):
    times = []
    for i in range(warmup + runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def build(config, device, channels_last, input_scale="full"):
    cfg = load_config(config, ["MODEL.DEVICE", device, *NO_IMAGENET_START,
                               "MODEL.FCOS.INPUT_SCALE", input_scale])
    model = build_model(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model


def measure_one(args):
    """Measure args.one in this process; print one JSON line."""
    device = args.device
    config, input_scale = config_spec(args.one)
    cfg, model = build(config, device, args.channels_last, input_scale)
    size = input_size(model, args.size)
    if args.runtime != "eager":
        return export_one(args, cfg, model, config, input_scale, size)
    model.eval()
    run = model
    if args.compile:
        run = torch.compile(model)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=args.amp and device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    single, batch = inputs(1, size, device), inputs(args.batch, size, device)
    with torch.no_grad(), autocast:
        latency = timed(lambda: run(single), device, args.runs, args.warmup)
        throughput = timed(lambda: run(batch), device, max(3, args.runs // 4), 1)
    result = {
        "config": args.one, "model": cfg.MODEL.META_ARCHITECTURE, "runtime": "eager",
        "input": list(size),
        "latency_ms_median": 1000 * statistics.median(latency),
        "latency_ms_p90": 1000 * msad_runtime.p90(latency),
        "images_per_s": args.batch / statistics.median(throughput),
        "peak_memory_mb": peak_memory_mb(device),  # inference, before any training step
    }
    if args.train:
        if cfg.MODEL.TEACHER.CONFIG_FILE:  # built now: the inference peak is the student's
            model.attach_teacher(build(os.path.join(REPO, cfg.MODEL.TEACHER.CONFIG_FILE),
                                       device, args.channels_last)[1])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        data = inputs(args.batch, size, device, with_boxes=True)

        def step():
            with autocast:
                loss = sum(model(data).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        with EventStorage(0):
            result["train_step_ms"] = 1000 * statistics.median(
                timed(step, device, max(3, args.runs // 4), 2))
        result["train_peak_memory_mb"] = peak_memory_mb(device)
    print(json.dumps(result))


def export_one(args, cfg, model, config, input_scale, size):
    """Export the randomly initialised model of `config` for args.runtime into args.workdir with
    a random image of `size`; print one JSON line naming them."""
    weights = os.path.join(args.workdir, "weights")
    os.makedirs(weights)
    SafeCheckpointer(model, weights).save("model")
    image = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    image_path = os.path.join(args.workdir, "input.png")
    cv2.imwrite(image_path, image)
    # No test resize: the exported model is timed on the image eager PyTorch is given.
    predictor = predictor_for_export(config, os.path.join(weights, "model.pth"),
                                     [*NO_IMAGENET_START, "INPUT.MIN_SIZE_TEST", 0],
                                     input_scale)
    folder = os.path.join(args.workdir, "exported")
    export(predictor, EXPORT_FORMATS[args.runtime], folder, image)
    print(json.dumps({"export": folder, "image": image_path,
                      "model": cfg.MODEL.META_ARCHITECTURE}))


def measure_exported(args, spec, runtime, forwarded):
    """Export `spec` for `runtime` and time it with msad_runtime.py: its result dict."""
    with tempfile.TemporaryDirectory(prefix="msad-benchmark-") as workdir:
        exported = json.loads(run_checked(
            [sys.executable, os.path.abspath(__file__), "--one", spec, "--runtime", runtime,
             "--workdir", workdir, *forwarded], f"{spec} ({runtime} export)"))
        timed_run = json.loads(run_checked(
            [sys.executable, os.path.join(REPO, "msad_runtime.py"), exported["export"],
             exported["image"], "--backend", runtime, "--benchmark", str(args.runs),
             "--warmup", str(args.warmup)], f"{spec} ({runtime})"))
    return {"config": spec, "model": exported["model"], "runtime": runtime,
            "input": timed_run["input"], "latency_ms_median": timed_run["latency_ms_median"],
            "latency_ms_p90": timed_run["latency_ms_p90"],
            "peak_memory_mb": timed_run["peak_memory_mb"]}


def run_checked(command, what):
    """The last stdout line of `command`; exits naming `what` if it fails."""
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {what} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def peak_memory_mb(device):
    """CUDA peak allocated since the last reset, or this process's peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return msad_runtime.peak_rss_mb()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv  # forwarded to the measuring processes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", help="config files; ratios are to the first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4, help="batch of the throughput/train runs")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--train", action="store_true", help="also time a training step")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--runtimes", nargs="+", default=["eager"], choices=RUNTIMES,
                        help="run the exported model with these too (CPU; ratios to eager)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config
    parser.add_argument("--runtime", default="eager", help=argparse.SUPPRESS)  # ... with this
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # ... exporting here
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.one:
        return measure_one(args)
    if not args.configs:
        parser.error("--configs: name at least one config file")
    for spec in args.configs:
        config, scale = config_spec(spec)
        if not os.path.isfile(config):
            parser.error(f"--configs: no such file {config}")
        if scale not in ("full", "low"):
            parser.error(f"--configs {spec}: the suffix after ':' can only be 'low'")
    exported = [r for r in args.runtimes if r != "eager"]
    if exported and (args.device != "cpu" or args.train or args.batch != 1):
        parser.error("--runtimes: the exported models take one image and are measured on the "
                     "CPU: use them with --device cpu --batch 1, without --train")
    for runtime in exported:
        try:
            __import__(RUNTIME_PACKAGES[runtime])
        except ImportError:
            parser.error(f"--runtimes {runtime}: the {RUNTIME_PACKAGES[runtime]} package is not "
                         "installed")

    flags = [f for f in ("compile", "channels_last", "amp") if getattr(args, f)]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device_name}, {torch.get_num_threads()} threads, torch {torch.__version__}; input "
          f"{args.size[0]}x{args.size[1]}, batch {args.batch}; flags: {', '.join(flags) or 'none'}",
          flush=True)
    forwarded = [a for a in argv if a not in args.configs + args.runtimes
                 and a not in ("--configs", "--runtimes")]
    runtimes = ["eager"] + exported
    jobs = [(spec, runtime) for spec in args.configs for runtime in runtimes]
    results = []
    for i, (spec, runtime) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {spec} {runtime}", file=sys.stderr, flush=True)
        if runtime == "eager":
            results.append(json.loads(run_checked(
                [sys.executable, os.path.abspath(__file__), "--one", spec, *forwarded], spec)))
        else:
            results.append(measure_exported(args, spec, runtime, forwarded))

    if exported:
        print_runtime_table(results)
    else:
        print_table(results, args.train)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"device": device_name, "size": args.size, "batch": args.batch,
                       "flags": flags, "results": results}, f, indent=2)
        print(f"Wrote {args.output}")


def name(spec):
    return os.path.relpath(spec, REPO)[:39]


def print_table(results, train):
    """Every config's figures, with ratios to the first."""
    base = results[0]
    keys = [("latency_ms_median", "median ms"), ("latency_ms_p90", "p90 ms"),
            ("images_per_s", "img/s"), ("peak_memory_mb", "peak MB")]
    if train:
        keys += [("train_step_ms", "train ms"), ("train_peak_memory_mb", "train MB")]
    header = f"{'config':<40}" + "".join(f"{label:>11}{'ratio':>7}" for _, label in keys)
    print(header + "\n" + "-" * len(header))
    for r in results:
        cells = "".join(f"{r[k]:11.2f}{r[k] / base[k]:7.2f}" for k, _ in keys)
        print(f"{name(r['config']):<40}{cells}")


def print_runtime_table(results):
    """Every config and input under every runtime, with ratios to eager on the same ones."""
    header = (f"{'config':<40}{'input':>10}  {'runtime':<12}{'median ms':>10}{'p90 ms':>10}"
              f"{'vs eager':>9}{'peak MB':>9}")
    print(header + "\n" + "-" * len(header))
    eager = {}
    for r in results:
        if r["runtime"] == "eager":
            eager[r["config"]] = r["latency_ms_median"]
        print(f"{name(r['config']):<40}{'x'.join(map(str, r['input'])):>10}  {r['runtime']:<12}"
              f"{r['latency_ms_median']:10.1f}{r['latency_ms_p90']:10.1f}"
              f"{r['latency_ms_median'] / eager[r['config']]:9.2f}{r['peak_memory_mb']:9.0f}")


if __name__ == "__main__":
    main()
