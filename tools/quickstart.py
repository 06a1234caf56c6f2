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

On your own data, the same pipeline and outputs: --train and --val each take LABELS IMAGES, where
LABELS is a COCO-format JSON or a folder of Pascal VOC .xml or YOLO .txt labels (converted into
--output/data/; YOLO needs --classes or --classes-file).  The number of classes comes from the
data; images whose longer side is at most 1333 are used at their own size, larger ones are
resized as COCO is (shorter side 800).  --width, --iters (the schedule scaled alike),
--thumbnail-factor 2|4 and --no-thumbnails set the rest:

    python tools/quickstart.py --train labels/train images/train --val labels/val images/val \
        --classes-file data.yaml --iters 3000 --output output/mine
"""
import argparse
import json
import os
import statistics
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import NamedTuple

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
from detectron2.data.transforms import ResizeShortestEdge  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import msad  # noqa: E402,F401
from msad.benchmark.pipeline import checked_overrides, fmt, progress_of, schedule_overrides
from msad.config import load_config  # noqa: E402
from msad.data.coco import register_coco_from_config
from msad.data.label_formats import to_coco_file
from msad.export.predictor import Predictor
from measure_capacity import model_macs  # noqa: E402  (tools/, beside this script)
from plot_ap_vs_cost import last_bbox_metrics, plot  # noqa: E402
from thumbnails import titled, write_comparisons  # noqa: E402


class Stage(NamedTuple):
    name: str
    label: str  # as shown in the table
    script: str
    config: str
    sources: dict  # {config key: stage whose model_final.pth it takes}; those come first
    opts: tuple = ()  # the stage's own overrides


STAGES = (
    Stage("hr_baseline", "HR FCOS", "train_net_T.py", "configs/quickstart/hr_baseline.yaml", {}),
    Stage("teacher", "MSAD teacher", "train_net_T.py", "configs/quickstart/teacher.yaml", {}),
    Stage("lr_baseline", "LR FCOS, no distillation", "train_net_T.py",
          "configs/quickstart/lr_baseline.yaml", {}),
    Stage("lr_teacher_init", "LR FCOS, teacher init, no distillation", "train_net_S.py",
          "configs/quickstart/lr_teacher_init.yaml", {"MODEL.TEACHER.WEIGHTS": "teacher"}),
    Stage("student", "MSAD student", "train_net_S.py", "configs/quickstart/student.yaml",
          {"MODEL.TEACHER.WEIGHTS": "teacher"}),
    Stage("bicubic_4x", "bicubic 4x thumbnail FCOS", "train_net_T.py",
          "configs/quickstart/bicubic_4x.yaml", {"MODEL.WEIGHTS": "hr_baseline"}),
    Stage("thumbdet_4x", "ThumbDet 4x (learned)", "train_net_S.py",
          "configs/quickstart/thumbdet_4x.yaml", {"MODEL.TEACHER.WEIGHTS": "hr_baseline"}),
)
THUMBNAIL_STAGES = ("bicubic_4x", "thumbdet_4x")


def pipeline(thumbnail_factor=4, thumbnails=True):
    """The stages to run: all of STAGES, the thumbnail detectors at `thumbnail_factor` (or
    none)."""
    stages = []
    for stage in STAGES:
        if stage.name not in THUMBNAIL_STAGES:
            stages.append(stage)
        elif thumbnails and thumbnail_factor == 4:
            stages.append(stage)
        elif thumbnails:
            stages.append(stage._replace(
                name=stage.name.replace("4x", f"{thumbnail_factor}x"),
                label=stage.label.replace("4x", f"{thumbnail_factor}x"),
                opts=("MODEL.FCOS.INPUT_FACTOR", str(thumbnail_factor))))
    return stages


MACS_SIZE = (256, 256)  # every bundled image pads to one 256x256 tile
METRICS = ("AP", "APs", "APm", "APl")


def seed_dir(output, seed):
    return os.path.join(output, f"seed{seed}")


def stage_opts(stage, output, seed, overrides):
    """Overrides of one stage of one seed: its own output directory, seed and weights."""
    run_dir = seed_dir(output, seed)
    opts = ["OUTPUT_DIR", os.path.join(run_dir, stage.name), "SEED", str(seed), *stage.opts,
            *overrides]
    for key, source in stage.sources.items():
        opts += [key, os.path.join(run_dir, source, "model_final.pth")]
    return opts


def stages_to_train(stages, output, seed, reuse_trained):
    """Names of the stages one seed must train: all of them, or under --reuse-trained those
    without a model_final.pth and those that take weights from a stage trained again."""
    names = set()
    for stage in stages:
        final = os.path.join(seed_dir(output, seed), stage.name, "model_final.pth")
        if not (reuse_trained and os.path.isfile(final)) or names & set(stage.sources.values()):
            names.add(stage.name)
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
                found = progress_of(line)
                if found:
                    progress(tag, found[0], max_iter, found[1], time.time() - start)
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


def panel(image_rgb, metadata, title, scale, instances=None, boxes=None, labels=None):
    """One titled picture of the image with either predictions or ground-truth boxes."""
    canvas = Visualizer(image_rgb, metadata, scale=scale)
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


def own_data_overrides(args, output):
    """Config overrides that train and evaluate every stage on --train / --val (COCO JSON, VOC
    or YOLO, converted into `output`/data/), with the number of classes from the data and the
    test size chosen from the val images."""
    def converted(labels, images, split, names):
        json_file = to_coco_file(labels, images, os.path.join(output, "data", f"{split}.json"),
                                 names)
        with open(json_file) as f:
            coco = json.load(f)
        return json_file, coco, [c["name"] for c in sorted(coco["categories"],
                                                           key=lambda c: c["id"])]

    train_json, train, names = converted(*args.train, "train", args.classes or args.classes_file)
    val_json, val, val_names = converted(*args.val, "val", names)  # VOC, YOLO: train's names
    if val_names != names:
        raise ValueError(f"--train has the classes {names}, --val {val_names}")
    longest = max(max(i["width"], i["height"]) for i in val["images"])
    # Images that fit in Detectron2's default test size are used as they are, like the bundled
    # ones; larger ones are resized as COCO is (shorter side 800, longer at most 1333).
    sizes = ["INPUT.MIN_SIZE_TRAIN", "(0,)", "INPUT.MIN_SIZE_TEST", "0"] if longest <= 1333 else \
        ["INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MIN_SIZE_TEST", "800",
         "INPUT.MAX_SIZE_TRAIN", "1333", "INPUT.MAX_SIZE_TEST", "1333"]
    entries = [["own_train", train_json, args.train[1]], ["own_val", val_json, args.val[1]]]
    print(f"Data: {len(train['images'])} train and {len(val['images'])} val images, "
          f"{len(names)} classes {names[:10]}{' ...' if len(names) > 10 else ''}; "
          f"{'native size' if longest <= 1333 else 'shorter side 800, longer at most 1333'} "
          f"(largest val image side {longest})", flush=True)
    return ["DATASETS.COCO_INSTANCES", repr(entries), "DATASETS.TRAIN", "('own_train',)",
            "DATASETS.TEST", "('own_val',)", "MODEL.FCOS.NUM_CLASSES", str(len(names)), *sizes]


def macs_size(cfg, val):
    """The image size at which MACs are counted: the bundled data's one 256x256 tile, or the
    median val image after the test resize."""
    if cfg.DATASETS.TEST[0] == "msad_synth_val":
        return MACS_SIZE
    h = statistics.median_low(d["height"] for d in val)
    w = statistics.median_low(d["width"] for d in val)
    if cfg.INPUT.MIN_SIZE_TEST:
        h, w = ResizeShortestEdge.get_output_shape(h, w, cfg.INPUT.MIN_SIZE_TEST,
                                                   cfg.INPUT.MAX_SIZE_TEST)
    return h, w


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
    data = parser.add_argument_group(
        "your own data (default: the bundled synthetic data)",
        "LABELS is a COCO-format .json, a folder of Pascal VOC .xml files or a folder of YOLO "
        ".txt files (see tools/convert_dataset.py)")
    data.add_argument("--train", nargs=2, metavar=("LABELS", "IMAGES"))
    data.add_argument("--val", nargs=2, metavar=("LABELS", "IMAGES"))
    names = data.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", help="class names in order (VOC, YOLO)")
    names.add_argument("--classes-file", help="class names: one per line, or a YOLO data.yaml")
    parser.add_argument("--width", type=float, help="ResNet width (default: the configs' 0.25)")
    parser.add_argument("--iters", type=int,
                        help="iterations per model (default: the configs' 600), with the LR step, "
                        "warm-ups and checkpoints scaled alike")
    parser.add_argument("--thumbnail-factor", type=int, choices=(2, 4), default=4,
                        help="factor of the bicubic and ThumbDet thumbnails")
    parser.add_argument("--no-thumbnails", action="store_true",
                        help="leave out the bicubic and ThumbDet thumbnail detectors")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="config overrides for every stage, e.g. SOLVER.IMS_PER_BATCH 8")
    args = parser.parse_args()
    if args.timing_images < 3:
        parser.error(f"--timing-images must be at least 3 (two are warm-up), got {args.timing_images}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if bool(args.train) != bool(args.val):
        parser.error("--train and --val go together")
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters must be at least 1, got {args.iters}")
    args.overrides = checked_overrides(parser, args.overrides,
                                       {"SEED": "--seed", "OUTPUT_DIR": "--output"})
    stages = pipeline(args.thumbnail_factor, not args.no_thumbnails)
    if args.seed is None:
        args.seed = load_config(os.path.join(REPO, stages[0].config), args.overrides).SEED
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more (Detectron2 draws a random seed for a negative "
                     f"one, which no rerun repeats), got {args.seed}")
    args.output = os.path.abspath(args.output)  # the training scripts run from the repository
    os.makedirs(args.output, exist_ok=True)
    try:
        overrides = ((own_data_overrides(args, args.output) if args.train else [])
                     + (schedule_overrides(args.iters) if args.iters else [])
                     + (["MODEL.SLIMMABLE.WIDTH", str(args.width)] if args.width else [])
                     + args.overrides)
        first_cfg = load_config(os.path.join(REPO, stages[0].config), overrides)
        register_coco_from_config(first_cfg)
    except (OSError, ValueError) as e:  # labels that cannot be read or converted, named
        raise SystemExit(f"quickstart: {e}") from None
    seeds = list(range(args.seed, args.seed + args.seeds))

    to_train = {seed: stages_to_train(stages, args.output, seed, args.reuse_trained)
                for seed in seeds}

    def trained(name, seed):
        return name not in to_train[seed]

    total_iters = sum(load_config(os.path.join(REPO, stage.config), overrides).SOLVER.MAX_ITER
                      for seed in seeds for stage in stages if not trained(stage.name, seed))
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
        for index, stage in enumerate(stages, 1):
            tag = (f"seed {seed}, " if len(seeds) > 1 else "") + \
                f"{index}/{len(stages)} {stage.name}"
            stage_dir = os.path.join(seed_dir(args.output, seed), stage.name)
            if trained(stage.name, seed):
                print(f"[{tag}] reusing {stage_dir}", flush=True)
                continue
            print(f"[{tag}] training {stage.label} ({stage.config}, SEED {seed})", flush=True)
            # The stage's directory is this job's own output: a rerun replaces it.
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(seed_dir(args.output, seed), exist_ok=True)
            seconds, iters = train(tag, stage.script, stage.config,
                                   stage_opts(stage, args.output, seed, overrides),
                                   stage_dir + ".log", progress)
            done["iters"] += iters
            done["seconds"] += seconds
    train_seconds = time.time() - job_start

    print("Timing inference and drawing detections ...", flush=True)
    val_name = first_cfg.DATASETS.TEST[0]
    val = DatasetCatalog.get(val_name)
    metadata = MetadataCatalog.get(val_name)
    image_rgb = read_image(val[0]["file_name"], format="RGB")
    gt = [a for a in val[0]["annotations"] if not a.get("iscrowd")]
    scale = min(2.0, 512 / max(image_rgb.shape[:2]))  # panels of at most 512 pixels
    panels = [panel(image_rgb, metadata, "ground truth", scale,
                    boxes=[BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in gt],
                    labels=[metadata.thing_classes[a["category_id"]] for a in gt])]
    size = macs_size(first_cfg, val)
    rows, models = [], {}
    for stage in stages:
        per_seed = {str(s): final_metrics(os.path.join(seed_dir(args.output, s), stage.name))
                    for s in seeds}
        # Cost and pictures do not depend on the seed: the first seed's model stands for all.
        cfg = load_config(os.path.join(REPO, stage.config),
                          stage_opts(stage, args.output, seeds[0], overrides))
        predictor = Predictor(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        models[stage.name] = predictor
        samples = [predictor.model_input(read_image(d["file_name"], format="BGR"))
                   for d in val[: args.timing_images]]
        macs, inputs = model_macs(predictor.model, size)
        rows.append({"model": stage.label, "name": stage.name, **summarise(per_seed),
                     "per_seed": per_seed,
                     "backbone_input": " + ".join("x".join(map(str, i)) for i in inputs),
                     "gmacs": macs["total"] / 1e9,
                     "ms_per_image": time_inference(predictor.model, samples)})
        panels.append(panel(image_rgb, metadata, stage.label, scale,
                            instances=top_detections(predictor.model, samples[0],
                                                     keep=len(gt) + 3)))

    table = format_table(rows, seeds)
    print(table)
    if size != MACS_SIZE:
        print(f"(GMACs of one {size[0]}x{size[1]} image: the median val image after the test "
              "resize)")
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows, "device": first_cfg.MODEL.DEVICE,
                   "dataset": val_name, "macs_size": list(size),
                   "torch_threads": torch.get_num_threads(), "val_images": len(val),
                   "timing_images": min(args.timing_images, len(val)) - 2,
                   "train_seconds": round(train_seconds)}, f, indent=2)
    written = [os.path.join(args.output, "summary.json"), os.path.join(args.output, "detections.png")]
    cv2.imwrite(written[-1], cv2.cvtColor(grid(panels, columns=4), cv2.COLOR_RGB2BGR))
    thumbdet = next((s for s in stages if s.name.startswith("thumbdet")), None)
    if thumbdet:
        predictor = models[thumbdet.name]
        written += [path for path, _ in write_comparisons(predictor.model, val[:2], args.output,
                                                          predictor.cfg.INPUT.FORMAT)]
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {seeds}"
    written += plot(rows, os.path.join(args.output, "ap_vs_cost"),
                    f"Quickstart models on {val_name} ({seeds_text}; CPU, "
                    f"{torch.get_num_threads()} threads)")
    print(f"Wrote {', '.join(written)} in {fmt(time.time() - job_start)} "
          f"(training {fmt(train_seconds)})")


if __name__ == "__main__":
    main()
