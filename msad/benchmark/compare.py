"""The method benchmark (tools/compare_methods.py): every seed trains every model of the
comparisons, and each comparison is the paired difference over seeds, with a t-interval.

A model is a quickstart config (configs/quickstart/) plus overrides; models that start from
another one (the teacher-initialised LR FCOS and the student from the teacher, the thumbnail
detectors from the HR FCOS) run after it, on the same seed.  A finished model leaves
``result.json`` in its directory; a rerun keeps it and trains only what is missing (and what
starts from a model trained again).  Several trainings run at once, each on its share of the
CPU threads.
"""
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..config import REPO, load_config
from ..utils.io import write_atomically
from .paired import paired_difference, verdict
from .pipeline import fmt, progress_of, schedule_overrides


class Model(NamedTuple):
    name: str
    label: str
    script: str
    config: str  # relative to the repository
    sources: Dict[str, str] = {}  # {config key: model whose model_final.pth it takes}
    opts: Tuple[str, ...] = ()  # the model's own overrides
    # Extra --eval-only runs of the trained model, {name: overrides}: reported as model:name.
    evals: Dict[str, Tuple[str, ...]] = {}
    iter_scale: int = 1  # trains this many times the protocol's iterations
    variant_of: str = ""  # the model this one varies (parse_variant)


def quickstart(name):
    return f"configs/quickstart/{name}.yaml"


MODELS = (
    Model("hr", "HR FCOS", "train_net_T.py", quickstart("hr_baseline")),
    Model("teacher", "MSAD teacher", "train_net_T.py", quickstart("teacher"),
          evals={"hr": ("MODEL.MSAD.TEST_BRANCH", "hr"), "lr": ("MODEL.MSAD.TEST_BRANCH", "lr")}),
    Model("lr", "LR FCOS", "train_net_T.py", quickstart("lr_baseline")),
    # The control for the teacher-initialised models' iterations: teacher + student = 2x.
    Model("lr_long", "LR FCOS, 2x iterations", "train_net_T.py", quickstart("lr_baseline"),
          iter_scale=2),
    Model("lr_teacher_init", "LR FCOS, teacher init, no distillation", "train_net_S.py",
          quickstart("lr_teacher_init"), {"MODEL.TEACHER.WEIGHTS": "teacher"}),
    Model("student", "MSAD student", "train_net_S.py", quickstart("student"),
          {"MODEL.TEACHER.WEIGHTS": "teacher"}),
    Model("bicubic_4x", "bicubic 4x thumbnail FCOS", "train_net_T.py", quickstart("bicubic_4x"),
          {"MODEL.WEIGHTS": "hr"}),
    Model("thumbdet_4x", "ThumbDet 4x (learned)", "train_net_S.py", quickstart("thumbdet_4x"),
          {"MODEL.TEACHER.WEIGHTS": "hr"}),
)
MODEL_NAMES = tuple(m.name for m in MODELS)

# (a, b, what a - b measures): a and b are model names, or model:eval for an extra evaluation.
COMPARISONS = tuple(tuple(row.split(" ", 2)) for row in """\
lr hr what there is to recover (LR FCOS - HR FCOS)
teacher hr teacher - HR FCOS
teacher:hr hr teacher's HR branch alone - HR FCOS
student lr_teacher_init distillation alone (student - LR FCOS, teacher init)
student lr student - LR FCOS
student lr_long student - LR FCOS trained as long as teacher + student
lr_teacher_init lr_long teacher init alone (LR FCOS, teacher init - 2x LR FCOS)
thumbdet_4x bicubic_4x ThumbDet 4x - bicubic 4x""".splitlines())
METRICS = ("AP", "APs", "AP50")
# The dataset and schedule of a benchmark, as overrides of every model's config.
PROTOCOLS = {
    # msad_detail: small objects told apart by a hole a 2x down-sampling blurs (msad.data.synthetic);
    # batch 8, no data-loader workers (deterministic, and cheap on 128-pixel images).
    "detail": ("DATASETS.TRAIN", "('msad_detail_train',)", "DATASETS.TEST", "('msad_detail_val',)",
               "MODEL.FCOS.NUM_CLASSES", "4", "SOLVER.IMS_PER_BATCH", "8",
               "DATALOADER.NUM_WORKERS", "0"),
    # The bundled msad_synth as the main job trains on it.
    "synth": ("DATALOADER.NUM_WORKERS", "0"),
}
RESULT = "result.json"


