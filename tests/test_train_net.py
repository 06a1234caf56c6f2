"""train_net_T.py and train_net_S.py: command-line errors (in this process, through the scripts'
own main); train_net_T.py run as a command: a resumed start, --eval-only of a trained model."""
import os

import pytest

from helpers import QUICKSTART_TEACHER, REPO, final_ap, train_in_process, train_net
from msad.benchmark.quickstart import STAGES


def test_missing_config_file_is_named():
    with pytest.raises(FileNotFoundError, match="configs/nope.yaml"):
        train_in_process("--config-file", "configs/nope.yaml")


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(Exception, match="MODEL.MSAD.NO_SUCH_KEY"):
        train_in_process("--config-file", QUICKSTART_TEACHER, "MODEL.MSAD.NO_SUCH_KEY", 1,
                         "OUTPUT_DIR", tmp_path)


def test_eval_only_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        train_in_process("--config-file", QUICKSTART_TEACHER, "--eval-only",
                         "OUTPUT_DIR", tmp_path)


def test_each_script_trains_only_its_own_kind_of_model(tmp_path):
    student = os.path.join(REPO, "configs", "quickstart", "student.yaml")
    with pytest.raises(ValueError, match="is trained by train_net_S.py"):
        train_in_process("--config-file", student, "OUTPUT_DIR", tmp_path / "s")
    with pytest.raises(ValueError, match="is trained by train_net_T.py"):
        train_in_process("--config-file", QUICKSTART_TEACHER, "OUTPUT_DIR", tmp_path / "t",
                         script="train_net_S.py")
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_an_empty_training_set_is_named(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    with pytest.raises(Exception, match="Dataset 'nothing' is empty"):
        train_in_process("--config-file", QUICKSTART_TEACHER, "DATASETS.COCO_INSTANCES",
                         f"[['nothing', '{empty}', '{tmp_path}']]", "DATASETS.TRAIN",
                         "('nothing',)", "OUTPUT_DIR", tmp_path / "out")


def test_resume_without_a_checkpoint_starts_a_fresh_run(tmp_path):
    """As in Detectron2, so that one command both starts and restarts a preemptible job."""
    proc = train_net("--config-file", QUICKSTART_TEACHER, "--resume", "SOLVER.MAX_ITER", 1,
                     "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path / "x")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume: no checkpoint in OUTPUT_DIR" in proc.stdout + proc.stderr
    assert (tmp_path / "x" / "last_checkpoint").read_text() == "model_final.pth"


@pytest.mark.slow
def test_eval_only_of_a_trained_checkpoint_prints_the_ap_its_training_printed(main_job, tmp_path):
    """A model the main job trained with train_net_T.py (the one of the highest AP, so that the
    AP is not merely zero), evaluated again from its checkpoint and the config its run wrote."""
    out, _ = main_job
    runs = {stage.name: out / "seed1" / stage.name for stage in STAGES
            if stage.script == "train_net_T.py"}
    aps = {name: final_ap((run.parent / f"{name}.log").read_text()) for name, run in runs.items()}
    best = max(aps, key=lambda name: float(aps[name].split(",")[0]))
    assert float(aps[best].split(",")[0]) > 0, aps
    assert (runs[best] / "last_checkpoint").read_text().strip() == "model_final.pth"
    evaluated = train_net("--config-file", runs[best] / "config.yaml", "--eval-only",
                          "MODEL.WEIGHTS", runs[best] / "model_final.pth",
                          "OUTPUT_DIR", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert final_ap(evaluated.stdout) == aps[best]
