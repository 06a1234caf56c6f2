#!/usr/bin/env python
"""Plot AP against compute (GMACs) and against latency, one labelled point per model.

    python tools/plot_ap_vs_cost.py --summary output/quickstart/summary.json [--output PREFIX]
    python tools/plot_ap_vs_cost.py --run "HR FCOS=output/HR-FCOS-R50" --run ... \\
        --costs output/capacity.json [--latency output/benchmark.json]

Reads either the quickstart's summary.json (AP, with its std over seeds as an error bar, GMACs
and ms per image for each model), or
Detectron2 output directories (the last "bbox/AP" in their metrics.json) matched by model name
to the end-to-end table of tools/measure_capacity.py and, optionally, by config to the results
of tools/benchmark.py.  Writes PREFIX.png and PREFIX.svg.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def last_bbox_metrics(output_dir):
    """The last COCO box metrics Detectron2's EvalHook wrote into output_dir/metrics.json."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics.json in {output_dir}")
    found = None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                found = row
    if found is None:
        raise SystemExit(f"{path} holds no bbox/AP (was the model evaluated?)")
    return {k[len("bbox/"):]: v for k, v in found.items() if k.startswith("bbox/")}


def points_from_runs(runs, costs_file, latency_file=None):
    costs = {r["model"]: r for r in json.load(open(costs_file))["end_to_end"]}
    latency = {}
    if latency_file:
        latency = {os.path.normpath(r["config"]): r["latency_ms_median"]
                   for r in json.load(open(latency_file))["results"]}
    points = []
    for run in runs:
        name, _, output_dir = run.partition("=")
        if name not in costs:
            raise SystemExit(f"plot_ap_vs_cost: {name!r} is not a model of {costs_file} "
                             f"({sorted(costs)})")
        config = os.path.normpath(costs[name]["config"])
        ms = next((v for k, v in latency.items() if k.endswith(config)), None)
        points.append({"model": name, "AP": last_bbox_metrics(output_dir)["AP"],
                       "gmacs": costs[name]["total"],
                       "ms_per_image": ms})
    return points


def plot(points, prefix, title):
    panels = [("gmacs", "inference GMACs per image")]
    if all(p.get("ms_per_image") is not None for p in points):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", help="a quickstart summary.json")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="a model name of --costs and its Detectron2 output directory")
    parser.add_argument("--costs", help="JSON written by tools/measure_capacity.py")
    parser.add_argument("--latency", help="JSON written by tools/benchmark.py --output")
    parser.add_argument("--output", help="path prefix of the PNG and SVG")
    parser.add_argument("--title", default="AP against cost")
    args = parser.parse_args()
    if args.summary:
        summary = json.load(open(args.summary))
        points = [{"model": r["model"], "AP": r["AP"], "AP_std": r.get("AP_std"),
                   "gmacs": r["gmacs"], "ms_per_image": r["ms_per_image"]}
                  for r in summary["rows"]]
        prefix = args.output or os.path.join(os.path.dirname(args.summary), "ap_vs_cost")
    elif args.run and args.costs:
        points = points_from_runs(args.run, args.costs, args.latency)
        prefix = args.output or "output/ap_vs_cost"
    else:
        parser.error("give --summary, or --run NAME=DIR (repeated) with --costs")
    for path in plot(points, prefix, args.title):
        print(path)


if __name__ == "__main__":
    main()
