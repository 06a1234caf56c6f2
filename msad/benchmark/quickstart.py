"""The main job's stage pipeline (tools/quickstart.py): the quickstart models, each trained by
its own script in a subprocess, seed after seed, with one progress line per Detectron2 log line
and an ETA for the whole job.  tools/quickstart.py prints the report (msad.benchmark.report)."""
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from ..config import REPO, load_config
from ..data.label_formats import to_coco_file
from .pipeline import fmt, progress_of


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


def own_data_overrides(train, val, classes, output):
    """Config overrides that train and evaluate every stage on `train` and `val` (each LABELS,
    IMAGES; LABELS a COCO JSON, or a folder of VOC or YOLO labels converted into `output`/data/
    with the class names `classes`), with the number of classes from the data and the test size
    chosen from the val images."""
    def converted(labels, images, split, names):
        json_file = to_coco_file(labels, images, os.path.join(output, "data", f"{split}.json"),
                                 names)
        with open(json_file) as f:
            coco = json.load(f)
        return json_file, coco, [c["name"] for c in sorted(coco["categories"],
                                                           key=lambda c: c["id"])]

    train_json, train_coco, names = converted(*train, "train", classes)
    val_json, val_coco, val_names = converted(*val, "val", names)  # VOC, YOLO: train's names
    if val_names != names:
        raise ValueError(f"--train has the classes {names}, --val {val_names}")
    longest = max(max(i["width"], i["height"]) for i in val_coco["images"])
    # Images that fit in Detectron2's default test size are used as they are, like the bundled
    # ones; larger ones are resized as COCO is (shorter side 800, longer at most 1333).
    sizes = ["INPUT.MIN_SIZE_TRAIN", "(0,)", "INPUT.MIN_SIZE_TEST", "0"] if longest <= 1333 else \
        ["INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MIN_SIZE_TEST", "800",
         "INPUT.MAX_SIZE_TRAIN", "1333", "INPUT.MAX_SIZE_TEST", "1333"]
    entries = [["own_train", train_json, train[1]], ["own_val", val_json, val[1]]]
    print(f"Data: {len(train_coco['images'])} train and {len(val_coco['images'])} val images, "
          f"{len(names)} classes {names[:10]}{' ...' if len(names) > 10 else ''}; "
          f"{'native size' if longest <= 1333 else 'shorter side 800, longer at most 1333'} "
          f"(largest val image side {longest})", flush=True)
    return ["DATASETS.COCO_INSTANCES", repr(entries), "DATASETS.TRAIN", "('own_train',)",
            "DATASETS.TEST", "('own_val',)", "MODEL.FCOS.NUM_CLASSES", str(len(names)), *sizes]


def train_stages(stages, output, seeds, overrides, reuse_trained):
    """Train every stage of every seed (under `reuse_trained`, only those stages_to_train
    names), printing progress with the stage's and the whole job's ETA."""
    to_train = {seed: stages_to_train(stages, output, seed, reuse_trained) for seed in seeds}
    total_iters = sum(load_config(os.path.join(REPO, stage.config), overrides).SOLVER.MAX_ITER
                      for seed in seeds for stage in stages if stage.name in to_train[seed])
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
            stage_dir = os.path.join(seed_dir(output, seed), stage.name)
            if stage.name not in to_train[seed]:
                print(f"[{tag}] reusing {stage_dir}", flush=True)
                continue
            print(f"[{tag}] training {stage.label} ({stage.config}, SEED {seed})", flush=True)
            # The stage's directory is this job's own output: a rerun replaces it.
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(seed_dir(output, seed), exist_ok=True)
            seconds, iters = train(tag, stage.script, stage.config,
                                   stage_opts(stage, output, seed, overrides),
                                   stage_dir + ".log", progress)
            done["iters"] += iters
            done["seconds"] += seconds
