"""The main job's report (tools/quickstart.py): each model's AP from its own evaluation (mean ±
std over seeds), its MACs and inference time, one table, summary.json, and the pictures
(detections on a val image, the learned thumbnails, AP against cost)."""
import json
import os
import statistics
import time

import cv2
import matplotlib
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode

from ..config import REPO, load_config
from ..export.predictor import Predictor
from .cost import model_macs, time_inference
from .pictures import grid, panel, top_detections, write_comparisons
from .pipeline import fmt
from .quickstart import seed_dir, stage_opts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MACS_SIZE = (256, 256)  # every bundled image pads to one 256x256 tile
METRICS = ("AP", "APs", "APm", "APl")


def last_bbox_metrics(output_dir):
    """The last COCO box metrics Detectron2's EvalHook wrote into output_dir/metrics.json."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.json in {output_dir}")
    found = None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                found = row
    if found is None:
        raise ValueError(f"{path} holds no bbox/AP (was the model evaluated?)")
    return {k[len("bbox/"):]: v for k, v in found.items() if k.startswith("bbox/")}


def points_from_runs(runs, costs_file, latency_file=None):
    """One point per NAME=DIR of `runs`: the last AP of DIR, the GMACs of model NAME in
    `costs_file` (tools/measure_capacity.py) and its latency in `latency_file`
    (tools/benchmark.py), matched by config."""
    costs = {r["model"]: r for r in json.load(open(costs_file))["end_to_end"]}
    latency = {}
    if latency_file:
        latency = {os.path.normpath(r["config"]): r["latency_ms_median"]
                   for r in json.load(open(latency_file))["results"]}
    points = []
    for run in runs:
        name, _, output_dir = run.partition("=")
        cost = costs.get(name)
        if cost is None:
            raise ValueError(f"{name!r} is not a model of {costs_file} ({sorted(costs)})")
        config = os.path.normpath(cost["config"])
        ms = next((v for k, v in latency.items() if k.endswith(config)), None)
        points.append({"model": name, "AP": last_bbox_metrics(output_dir)["AP"],
                       "gmacs": cost["total"],
                       "ms_per_image": ms})
    return points


def plot(points, prefix, title):
    """AP against each cost of `points` (models without an AP, which detected nothing, left
    out), written as PREFIX.png and PREFIX.svg; returns their paths."""
    points = [p for p in points if p["AP"] is not None]
    panels = [("gmacs", "inference GMACs per image")]
    if points and all(p.get("ms_per_image") is not None for p in points):
        panels.append(("ms_per_image", "inference ms per image"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for p in points:
            # Several seeds: the mean with a bar of one standard deviation either side.
            ax.errorbar(p[key], p["AP"], yerr=p.get("AP_std"), fmt="o", markersize=6, capsize=3)
            ax.annotate(p["model"], (p[key], p["AP"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("box AP")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = [f"{prefix}.png", f"{prefix}.svg"]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def final_metrics(output_dir):
    """AP, AP_S/M/L of the model's last evaluation; None for a size class the split lacks."""
    found = last_bbox_metrics(output_dir)
    return {k: None if found[k] != found[k] else found[k] for k in METRICS}


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


def write_report(stages, output, seeds, overrides, timing_images, train_seconds, job_start):
    """Evaluate the cost of every stage's model (the first seed's stands for all: cost and
    pictures do not depend on the seed), print the table and write summary.json and the
    pictures into `output`."""
    first_cfg = load_config(os.path.join(REPO, stages[0].config), overrides)
    print("Timing inference and drawing detections ...", flush=True)
    val_name = first_cfg.DATASETS.TEST[0]
    val = DatasetCatalog.get(val_name)
    metadata = MetadataCatalog.get(val_name)
    image_rgb = read_image(val[0]["file_name"], format="RGB")
    gt = [a for a in val[0]["annotations"] if not a.get("iscrowd")]
    scale = min(2.0, 512 / max(image_rgb.shape[:2]))  # panels of at most 512 pixels
    gt_boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in gt]
    panels = [panel(image_rgb, metadata, "ground truth", scale, boxes=gt_boxes,
                    labels=[metadata.thing_classes[a["category_id"]] for a in gt])]
    size = macs_size(first_cfg, val)
    rows, models = [], {}
    for stage in stages:
        per_seed = {str(s): final_metrics(os.path.join(seed_dir(output, s), stage.name))
                    for s in seeds}
        # Cost and pictures do not depend on the seed: the first seed's model stands for all.
        cfg = load_config(os.path.join(REPO, stage.config),
                          stage_opts(stage, output, seeds[0], overrides))
        predictor = Predictor(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
        models[stage.name] = predictor
        samples = [predictor.model_input(read_image(d["file_name"], format="BGR"))
                   for d in val[: timing_images]]
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
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "rows": rows, "device": first_cfg.MODEL.DEVICE,
                   "dataset": val_name, "macs_size": list(size),
                   "torch_threads": torch.get_num_threads(), "val_images": len(val),
                   "timing_images": min(timing_images, len(val)) - 2,
                   "train_seconds": round(train_seconds)}, f, indent=2)
    written = [os.path.join(output, "summary.json"), os.path.join(output, "detections.png")]
    cv2.imwrite(written[-1], cv2.cvtColor(grid(panels, columns=4), cv2.COLOR_RGB2BGR))
    thumbdet = next((s for s in stages if s.name.startswith("thumbdet")), None)
    if thumbdet:
        predictor = models[thumbdet.name]
        written += [path for path, _ in write_comparisons(predictor.model, val[:2], output,
                                                          predictor.cfg.INPUT.FORMAT)]
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {seeds}"
    written += plot(rows, os.path.join(output, "ap_vs_cost"),
                    f"Quickstart models on {val_name} ({seeds_text}; CPU, "
                    f"{torch.get_num_threads()} threads)")
    print(f"Wrote {', '.join(written)} in {fmt(time.time() - job_start)} "
          f"(training {fmt(train_seconds)})")
