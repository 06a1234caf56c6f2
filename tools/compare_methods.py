#!/usr/bin/env python
"""The method benchmark: paired seeds, each seed training every model, and for each comparison
the mean difference with its t-interval over the seeds.

    python tools/compare_methods.py [--seeds 5] [--first-seed 0] [--jobs 2] [--iters 900]
        [--protocol detail|synth] [--models hr teacher ...] [--output output/compare]
        [--variant SPEC ...] [--report-only] [-- CONFIG OVERRIDES for every model]
    python tools/compare_methods.py @benchmarks/hypotheses.args --seeds 3  # arguments from a file

Models (configs/quickstart/ with the protocol's dataset and schedule): hr, teacher (also
evaluated per branch, HR and LR alone), lr, lr_long (the LR FCOS trained as many iterations as
teacher + student), lr_teacher_init, student, bicubic_4x, thumbdet_4x.  The comparisons whose
two models are trained are reported: LR - HR (what there is to recover), teacher - HR,
student - teacher-initialised LR FCOS (distillation alone), student - LR FCOS, and the rest
(msad/benchmark/compare.py COMPARISONS).  --jobs trainings run at once, each on its share of the CPU
threads.  A rerun keeps every finished model (its result.json) and trains the rest.  Writes
into --output: seed<S>/<model>/ (each Detectron2 output directory, its log beside it),
compare.json (every seed's metrics, the differences and intervals), compare.md (the tables)
and compare.png (the differences, one dot per seed, with their intervals).  @FILE reads
arguments from FILE, shell-quoted, any number per line, # starting a comment.
"""
import argparse
import json
import os
import shlex
import signal
import sys
import time

from msad.benchmark.compare import (MODELS, MODEL_NAMES, PROTOCOLS, Run, job_overrides, markdown,
                                    parse_variant, plan, plot, read_results, run_jobs, summarise,
                                    to_run, variant_comparisons)
from msad.benchmark.pipeline import add_schedule_arguments, check_at_least, checked_overrides

DEFAULT_MODELS = ("hr", "teacher", "lr", "lr_long", "lr_teacher_init", "student")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     fromfile_prefix_chars="@")
    parser.convert_arg_line_to_args = lambda line: shlex.split(line, comments=True)
    parser.add_argument("--output", default="output/compare")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds (at least 2)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of each training (default: the cores / --jobs)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="detail",
                        help="the dataset (and its settings) every model trains on")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=DEFAULT_MODELS)
    parser.add_argument("--variant", action="append", default=[], metavar="SPEC",
                        help='one more model: "NAME=BASE [xK] [KEY=SOURCE ...] [KEY VALUE ...]", '
                        "BASE trained K times as long, with a config key's weights from another "
                        "model, with its own overrides; compared with BASE and with what BASE "
                        "is compared with (e.g. \"teacher_lr01=teacher SOLVER.BASE_LR 0.01\")")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="one more comparison, A - B (model names, or MODEL:hr / MODEL:lr "
                        "for the teacher's branches)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished models, train nothing")
    add_schedule_arguments(parser, 900, "900; 0 keeps the configs' own")
    args = parser.parse_args(argv)
    args.overrides = checked_overrides(parser, args.overrides,
                                       {"SEED": "--first-seed", "OUTPUT_DIR": "--output"})
    check_at_least(parser, {"--seeds": (2, " (an interval needs a spread)"),
                            "--first-seed": (0, ""), "--jobs": (1, ""), "--threads": (1, ""),
                            "--iters": (0, "")}, args)
    models = [m for m in MODELS if m.name in args.models]
    output = os.path.abspath(args.output)  # the training scripts run from the repository
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    try:
        for spec in args.variant:
            models.append(parse_variant(spec, models))
        jobs = plan(models, seeds, output)
    except ValueError as e:
        parser.error(str(e))
    names = {m.name for m in models} | {f"{m.name}:{e}" for m in models for e in m.evals}
    unknown = sorted({n for pair in args.compare for n in pair} - names)
    if unknown:
        parser.error(f"--compare names {unknown}, not models here ({sorted(names)})")
    comparisons = variant_comparisons(models) + [(a, b, f"{a} - {b}") for a, b in args.compare]
    # What the trained models in --output depend on: a rerun must ask for the same.
    settings = {"protocol": args.protocol, "iters": args.iters, "overrides": args.overrides}
    variants = {m.name: shlex.join(shlex.split(spec)) for m, spec in
                zip(models[len(models) - len(args.variant):], args.variant)}
    settings_file = os.path.join(output, "settings.json")
    if os.path.isfile(settings_file):
        with open(settings_file) as f:
            earlier = json.load(f)
        earlier_variants = earlier.pop("variants", {})
        if earlier != settings:
            raise SystemExit(f"compare_methods: {output} holds models trained with {earlier}, "
                             f"not {settings}: choose another --output")
        for name, spec in variants.items():
            if earlier_variants.get(name, spec) != spec:
                raise SystemExit(f"compare_methods: variant {name} was trained in {output} as "
                                 f"{earlier_variants[name]!r}, not {spec!r}: give it another name")
        variants = dict(earlier_variants, **variants)
    os.makedirs(output, exist_ok=True)
    if not args.report_only:  # a report trains nothing: it records no variant
        with open(settings_file, "w") as f:
            json.dump(dict(settings, variants=variants), f, indent=2)

    if not args.report_only:
        todo = to_run(jobs)
        print(f"{len(jobs) - len(todo)} of {len(jobs)} models already trained in {output}; "
              f"training {len(todo)}, {args.jobs} at a time", flush=True)
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        opts = [*PROTOCOLS[args.protocol], *args.overrides]

        def start(job):
            return Run(job, job_overrides(job, opts, args.iters), threads)

        failed = run_jobs(todo, start, args.jobs, report=lambda line: print(line, flush=True))
        if failed:
            raise SystemExit(f"compare_methods: {', '.join(failed)} failed")

    summary = summarise(read_results(jobs), seeds, comparisons)
    labels = {m.name: m.label for m in models}
    table = markdown(summary, labels)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    summary.update(settings=settings, written=stamp, cpu_count=os.cpu_count())
    with open(os.path.join(output, "compare.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output, "compare.md"), "w") as f:
        f.write(table + "\n")
    written = [os.path.join(output, name) for name in ("compare.json", "compare.md")]
    if summary["comparisons"]:
        written.append(plot(summary, os.path.join(output, "compare.png"),
                            f"Paired differences over seeds {seeds} ({args.protocol}, "
                            f"{args.iters or 'config'} iterations), "
                            f"{round(summary['confidence'] * 100)} % t-intervals"))
    print(table)
    print(f"Wrote {', '.join(written)}")


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the running trainings are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