def parse_variant(spec: str, models: List[Model]) -> Model:
    """A variant of a model: "NAME=BASE [xK] [KEY=SOURCE ...] [KEY VALUE ...]".

    xK trains K times the iterations; KEY=SOURCE takes that config key's weights from another
    model (e.g. MODEL.TEACHER.WEIGHTS=teacher_lr01, a teacher variant); KEY VALUE pairs are
    config overrides of this model alone.  The variant is named NAME and compared with BASE and
    with what BASE is compared with."""
    tokens = shlex.split(spec)
    name, _, base_name = (tokens[0] if tokens else "").partition("=")
    by_name = {m.name: m for m in models}
    if not name or base_name not in by_name:
        raise ValueError(f"--variant {spec!r}: it starts NAME=BASE with BASE one of "
                         f"{sorted(by_name)}")
    if name in by_name:
        raise ValueError(f"--variant {spec!r}: the name {name} is taken")
    base = by_name[base_name]
    sources, opts, iter_scale, rest = dict(base.sources), [], base.iter_scale, tokens[1:]
    while rest:
        token = rest.pop(0)
        if re.fullmatch(r"x\d+", token):
            iter_scale = base.iter_scale * int(token[1:])
        elif "=" in token:
            key, _, source = token.partition("=")
            if source not in by_name:
                raise ValueError(f"--variant {spec!r}: {key} takes weights from {source!r}, "
                                 f"which is not a model here ({sorted(by_name)})")
            sources[key] = source
        elif rest:
            opts += [token, rest.pop(0)]
        else:
            raise ValueError(f"--variant {spec!r}: config override {token} has no value")
    return base._replace(name=name, label=f"{base.label} [{name}]", sources=sources,
                         opts=base.opts + tuple(opts), iter_scale=iter_scale, variant_of=base.name)


def variant_comparisons(models: List[Model], comparisons=COMPARISONS):
    """The comparisons, plus for each variant: variant - its base, and the base's comparisons
    with the variant in its place."""
    out = list(comparisons)
    for m in models:
        if not m.variant_of:
            continue
        out.append((m.name, m.variant_of, f"{m.name} - {m.variant_of}"))
        for a, b, what in comparisons:
            if a.split(":")[0] == m.variant_of:
                out.append((m.name + a[len(m.variant_of):], b, f"{what} [{m.name}]"))
    return out


class Job(NamedTuple):
    seed: int
    model: Model
    directory: str  # the model's Detectron2 OUTPUT_DIR for this seed

    @property
    def tag(self):
        return f"seed {self.seed} {self.model.name}"


def plan(models: List[Model], seeds: List[int], output: str) -> List[Job]:
    """Every (seed, model), seeds in order so that finished seeds can be read early; a model
    taking weights from another needs it in `models`."""
    names = {m.name for m in models}
    for m in models:
        missing = set(m.sources.values()) - names
        if missing:
            raise ValueError(f"model {m.name} starts from {sorted(missing)}: add it to --models")
    return [Job(seed, m, os.path.join(output, f"seed{seed}", m.name)) for seed in seeds
            for m in models]


def is_finished(job: Job) -> bool:
    return os.path.isfile(os.path.join(job.directory, RESULT))


def to_run(jobs: List[Job]) -> List[Job]:
    """The jobs without a result, and those starting from a model that is trained again."""
    again = set()
    for job in jobs:  # plan() puts every source before the models taking from it
        if not is_finished(job) or {(job.seed, s) for s in job.model.sources.values()} & again:
            again.add((job.seed, job.model.name))
    return [j for j in jobs if (j.seed, j.model.name) in again]


