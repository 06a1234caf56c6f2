"""Own data and other layouts: the teacher is rebuilt as it was trained, config paths resolve
from a Detectron2 checkout's root with this project in projects/."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import (REPO, edit_json, quickstart_cfg, small_dataset, tool_here, train_net,
                     train_net_here)
from msad.config import load_config

SHORT = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()",
         "DATALOADER.NUM_WORKERS", "0"]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A small COCO-format set with three categories: the DATASETS overrides that train on it."""
    root = tmp_path_factory.mktemp("three")
    json_file, images = small_dataset(root, n=4)

    def three(coco):
        coco["categories"] = [{"id": i, "name": n} for i, n in enumerate("abc", 1)]
        for a in coco["annotations"]:
            a["category_id"] = a["category_id"] % 3 + 1

    edit_json(json_file, three)
    return ["DATASETS.COCO_INSTANCES", f"[['three', '{json_file}', '{images}']]",
            "DATASETS.TRAIN", "('three',)"]


@pytest.fixture(scope="module")
def three_class_teacher(three_classes, tmp_path_factory):
    """The quickstart teacher trained for two iterations on `three_classes` at width 0.5 (its
    yaml says 5 classes and width 0.25): the weights and their training's config.yaml."""
    out = tmp_path_factory.mktemp("teacher")
    trained = train_net_here("--config-file", "configs/quickstart/teacher.yaml", *three_classes,
                             "MODEL.FCOS.NUM_CLASSES", "3", "MODEL.SLIMMABLE.WIDTH", "0.5", *SHORT,
                             "OUTPUT_DIR", out)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return out / "model_final.pth"


def test_a_student_is_distilled_from_the_teacher_as_it_was_trained(three_classes,
                                                                   three_class_teacher, tmp_path):
    """Overrides given to train the teacher (classes, width) reach the frozen teacher: it is
    rebuilt from the config.yaml its training wrote, not from its yaml alone."""
    student = train_net("--config-file", "configs/quickstart/student.yaml", *three_classes,
                        "MODEL.FCOS.NUM_CLASSES", "3", "MODEL.SLIMMABLE.WIDTH", "0.5", *SHORT,
                        "MODEL.TEACHER.WEIGHTS", three_class_teacher,
                        "OUTPUT_DIR", tmp_path / "s", script="train_net_S.py")
    assert student.returncode == 0, student.stderr[-3000:]
    teacher_config_file = three_class_teacher.parent / "config.yaml"
    assert f"built from {teacher_config_file}" in student.stdout + student.stderr
    with open(tmp_path / "s" / "config.yaml") as f:  # the student's run says which it used
        assert yaml.safe_load(f)["MODEL"]["TEACHER"]["CONFIG_FILE"] == str(teacher_config_file)


def test_a_teacher_of_other_classes_is_refused_before_anything_is_written(three_class_teacher,
                                                                          tmp_path):
    student = train_net_here("--config-file", "configs/quickstart/student.yaml", *SHORT,
                             "MODEL.TEACHER.WEIGHTS", three_class_teacher,
                             "OUTPUT_DIR", tmp_path / "s", script="train_net_S.py")
    assert student.returncode != 0
    assert "the teacher" in student.stderr and "detects 3 classes and the student 5" in student.stderr
    assert not (tmp_path / "s").exists()


def test_a_teacher_config_named_on_the_command_line_is_used_and_checked(three_class_teacher):
    """Naming another config is the user's choice; one that disagrees with what the weights were
    trained with (model_info.json) is refused by name."""
    from msad.engine.teacher import resolve_teacher, use_trained_config

    weights = three_class_teacher
    cfg = load_config(f"{REPO}/configs/quickstart/student.yaml", ["MODEL.TEACHER.WEIGHTS", str(weights)])
    use_trained_config(cfg, named=False)
    assert cfg.MODEL.TEACHER.CONFIG_FILE == str(weights.parent / "config.yaml")
    named = f"{REPO}/configs/quickstart/hr_baseline.yaml"
    cfg = load_config(f"{REPO}/configs/quickstart/student.yaml",
                      ["MODEL.TEACHER.WEIGHTS", str(weights), "MODEL.TEACHER.CONFIG_FILE", named])
    use_trained_config(cfg, named=True)
    assert cfg.MODEL.TEACHER.CONFIG_FILE == named

    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE 'SingleScaleFCOS' "
                       r"\(trained with 'MultiScaleTeacher'\)"):
        resolve_teacher(cfg)


