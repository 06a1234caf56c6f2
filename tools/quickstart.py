#!/usr/bin/env python
"""The main job: MSAD end to end on the bundled synthetic data, on the CPU.

Trains the HR single-scale FCOS, the multi-scale teacher, the LR FCOS without distillation, the
same LR FCOS started from the teacher's weights without distillation (the ablation), the student
distilled from that teacher, and the 4x-thumbnail detectors (bicubic, and ThumbDet's learned
down-sampler distilled from the HR FCOS) (configs/quickstart/), evaluates each on the val split,
times inference, and prints one table.  Every stage is seeded (SEED of the configs, or --seed),
so a rerun on the same machine prints the same APs; --seeds N trains every model N times (seeds
--seed, --seed + 1, ...) and shows the mean ± std over them.  Writes into --output (default
output/quickstart/): seed<S>/<model>/ (each model's Detectron2 output directory) and
seed<S>/<model>.log, summary.json (the table, with each seed's metrics), detections.png (one val
image: its ground truth, then each model's best detections), thumbnails_<id>.png (source,
bicubic and learned 4x thumbnails) and ap_vs_cost.png/.svg (AP against GMACs and against
latency); the pictures, GMACs and timings use the first seed's models.

    python tools/quickstart.py [--output DIR] [--seed S] [--seeds N] [--reuse-trained]
        [CONFIG OVERRIDES for every model]
"""
import argparse
import json
import os
import re
import statistics
import shutil
import signal
import subprocess
import sys
import time

import warnings

import cv2
import numpy as np
import torch

# fvcore's focal loss is scripted at import, which this torch flags as deprecated, and
# Detectron2's anchor generator calls torch.meshgrid without `indexing`: noise, not news.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*torch.meshgrid.*", category=UserWarning)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import msad  # noqa: E402,F401
from msad.checkpoint import SafeCheckpointer  # noqa: E402
from msad.config import load_config  # noqa: E402
from measure_capacity import model_macs  # noqa: E402  (tools/, beside this script)
from plot_ap_vs_cost import last_bbox_metrics, plot  # noqa: E402
from thumbnails import titled, write_comparisons  # noqa: E402

# (name, shown as, training script, config, {config key: stage whose model_final.pth it takes});
# a stage comes after the stages it takes weights from.
STAGES = (
    ("hr_baseline", "HR FCOS", "train_net_T.py", "configs/quickstart/hr_baseline.yaml", {}),
    ("teacher", "MSAD teacher", "train_net_T.py", "configs/quickstart/teacher.yaml", {}),
    ("lr_baseline", "LR FCOS, no distillation", "train_net_T.py",
     "configs/quickstart/lr_baseline.yaml", {}),
    ("lr_teacher_init", "LR FCOS, teacher init, no distillation", "train_net_S.py",
     "configs/quickstart/lr_teacher_init.yaml", {"MODEL.TEACHER.WEIGHTS": "teacher"}),
    ("student", "MSAD student", "train_net_S.py", "configs/quickstart/student.yaml",
     {"MODEL.TEACHER.WEIGHTS": "teacher"}),
    ("bicubic_4x", "bicubic 4x thumbnail FCOS", "train_net_T.py",
     "configs/quickstart/bicubic_4x.yaml", {"MODEL.WEIGHTS": "hr_baseline"}),
    ("thumbdet_4x", "ThumbDet 4x (learned)", "train_net_S.py",
     "configs/quickstart/thumbdet_4x.yaml", {"MODEL.TEACHER.WEIGHTS": "hr_baseline"}),
)
MACS_SIZE = (256, 256)  # every bundled image pads to one 256x256 tile
METRICS = ("AP", "APs", "APm", "APl")
ETA_LINE = re.compile(r"eta: (?:(\d+) day, )?(\d+):(\d\d):(\d\d)\s+iter: (\d+)")


