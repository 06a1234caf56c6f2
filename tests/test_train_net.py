"""train_net_T.py end to end: command-line errors, and the quickstart teacher."""
import os

import pytest

from helpers import QUICKSTART_TEACHER, REPO, final_ap, train_net


def test_missing_config_file_is_named():
    proc = train_net("--config-file", "configs/nope.yaml")
    assert proc.returncode != 0 and "configs/nope.yaml" in proc.stderr


def test_unknown_config_key_is_named(tmp_path):
    proc = train_net("--config-file", QUICKSTART_TEACHER, "MODEL.MSAD.NO_SUCH_KEY", 1,
                     "OUTPUT_DIR", tmp_path)
    assert proc.returncode != 0 and "MODEL.MSAD.NO_SUCH_KEY" in proc.stderr


def test_eval_only_without_weights_is_refused(tmp_path):
    proc = train_net("--config-file", QUICKSTART_TEACHER, "--eval-only", "OUTPUT_DIR", tmp_path)
    assert proc.returncode != 0 and "MODEL.WEIGHTS" in proc.stderr


def test_each_script_trains_only_its_own_kind_of_model(tmp_path):
    student = os.path.join(REPO, "configs", "quickstart", "student.yaml")
    proc = train_net("--config-file", student, "OUTPUT_DIR", tmp_path / "s")
    assert proc.returncode != 0 and "is trained by train_net_S.py" in proc.stderr
    proc = train_net("--config-file", QUICKSTART_TEACHER, "OUTPUT_DIR", tmp_path / "t",
                     script="train_net_S.py")
    assert proc.returncode != 0 and "is trained by train_net_T.py" in proc.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_an_empty_training_set_is_named(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    proc = train_net("--config-file", QUICKSTART_TEACHER, "DATASETS.COCO_INSTANCES",
                     f"[['nothing', '{empty}', '{tmp_path}']]", "DATASETS.TRAIN", "('nothing',)",
                     "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode != 0 and "Dataset 'nothing' is empty" in proc.stderr


def test_resume_without_a_checkpoint_starts_a_fresh_run(tmp_path):
    """As in Detectron2, so that one command both starts and restarts a preemptible job."""
    proc = train_net("--config-file", QUICKSTART_TEACHER, "--resume", "SOLVER.MAX_ITER", 1,
                     "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path / "x")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume: no checkpoint in OUTPUT_DIR" in proc.stdout + proc.stderr
    assert (tmp_path / "x" / "last_checkpoint").read_text() == "model_final.pth"


@pytest.mark.slow
def test_quickstart_teacher_trains_and_eval_only_reproduces_its_ap(tmp_path):
    out = tmp_path / "teacher"
    trained = train_net("--config-file", QUICKSTART_TEACHER, "OUTPUT_DIR", out)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ap_after_training = final_ap(trained.stdout)
    assert float(ap_after_training.split(",")[0]) > 1.0  # AP in percent: clearly learned
    assert (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    evaluated = train_net("--config-file", QUICKSTART_TEACHER, "--eval-only",
                          "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert final_ap(evaluated.stdout) == ap_after_training