def job_overrides(job: Job, protocol_opts, iters: Optional[int]):
    """The job's overrides: the protocol, its schedule (`iters`, or the config's own MAX_ITER
    when 0, times the model's ``iter_scale``), its seed, output and weights."""
    opts = list(protocol_opts)
    if not iters and job.model.iter_scale != 1:
        iters = load_config(os.path.join(REPO, job.model.config), opts).SOLVER.MAX_ITER
    if iters:
        opts += schedule_overrides(iters * job.model.iter_scale)
    opts += ["OUTPUT_DIR", job.directory, "SEED", str(job.seed), *job.model.opts]
    for key, source in job.model.sources.items():
        opts += [key, os.path.join(os.path.dirname(job.directory), source, "model_final.pth")]
    return opts


def copypaste_metrics(log_text):
    """The last COCO box metrics Detectron2 printed ("copypaste:" lines), in percent."""
    lines = [line.split("copypaste: ", 1)[1].strip() for line in log_text.splitlines()
             if "copypaste: " in line]
    for i in range(len(lines) - 1, 0, -1):
        if lines[i - 1].startswith("AP,"):
            keys, values = lines[i - 1].split(","), lines[i].split(",")
            return {k: (None if v == "nan" else float(v)) for k, v in zip(keys, values)}
    return None


# Training diagnostics read from each model's metrics.json: the teacher's fusion weights and the
# student's gradient share (msad/modeling/teacher.py, msad/modeling/student.py).
DIAGNOSTICS = ("fusion_hr_weight/", "grad_share/", "grad_norm/")


def training_scalars(metrics_file, prefixes=DIAGNOSTICS):
    """{name: {"last": value, "mean": over the run}} of every scalar in Detectron2's
    metrics.json whose name starts with one of `prefixes`."""
    rows = {}
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            for line in f:
                for k, v in json.loads(line).items():
                    if k.startswith(prefixes):
                        rows.setdefault(k, []).append(v)
    return {k: {"last": v[-1], "mean": sum(v) / len(v)} for k, v in sorted(rows.items())}