def fmt(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def seed_dir(output, seed):
    return os.path.join(output, f"seed{seed}")


def stage_opts(name, output, seed, overrides):
    """Overrides of one stage of one seed: its own output directory, seed and weights."""
    run_dir = seed_dir(output, seed)
    opts = ["OUTPUT_DIR", os.path.join(run_dir, name), "SEED", str(seed)] + overrides
    for key, source in next(stage[4] for stage in STAGES if stage[0] == name).items():
        opts += [key, os.path.join(run_dir, source, "model_final.pth")]
    return opts


def stages_to_train(output, seed, reuse_trained):
    """Names of the stages one seed must train: all of them, or under --reuse-trained those
    without a model_final.pth and those that take weights from a stage trained again."""
    names = set()
    for name, _, _, _, sources in STAGES:
        final = os.path.join(seed_dir(output, seed), name, "model_final.pth")
        if not (reuse_trained and os.path.isfile(final)) or names & set(sources.values()):
            names.add(name)
    return names


def train(tag, script, config, opts, log_path, progress):
    """Run one training script, echoing a progress line per Detectron2 log line with an ETA."""
    cfg = load_config(os.path.join(REPO, config), opts)
    max_iter = cfg.SOLVER.MAX_ITER
    cmd = [sys.executable, os.path.join(REPO, script), "--config-file", config, *opts]
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            for line in proc.stdout:
                log.write(line)
                match = ETA_LINE.search(line)
                if match:
                    days, h, m, s, it = (int(g or 0) for g in match.groups())
                    progress(tag, int(it) + 1, max_iter, days * 86400 + h * 3600 + m * 60 + s,
                             time.time() - start)
        except BaseException:  # Ctrl-C, SIGTERM: do not leave the training running alone
            proc.kill()
            proc.wait()
            raise
        if proc.wait() != 0:
            raise SystemExit(f"quickstart: {tag} failed (exit {proc.returncode}); see {log_path}")
    return time.time() - start, max_iter


def final_metrics(output_dir):
    """AP, AP_S/M/L of the model's last evaluation; None for a size class the split lacks."""
    found = last_bbox_metrics(output_dir)
    return {k: None if found[k] != found[k] else found[k] for k in METRICS}


def load_model(config, opts, weights):
    cfg = load_config(os.path.join(REPO, config), opts)
    model = build_model(cfg).eval()
    SafeCheckpointer(model, source="quickstart: trained model").load(weights)
    return cfg, model


def model_input(cfg, dataset_dict):
    image = read_image(dataset_dict["file_name"], format=cfg.INPUT.FORMAT)
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
    return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}


def time_inference(model, samples):
    """Median milliseconds per image, batch 1, after two warm-up images."""
    times = []
    with torch.no_grad():
        for i, sample in enumerate(samples):
            start = time.perf_counter()
            model([sample])
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def panel(image_rgb, metadata, title, instances=None, boxes=None, labels=None):
    """One titled picture of the image with either predictions or ground-truth boxes."""
    canvas = Visualizer(image_rgb, metadata, scale=2.0)
    if instances is not None:
        canvas = canvas.draw_instance_predictions(instances)
    else:
        canvas = canvas.overlay_instances(boxes=boxes, labels=labels)
    return titled(canvas.get_image(), title)


def grid(panels, columns):
    """Equal-sized panels in rows of `columns`, the last row filled with white."""
    blank = np.full_like(panels[0], 255)
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    return np.vstack([np.hstack(row + [blank] * (columns - len(row))) for row in rows])


def top_detections(model, sample, keep, score_thresh=0.3):
    """The `keep` best detections above `score_thresh`, so that the picture stays readable."""
    with torch.no_grad():
        instances = model([sample])[0]["instances"].to("cpu")
    instances = instances[instances.scores > score_thresh]
    return instances[instances.scores.argsort(descending=True)[:keep]]


