"""A training process killed with SIGKILL resumes from its last checkpoint with everything intact."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.utils.events import EventStorage

from helpers import REPO, quickstart_cfg, train_net
from msad.checkpoint.detection_checkpoint import SafeCheckpointer
from msad.engine.defaults import DistillationTrainer
from msad.engine.hooks import IterationSchedule

MAX_ITER = 40
# What each model schedules by iteration, and the value it must have at iteration `it`.
CASES = {
    "student": (["MODEL.TEACHER.WEIGHTS", "{teachers}/teacher.pth",
                 "MODEL.MSAD.KD_WARMUP_ITERS", 100],
                "distill_warmup", lambda it: it / 100),
    "thumbdet_4x": (["MODEL.TEACHER.WEIGHTS", "{teachers}/hr_baseline.pth",
                     "MODEL.THUMBDET.WARMUP_ITERS", 5],
                    "detection_phase", lambda it: float(it >= 5)),
}

# train_net_S.py whose torch.save writes half of `model_0000019.pth`, signals, then hangs: the
# test kills it there, in the middle of saving a checkpoint.
HANGS_WHILE_SAVING = """
import io, runpy, sys, time, torch
real_save, marker, script = torch.save, sys.argv[1], sys.argv[2]
def save(obj, f, *args, **kwargs):
    data = io.BytesIO()
    real_save(obj, data, *args, **kwargs)
    f.write(data.getvalue()[: len(data.getvalue()) // 2])
    f.flush()
    if "model_0000019.pth" in getattr(f, "name", ""):
        open(marker, "w").close()
        time.sleep(600)
    f.write(data.getvalue()[len(data.getvalue()) // 2:])
torch.save = save
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def kill_while_saving(args, marker, log, timeout=300):
    """Run train_net_S.py `args` until it is half-way through saving model_0000019.pth, SIGKILL."""
    with open(log, "w") as out:  # a file, not a pipe nobody reads: that would block the child
        proc = subprocess.Popen([sys.executable, "-c", HANGS_WHILE_SAVING, str(marker),
                                 os.path.join(REPO, "train_net_S.py"), *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"training ended before saving:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no save of model_0000019.pth after {timeout} s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sigkill_while_saving_then_resume_continues_from_the_last_checkpoint(
        name, tmp_path, untrained_teachers):
    extra, attribute, expected = CASES[name]
    out = tmp_path / "run"
    opts = [str(v).format(teachers=untrained_teachers) for v in [
        *extra, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 10, "DATASETS.TEST", "()",
        "OUTPUT_DIR", out]]
    config = os.path.join(REPO, "configs", "quickstart", f"{name}.yaml")
    kill_while_saving(["--config-file", config, *opts], tmp_path / "saving", tmp_path / "killed.log")

    # The kill left half a checkpoint in a temporary file; last_checkpoint still names the
    # previous, whole one, and no model_0000019.pth exists.
    assert [f for f in os.listdir(out) if ".tmp-" in f] == [
        f for f in os.listdir(out) if f.startswith("model_0000019.pth.tmp-")] != []
    assert not (out / "model_0000019.pth").exists()
    assert (out / "last_checkpoint").read_text() == "model_0000009.pth"
    saved = torch.load(out / "model_0000009.pth", weights_only=True)
    start = saved["iteration"] + 1
    assert start == 10

    cfg = quickstart_cfg(name, *opts, "DATALOADER.NUM_WORKERS", 0)
    cfg.freeze()
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # the half checkpoint is gone
    assert trainer.start_iter == start
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    optimizer, saved_optimizer = trainer.optimizer.state_dict(), saved["trainer"]["_trainer"]["optimizer"]
    assert optimizer["param_groups"] == saved_optimizer["param_groups"]
    assert optimizer["state"].keys() == saved_optimizer["state"].keys() and optimizer["state"]
    for index, state in optimizer["state"].items():
        assert torch.equal(state["momentum_buffer"], saved_optimizer["state"][index]["momentum_buffer"])
    hooks = saved["trainer"]["hooks"]
    assert trainer.scheduler.state_dict() == hooks["LRScheduler"]
    assert trainer.scheduler.last_epoch == start
    assert trainer.model.loss_normalizer == hooks["LossNormalizerState"]["loss_normalizer"]
    trainer.iter, trainer.storage = start, EventStorage(start)
    for hook in trainer._hooks:
        if isinstance(hook, IterationSchedule):
            hook.before_step()
    assert getattr(trainer.model, attribute) == pytest.approx(expected(start))
    assert expected(start) != expected(0)  # the schedule did not restart

    # The real restart continues at `start` and finishes.
    resumed = train_net("--config-file", config, "--resume", *opts, script="train_net_S.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {start}" in resumed.stdout + resumed.stderr
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == MAX_ITER - 1
    assert metrics[-1][attribute] == pytest.approx(expected(MAX_ITER - 1))
    assert (out / "model_final.pth").exists()


def test_temporaries_of_a_killed_save_are_removed_on_restart(tmp_path):
    model = torch.nn.Linear(2, 2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"model_0000009.pth.tmp-{dead}").write_bytes(b"half")
    (tmp_path / f"model_0000019.pth.tmp-{os.getpid()}").write_bytes(b"id reused after a restart")
    (tmp_path / f"model_0000029.pth.tmp-{os.getppid()}").write_bytes(b"another live process")
    SafeCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert sorted(os.listdir(tmp_path)) == [f"model_0000029.pth.tmp-{os.getppid()}"]