class Run:
    """One job as a sequence of subprocesses (training, then its extra evaluations), advanced by
    ``poll()`` so that several jobs can run side by side."""

    def __init__(self, job: Job, opts, threads: int):
        self.job, self.threads = job, threads
        config = job.model.config
        base = [sys.executable, os.path.join(REPO, job.model.script), "--config-file", config]
        self.steps = [("train", base + list(opts))]
        weights = os.path.join(job.directory, "model_final.pth")
        for name, extra in job.model.evals.items():
            eval_dir = os.path.join(job.directory, f"eval_{name}")
            self.steps.append((name, base + ["--eval-only", *opts, "MODEL.WEIGHTS", weights,
                                             *extra, "OUTPUT_DIR", eval_dir]))
        self.log_path = job.directory + ".log"
        self.logs = {}
        self.proc = None
        self.start = time.time()
        self.returncode = None
        self._next()

    def _next(self):
        name, cmd = self.steps[len(self.logs)]
        self.logs[name] = self.log_path if name == "train" else \
            os.path.join(self.job.directory, f"eval_{name}.log")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        with open(self.logs[name], "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env=env)

    def poll(self):
        """None while running; else the exit status (0 when every step succeeded)."""
        if self.returncode is not None:
            return self.returncode
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc != 0 or len(self.logs) == len(self.steps):
            self.returncode = rc
            if rc == 0:
                try:
                    self.write_result()
                except (OSError, RuntimeError, ValueError) as e:  # that job fails, not the others
                    with open(self.log_path, "a") as log:
                        log.write(f"\ncompare_methods: {e}\n")
                    self.returncode = 1
            return self.returncode
        self._next()
        return None

    def progress(self):
        """(iterations done, seconds left) of the training step, from its log."""
        if len(self.logs) > 1:
            return None
        try:
            with open(self.log_path) as f:
                found = [p for p in map(progress_of, f) if p]
        except OSError:
            return None
        return found[-1] if found else None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def write_result(self):
        metrics = {}
        for name, path in self.logs.items():
            with open(path) as f:
                found = copypaste_metrics(f.read())
            if found is None:
                raise RuntimeError(f"{self.job.tag}: no COCO metrics in {path}")
            metrics[name] = found
        result = {"seed": self.job.seed, "model": self.job.model.name,
                  "seconds": round(time.time() - self.start, 1), "threads": self.threads,
                  "metrics": metrics.pop("train"), "evals": metrics}
        write_atomically(os.path.join(self.job.directory, RESULT), "w",
                         lambda f: json.dump(result, f, indent=2))


def run_jobs(jobs: List[Job], start, parallel: int, report=print, status_every=60.0,
             poll_every=1.0):
    """Run `jobs` (in order, a job once the models it starts from are finished), `parallel` at
    a time; ``start(job)`` returns a ``Run``-like object.  A failed job stops new starts; the
    running ones finish.  Returns the failed jobs' tags."""
    for job in jobs:  # a result trained again must not outlive an interrupted run
        if is_finished(job):
            os.remove(os.path.join(job.directory, RESULT))
    waiting, running, failed = list(jobs), [], []
    finished = set()
    pending = {(j.seed, j.model.name) for j in jobs}
    durations: Dict[str, List[float]] = {}
    last_status = time.time()
    begin = time.time()

    def ready(job):
        return all((job.seed, s) not in pending or (job.seed, s) in finished
                   for s in job.model.sources.values())

    try:
        while waiting or running:
            while not failed and waiting and len(running) < parallel:
                job = next((j for j in waiting if ready(j)), None)
                if job is None:
                    break
                waiting.remove(job)
                shutil.rmtree(job.directory, ignore_errors=True)  # a half-done run: start afresh
                os.makedirs(job.directory)
                report(f"[{len(finished) + len(failed) + len(running) + 1}/{len(jobs)}] {job.tag}: "
                       f"training")
                running.append((job, start(job), time.time()))
            for item in list(running):
                job, run, started = item
                rc = run.poll()
                if rc is None:
                    continue
                running.remove(item)
                if rc == 0:
                    finished.add((job.seed, job.model.name))
                    durations.setdefault(job.model.name, []).append(time.time() - started)
                    report(f"{job.tag}: done in {time.time() - started:.0f} s")
                else:
                    failed.append(job.tag)
                    report(f"{job.tag}: failed (exit {rc}); see {job.directory}.log")
            if failed and not running:
                break
            if running and time.time() - last_status >= status_every:
                last_status = time.time()
                report(status_line(running, waiting, durations, parallel, begin))
            if running:
                time.sleep(poll_every)
        return failed
    except BaseException:  # Ctrl-C, SIGTERM: do not leave trainings running alone
        for _, run, _ in running:
            run.kill()
        raise


def status_line(running, waiting, durations, parallel, begin):
    """What runs, how far each is, and the whole benchmark's ETA (remaining work at the mean
    duration seen for each model, spread over the parallel slots)."""
    seen = [d for ds in durations.values() for d in ds]
    typical = sum(seen) / len(seen) if seen else None
    left, parts = 0.0, []
    for job, run, started in running:
        found = run.progress()
        parts.append(f"{job.tag} {found[0]} it" if found else job.tag)
        left += found[1] if found else 0.0
    for job in waiting:
        own = durations.get(job.model.name)
        estimate = sum(own) / len(own) if own else typical
        if estimate is None:
            return f"running: {', '.join(parts)}; elapsed {fmt(time.time() - begin)}"
        left += estimate
    return (f"running: {', '.join(parts)}; {len(waiting)} waiting; elapsed "
            f"{fmt(time.time() - begin)}, ETA ~{fmt(left / parallel)}")


def read_results(jobs: List[Job]):
    """{(seed, name): metrics} of every finished job, extra evaluations as name:eval."""
    out = {}
    for job in jobs:
        if not is_finished(job):
            continue
        with open(os.path.join(job.directory, RESULT)) as f:
            result = json.load(f)
        out[(job.seed, job.model.name)] = dict(
            result["metrics"],
            scalars=training_scalars(os.path.join(job.directory, "metrics.json")))
        for name, metrics in result["evals"].items():
            out[(job.seed, f"{job.model.name}:{name}")] = metrics
    return out


def summarise(results, seeds, comparisons=COMPARISONS, confidence=0.95):
    """Per model: mean and std of each metric over the seeds it finished; per comparison
    whose two sides both finished on some seeds: the paired difference of each metric."""
    models = {}
    for (seed, name), metrics in results.items():
        models.setdefault(name, {})[seed] = metrics
    model_rows = {}
    for name, per_seed in models.items():
        row = {"seeds": sorted(per_seed)}
        for key in METRICS:
            values = [per_seed[s][key] for s in sorted(per_seed) if per_seed[s][key] is not None]
            row[key] = sum(values) / len(values) if values else None
            row[f"{key}_all"] = values
        # Each diagnostic's last and mean value, averaged over the seeds that logged it.
        scalars = [per_seed[s].get("scalars", {}) for s in sorted(per_seed)]
        names = sorted({k for found in scalars for k in found})
        if names:
            row["diagnostics"] = {
                k: {stat: statistics.mean(f[k][stat] for f in scalars if k in f)
                    for stat in ("last", "mean")} for k in names}
        model_rows[name] = row
    rows = []
    for a, b, what in comparisons:
        paired = [s for s in seeds if (s, a) in results and (s, b) in results]
        if not paired:
            continue
        row = {"a": a, "b": b, "what": what, "seeds": paired}
        for key in METRICS:
            pairs = [(results[(s, a)][key], results[(s, b)][key]) for s in paired]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            if pairs:
                row[key] = paired_difference([x for x, _ in pairs], [y for _, y in pairs],
                                             confidence)
                row[key]["verdict"] = verdict(row[key])
        rows.append(row)
    return {"seeds": list(seeds), "confidence": confidence, "models": model_rows,
            "comparisons": rows}


def interval_text(d):
    if d is None:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def markdown(summary, labels):
    """The summary as two markdown tables: paired differences, then each model's mean AP."""
    pct = round(summary["confidence"] * 100)
    lines = [f"| comparison (a - b) | seeds | AP, mean [{pct} % interval] | AP_S | AP50 | AP reads |",
             "|---|---|---|---|---|---|"]
    for row in summary["comparisons"]:
        ap = row.get("AP")
        lines.append(f"| {row['what']} | {ap['n'] if ap else 0} | "
                     + " | ".join(interval_text(row.get(k)) for k in METRICS)
                     + f" | {ap['verdict'] if ap else 'n/a'} |")
    lines += ["", "| model | seeds | AP (each seed) | mean AP | mean AP_S | mean AP50 |",
              "|---|---|---|---|---|---|"]
    for name, row in summary["models"].items():
        label = labels.get(name.split(":")[0], name)
        if ":" in name:
            label += f" ({name.split(':')[1].upper()} branch alone)"
        each = " ".join(f"{v:.2f}" for v in row["AP_all"])
        lines.append(f"| {label} | {len(row['seeds'])} | {each} | "
                     + " | ".join("n/a" if row[k] is None else f"{row[k]:.2f}" for k in METRICS)
                     + " |")
    for name, row in summary["models"].items():
        found = row.get("diagnostics", {})
        fusion = {k.split("/")[-1]: v["last"] for k, v in found.items()
                  if k.startswith("fusion_hr_weight/")}
        if fusion:
            lines += ["", f"{labels.get(name, name)}: mean HR weight of the fusion at the end of "
                      "training, per level: " + ", ".join(f"{k} {v:.2f}" for k, v in fusion.items())]
        if "grad_share/distill" in found:
            share = found["grad_share/distill"]
            lines += ["", f"{labels.get(name, name)}: the distillation's share of the gradient at "
                      f"the FPN outputs, {share['mean']:.2f} over training, {share['last']:.2f} "
                      "at the end"]
    return "\n".join(lines)


def plot(summary, path, title):
    """Each comparison's paired differences (one dot per seed) and interval, AP / AP_S / AP50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["comparisons"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 0.6 * len(rows) + 1.6),
                             sharey=True)
    for ax, key in zip(axes, METRICS):
        for y, row in enumerate(rows):
            d = row.get(key)
            if d is None:
                continue
            ax.scatter(d["differences"], [y] * len(d["differences"]), s=12, color="0.6",
                       zorder=2)
            if d["low"] is not None:
                colour = {"above 0": "tab:green", "below 0": "tab:red"}.get(d["verdict"],
                                                                             "tab:blue")
                ax.plot([d["low"], d["high"]], [y, y], color=colour, lw=3, zorder=3)
            ax.scatter([d["mean"]], [y], color="black", marker="|", s=200, zorder=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"difference in {key.replace('APs', 'AP_S')} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels([r["what"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