def summarise(per_seed):
    """Mean and sample standard deviation over seeds of each metric (std None for one seed)."""
    out = {}
    for key in METRICS:
        values = [m[key] for m in per_seed.values()]
        if any(v is None for v in values):
            out[key] = out[f"{key}_std"] = None
            continue
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def format_table(rows, seeds):
    """One value per metric for one seed; mean ± std and each seed's AP for several."""
    several = len(seeds) > 1
    width = 15 if several else 7

    def cell(row, key):
        if row[key] is None:
            return f"{'n/a':>{width}}"
        return f"{row[key]:9.2f} ± {row[key + '_std']:4.2f}" if several else f"{row[key]:7.2f}"

    header = (f"{'model':<40}" + "".join(f"{k:>{width}}" for k in ("AP", "AP_S", "AP_M", "AP_L"))
              + (f"  {'AP of seeds ' + ','.join(map(str, seeds)):<22}" if several else "")
              + f"  {'backbone input':<17}{'GMACs':>7}{'ms/img':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r['model']:<40}" + "".join(cell(r, k) for k in METRICS)
        if several:
            aps = " ".join(f"{r['per_seed'][str(s)]['AP']:.2f}" for s in seeds)
            line += f"  {aps:<22}"
        lines.append(line + f"  {r['backbone_input']:<17}{r['gmacs']:7.2f}{r['ms_per_image']:7.1f}")
    return "\n".join(lines)


def main():
    # SIGTERM (a scheduler, a timeout) unwinds like Ctrl-C, so the running stage is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/quickstart")
    parser.add_argument("--seed", type=int,
                        help="seed of the first run (default: SEED of the quickstart configs, 0)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every model this many times, with seeds --seed, --seed + 1, "
                        "...; the table shows mean ± std over them")
    parser.add_argument("--timing-images", type=int, default=22)
    parser.add_argument("--reuse-trained", action="store_true",
                        help="skip training a model whose model_final.pth is already in --output")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides for every stage, e.g. SOLVER.MAX_ITER 300")
    args = parser.parse_args()
    if args.timing_images < 3:
        parser.error(f"--timing-images must be at least 3 (two are warm-up), got {args.timing_images}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.overrides[:1] == ["--"]:
        args.overrides = args.overrides[1:]
    misplaced = [a for a in args.overrides if a.startswith("--")]
    if misplaced:
        parser.error(f"options go before the config overrides: {misplaced}")
    if len(args.overrides) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs, got {args.overrides}")
    for key, flag in (("SEED", "--seed"), ("OUTPUT_DIR", "--output")):
        if key in args.overrides[::2]:
            parser.error(f"set {key} with {flag}: the tool gives each stage its own")
    if args.seed is None:
        args.seed = load_config(os.path.join(REPO, STAGES[0][3]), args.overrides).SEED
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more (Detectron2 draws a random seed for a negative "
                     f"one, which no rerun repeats), got {args.seed}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    args.output = os.path.abspath(args.output)  # the training scripts run from the repository
    os.makedirs(args.output, exist_ok=True)

    to_train = {seed: stages_to_train(args.output, seed, args.reuse_trained) for seed in seeds}

    def trained(name, seed):
        return name not in to_train[seed]

    total_iters = sum(load_config(os.path.join(REPO, stage[3]), args.overrides).SOLVER.MAX_ITER
                      for seed in seeds for stage in STAGES if not trained(stage[0], seed))
    done = {"iters": 0, "seconds": 0.0}
    job_start = time.time()

    def progress(tag, it, max_iter, stage_eta, stage_elapsed):
        # Remaining stages are estimated at the mean seconds per iteration seen so far.
        seen = (done["seconds"] + stage_elapsed) / max(1, done["iters"] + it)
        rest = (total_iters - done["iters"] - max_iter) * seen
        print(f"[{tag}] iter {it}/{max_iter}  stage ETA {fmt(stage_eta)}"
              f"  total ETA ~{fmt(stage_eta + rest)}  elapsed {fmt(time.time() - job_start)}",
              flush=True)

    for seed in seeds:
        for index, (name, label, script, config, _) in enumerate(STAGES, 1):
            tag = (f"seed {seed}, " if len(seeds) > 1 else "") + f"{index}/{len(STAGES)} {name}"
            stage_dir = os.path.join(seed_dir(args.output, seed), name)
            if trained(name, seed):
                print(f"[{tag}] reusing {stage_dir}", flush=True)
                continue
            print(f"[{tag}] training {label} ({config}, SEED {seed})", flush=True)
            # The stage's directory is this job's own output: a rerun replaces it.
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(seed_dir(args.output, seed), exist_ok=True)
            seconds, iters = train(tag, script, config,
                                   stage_opts(name, args.output, seed, args.overrides),
                                   stage_dir + ".log", progress)
            done["iters"] += iters
            done["seconds"] += seconds
    train_seconds = time.time() - job_start

    print("Timing inference and drawing detections ...", flush=True)
    val = DatasetCatalog.get("msad_synth_val")
    metadata = MetadataCatalog.get("msad_synth_val")
    image_rgb = read_image(val[0]["file_name"], format="RGB")
    gt = val[0]["annotations"]
    panels = [panel(image_rgb, metadata, "ground truth",
                    boxes=[BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in gt],
                    labels=[metadata.thing_classes[a["category_id"]] for a in gt])]
    rows = []
    for name, label, _, config, _ in STAGES:
        per_seed = {str(s): final_metrics(os.path.join(seed_dir(args.output, s), name))
                    for s in seeds}
        # Cost and pictures do not depend on the seed: the first seed's model stands for all.
        cfg, model = load_model(config, stage_opts(name, args.output, seeds[0], args.overrides),
                                os.path.join(seed_dir(args.output, seeds[0]), name,
                                             "model_final.pth"))
        samples = [model_input(cfg, d) for d in val[: args.timing_images]]
        macs, inputs = model_macs(model, MACS_SIZE)
        rows.append({"model": label, "name": name, **summarise(per_seed), "per_seed": per_seed,
                     "backbone_input": " + ".join("x".join(map(str, i)) for i in inputs),
                     "gmacs": macs["total"] / 1e9,
                     "ms_per_image": time_inference(model, samples)})
        panels.append(panel(image_rgb, metadata, label,
                            instances=top_detections(model, samples[0], keep=len(gt) + 3)))

    table = format_table(rows, seeds)
    print(table)
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows, "device": cfg.MODEL.DEVICE,
                   "torch_threads": torch.get_num_threads(), "val_images": len(val),
                   "timing_images": min(args.timing_images, len(val)) - 2,
                   "train_seconds": round(train_seconds)}, f, indent=2)
    picture = os.path.join(args.output, "detections.png")
    cv2.imwrite(picture, cv2.cvtColor(grid(panels, columns=4), cv2.COLOR_RGB2BGR))
    first = seed_dir(args.output, seeds[0])
    thumbdet_cfg, thumbdet = load_model(
        "configs/quickstart/thumbdet_4x.yaml",
        stage_opts("thumbdet_4x", args.output, seeds[0], args.overrides),
        os.path.join(first, "thumbdet_4x", "model_final.pth"))
    thumbnails = [path for path, _ in write_comparisons(thumbdet, val[:2], args.output,
                                                         thumbdet_cfg.INPUT.FORMAT)]
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {seeds}"
    plots = plot(rows, os.path.join(args.output, "ap_vs_cost"),
                 f"Quickstart models on msad_synth_val ({seeds_text}; CPU, "
                 f"{torch.get_num_threads()} threads)")
    print(f"Wrote {args.output}/summary.json, {picture}, {', '.join(thumbnails)} and "
          f"{', '.join(plots)} in {fmt(time.time() - job_start)} (training {fmt(train_seconds)})")


if __name__ == "__main__":
    main()
