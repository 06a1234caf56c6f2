#!/usr/bin/env python
"""Inference latency, throughput and peak memory of several configs, side by side.

    python tools/benchmark.py --configs configs/MSAD/HR-FCOS-R50.yaml configs/MSAD/SLR100-50-T.yaml \\
        configs/MSAD/SLR100-50-S.yaml [--device cpu|cuda] [--size 800 1333] [--batch 4] [--train]

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
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import msad  # noqa: E402,F401
from msad.config import load_config  # noqa: E402


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


def build(config, device, channels_last):
    cfg = load_config(config, ["MODEL.DEVICE", device, "MODEL.SLIMMABLE.PRETRAINED", ""])
    model = build_model(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model


def measure_one(args):
    """Measure args.one in this process; print one JSON line."""
    device = args.device
    cfg, model = build(args.one, device, args.channels_last)
    model.eval()
    run = model
    if args.compile:
        run = torch.compile(model)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=args.amp and device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    single, batch = inputs(1, args.size, device), inputs(args.batch, args.size, device)
    with torch.no_grad(), autocast:
        latency = timed(lambda: run(single), device, args.runs, args.warmup)
        throughput = timed(lambda: run(batch), device, max(3, args.runs // 4), 1)
    result = {
        "config": args.one, "model": cfg.MODEL.META_ARCHITECTURE,
        "latency_ms_median": 1000 * statistics.median(latency),
        "latency_ms_p90": 1000 * sorted(latency)[math.ceil(0.9 * len(latency)) - 1],
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
        data = inputs(args.batch, args.size, device, with_boxes=True)

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


def peak_memory_mb(device):
    """CUDA peak allocated since the last reset, or this process's peak RSS (KiB on Linux)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
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
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.one:
        return measure_one(args)
    if not args.configs:
        parser.error("--configs: name at least one config file")
    for config in args.configs:
        if not os.path.isfile(config):
            parser.error(f"--configs: no such file {config}")

    flags = [f for f in ("compile", "channels_last", "amp") if getattr(args, f)]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{device_name}, {torch.get_num_threads()} threads, torch {torch.__version__}; input "
          f"{args.size[0]}x{args.size[1]}, batch {args.batch}; flags: {', '.join(flags) or 'none'}",
          flush=True)
    forwarded = [a for a in sys.argv[1:] if a not in args.configs and a != "--configs"]
    results = []
    for i, config in enumerate(args.configs, 1):
        print(f"[{i}/{len(args.configs)}] {config}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", config,
                               *forwarded], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark: {config} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    base = results[0]
    keys = [("latency_ms_median", "median ms"), ("latency_ms_p90", "p90 ms"),
            ("images_per_s", "img/s"), ("peak_memory_mb", "peak MB")]
    if args.train:
        keys += [("train_step_ms", "train ms"), ("train_peak_memory_mb", "train MB")]
    header = f"{'config':<40}" + "".join(f"{label:>11}{'ratio':>7}" for _, label in keys)
    print(header + "\n" + "-" * len(header))
    for r in results:
        cells = "".join(f"{r[k]:11.2f}{r[k] / base[k]:7.2f}" for k, _ in keys)
        print(f"{os.path.relpath(r['config'], REPO)[:39]:<40}{cells}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"device": device_name, "size": args.size, "batch": args.batch,
                       "flags": flags, "results": results}, f, indent=2)
        print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
