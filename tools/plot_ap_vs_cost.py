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

from msad.benchmark.report import plot, points_from_runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", help="a quickstart summary.json")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="a model name of --costs and its Detectron2 output directory")
    parser.add_argument("--costs", help="JSON written by tools/measure_capacity.py")
    parser.add_argument("--latency", help="JSON written by tools/benchmark.py --output")
    parser.add_argument("--output", help="path prefix of the PNG and SVG")
    parser.add_argument("--title", default="AP against cost")
    args = parser.parse_args(argv)
    if args.summary:
        summary = json.load(open(args.summary))
        points = [{"model": r["model"], "AP": r["AP"], "AP_std": r.get("AP_std"),
                   "gmacs": r["gmacs"], "ms_per_image": r["ms_per_image"]}
                  for r in summary["rows"]]
        prefix = args.output or os.path.join(os.path.dirname(args.summary), "ap_vs_cost")
    elif args.run and args.costs:
        try:
            points = points_from_runs(args.run, args.costs, args.latency)
        except (OSError, ValueError) as e:
            raise SystemExit(f"plot_ap_vs_cost: {e}") from None
        prefix = args.output or "output/ap_vs_cost"
    else:
        parser.error("give --summary, or --run NAME=DIR (repeated) with --costs")
    for path in plot(points, prefix, args.title):
        print(path)


if __name__ == "__main__":
    main()