def test_it_runs_from_a_detectron2_checkout_with_the_project_in_projects(tmp_path):
    """As Detectron2's projects are run: from the checkout's root, configs under projects/MSAD.
    Teacher then student, two iterations each; the student's teacher config (named relative to
    its config file) resolves there."""
    project = tmp_path / "projects" / "MSAD"
    for name in ("msad", "configs"):
        shutil.copytree(os.path.join(REPO, name), project / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("train_net_T.py", "train_net_S.py"):
        shutil.copy(os.path.join(REPO, name), project / name)
    env = {**os.environ, "DETECTRON2_DATASETS": os.path.join(REPO, "datasets")}

    def run(script, config, *opts):
        return subprocess.run([sys.executable, f"projects/MSAD/{script}", "--config-file",
                               f"projects/MSAD/configs/quickstart/{config}", *SHORT, *opts],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    teacher = run("train_net_T.py", "teacher.yaml", "OUTPUT_DIR", "output/teacher")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    # Weights without their training config beside them: MODEL.TEACHER.CONFIG_FILE of
    # student.yaml ("teacher.yaml") is found beside student.yaml.
    os.makedirs(tmp_path / "weights")
    shutil.copy(tmp_path / "output" / "teacher" / "model_final.pth", tmp_path / "weights")
    student = run("train_net_S.py", "student.yaml", "MODEL.TEACHER.WEIGHTS",
                  "weights/model_final.pth", "OUTPUT_DIR", "output/student")
    assert student.returncode == 0, student.stderr[-3000:]
    assert "built from projects/MSAD/configs/quickstart/teacher.yaml" in student.stdout + student.stderr
    assert (tmp_path / "output" / "student" / "model_final.pth").exists()


def test_more_categories_than_classes_fails_before_anything_is_written(three_classes, tmp_path):
    proc = train_net_here("--config-file", "configs/quickstart/hr_baseline.yaml", *three_classes,
                     "MODEL.FCOS.NUM_CLASSES", "2", *SHORT, "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode != 0
    assert "dataset three has 3 categories ['a', 'b', 'c'], and MODEL.FCOS.NUM_CLASSES is 2: " \
        "set it to 3" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_best_checkpoint_holds_the_best_ap_of_metrics_json(three_classes, tmp_path):
    """Evaluated every 20 iterations (Detectron2 writes metrics.json every 20): model_best.pth is
    the checkpoint of the evaluation with the highest box AP."""
    import json

    import torch

    out = tmp_path / "out"
    proc = train_net("--config-file", "configs/quickstart/hr_baseline.yaml", *three_classes,
                     "MODEL.FCOS.NUM_CLASSES", "3", *SHORT, "SOLVER.MAX_ITER", "60",
                     "SOLVER.CHECKPOINT_PERIOD", "20", "TEST.EVAL_PERIOD", "20",
                     "DATASETS.TEST", "('three',)", "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluations = [m for m in map(json.loads, (out / "metrics.json").read_text().splitlines())
                   if "bbox/AP" in m]
    assert [m["iteration"] for m in evaluations] == [19, 39, 60]
    best = max(evaluations, key=lambda m: m["bbox/AP"])  # the first of equals, as it keeps
    saved = torch.load(out / "model_best.pth", weights_only=False)
    assert saved["iteration"] == best["iteration"]
    periodic = out / ("model_final.pth" if best["iteration"] == 60 else
                      f"model_{best['iteration']:07d}.pth")
    weights = torch.load(periodic, weights_only=False)["model"]
    assert all(torch.equal(v, weights[k]) for k, v in saved["model"].items())


def test_a_save_into_a_full_file_system_names_the_cause_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch):
    import builtins

    from detectron2.modeling import build_model

    import msad.utils.io as io_module
    from msad.checkpoint.detection_checkpoint import SafeCheckpointer

    saver = SafeCheckpointer(build_model(quickstart_cfg("hr_baseline")), str(tmp_path))
    saver.save("model_0000099")
    kept = (tmp_path / "model_0000099.pth").read_bytes()

    def full_disk(path, mode="r", *args, **kwargs):  # /dev/full: every write fails with ENOSPC
        return builtins.open("/dev/full" if io_module.TEMPORARY_SUFFIX in path else path,
                             mode, *args, **kwargs)

    monkeypatch.setattr(io_module, "open", full_disk, raising=False)
    with pytest.raises(OSError, match=r"ran out of space while saving model_0000199.pth: a "
                       r"checkpoint of this run needs about \d+ MiB, \d+ MiB are free there"
                       r".*last complete checkpoint is kept \(.*model_0000099.pth\)"):
        saver.save("model_0000199")
    assert (tmp_path / "model_0000099.pth").read_bytes() == kept
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000099.pth"
    assert not (tmp_path / "model_0000199.pth").exists()


def write_yolo_dataset(root, n, seed):
    """Synthetic scenes laid out as a YOLO dataset: images/, labels/ (normalised centre and
    size), classes.txt; one image left without a label file."""
    import json

    from msad.data.synthetic import CLASSES, generate_split

    coco = generate_split(str(root / "coco.json"), str(root / "images"), n, seed)
    sizes = {i["id"]: (i["width"], i["height"], i["file_name"]) for i in coco["images"]}
    (root / "labels").mkdir()
    lines = {}
    for a in coco["annotations"]:
        w, h, name = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        lines.setdefault(name, []).append(
            f"{a['category_id'] - 1} {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}")
    for name, rows in sorted(lines.items())[1:]:  # the first image: no label file
        (root / "labels" / name.replace(".jpg", ".txt")).write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "coco.json").unlink()
    return json.loads(json.dumps(coco))


@pytest.mark.slow
def test_one_command_from_yolo_folders_to_a_distilled_student(tmp_path):
    """tools/quickstart.py on one's own data: YOLO folders in, every stage trained (a tiny
    schedule) and evaluated on the val folder, the table, picture and plot out."""
    import json

    for split, n, seed in (("train", 6, 11), ("val", 3, 12)):
        (tmp_path / split).mkdir()
        write_yolo_dataset(tmp_path / split, n, seed)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "quickstart.py"),
         "--train", tmp_path / "train" / "labels", tmp_path / "train" / "images",
         "--val", tmp_path / "val" / "labels", tmp_path / "val" / "images",
         "--classes-file", tmp_path / "train" / "classes.txt", "--iters", "3",
         "--thumbnail-factor", "2", "--timing-images", "3", "--output", out,
         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
         "MODEL.FCOS.SCORE_THRESH_TEST", "0.0"],  # untrained: low scores
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Data: 6 train and 3 val images, 5 classes" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == [
        "hr_baseline", "teacher", "lr_baseline", "lr_teacher_init", "student", "bicubic_2x",
        "thumbdet_2x"]
    assert summary["dataset"] == "own_val" and all(r["AP"] is not None for r in summary["rows"])
    assert "MSAD student" in proc.stdout and "ThumbDet 2x (learned)" in proc.stdout
    for name in ("detections.png", "ap_vs_cost.png", "data/train.json", "data/val.json"):
        assert (out / name).exists(), name
    info = json.loads((out / "seed0" / "student" / "model_info.json").read_text())
    assert info["thing_classes"] == ["disk", "square", "triangle", "ring", "cross"]
    assert info["config"]["MODEL.FCOS.NUM_CLASSES"] == 5


def test_the_one_command_names_labels_it_cannot_read(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "readme.md").write_text("no labels here")
    proc = tool_here("quickstart", "--train", tmp_path / "labels", tmp_path, "--val",
                     tmp_path / "labels", tmp_path, "--output", tmp_path / "out")
    assert proc.returncode == 1
    assert f"quickstart: {tmp_path / 'labels'}: neither a COCO .json file nor a folder of VOC " \
        ".xml or YOLO .txt labels" in proc.stderr
