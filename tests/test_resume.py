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

import train_net_S
from conftest import REPO, quickstart_cfg
from msad.checkpoint import SafeCheckpointer
from msad.distill import IterationSchedule
from test_train_net import train_net

MAX_ITER = 40
# What each model schedules by iteration, and the value it must have at iteration `it`.
CASES = {
    "student": (["MODEL.MSAD.TEACHER.WEIGHTS", "{teachers}/teacher.pth",
                 "MODEL.MSAD.KD_WARMUP_ITERS", 100],
                "distill_warmup", lambda it: it / 100),
    "thumbdet_4x": (["MODEL.MSAD.TEACHER.WEIGHTS", "{teachers}/hr_baseline.pth",
                     "MODEL.THUMBDET.WARMUP_ITERS", 15],
                    "detection_phase", lambda it: float(it >= 15)),
}


def run_until_checkpoint(cmd, checkpoint, timeout=600):
    """Start `cmd`, SIGKILL it once `checkpoint` exists; return its output."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + timeout
    while not checkpoint.exists():
        assert proc.poll() is None, f"training ended before {checkpoint.name}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {checkpoint.name} after {timeout} s"
        time.sleep(0.2)
    time.sleep(1.0)  # into the next iterations, possibly the next save
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sigkill_then_resume_continues_from_the_last_checkpoint(name, tmp_path, untrained_teachers):
    extra, attribute, expected = CASES[name]
    out = tmp_path / "run"
    opts = [str(v).format(teachers=untrained_teachers) for v in [
        *extra, "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", 10, "DATASETS.TEST", "()",
        "OUTPUT_DIR", out]]
    config = os.path.join(REPO, "configs", "quickstart", f"{name}.yaml")
    cmd = [sys.executable, os.path.join(REPO, "train_net_S.py"), "--config-file", config, *opts]
    run_until_checkpoint(cmd, out / "model_0000019.pth")

    # Whatever the kill interrupted, last_checkpoint names a whole checkpoint.
    last = (out / "last_checkpoint").read_text()
    saved = torch.load(out / last, weights_only=True)
    start = saved["iteration"] + 1
    assert start >= 20

    cfg = quickstart_cfg(name, *opts, "DATALOADER.NUM_WORKERS", 0)
    cfg.freeze()
    trainer = train_net_S.StudentTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == start
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    optimizer, saved_optimizer = trainer.optimizer.state_dict(), saved["trainer"]["_trainer"]["optimizer"]
    assert optimizer["param_groups"] == saved_optimizer["param_groups"]
    assert optimizer["state"].keys() == saved_optimizer["state"].keys() and optimizer["state"]
    for index, state in optimizer["state"].items():
        assert torch.equal(state["momentum_buffer"], saved_optimizer["state"][index]["momentum_buffer"])
    assert trainer.scheduler.state_dict() == saved["trainer"]["hooks"]["LRScheduler"]
    assert trainer.scheduler.last_epoch == start
    trainer.iter, trainer.storage = start, EventStorage(start)
    for hook in trainer._hooks:
        if isinstance(hook, IterationSchedule):
            hook.before_step()
    assert getattr(trainer.model, attribute) == pytest.approx(expected(start))
    assert expected(start) != expected(0)  # the schedule did not restart

    # The real restart: it continues at `start` and finishes.
    resumed = train_net("--config-file", config, "--resume", *opts, script="train_net_S.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {start}" in resumed.stdout + resumed.stderr
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == MAX_ITER - 1
    assert metrics[-1][attribute] == pytest.approx(expected(MAX_ITER - 1))
    assert (out / "model_final.pth").exists()
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_temporaries_of_a_killed_save_are_removed_on_restart(tmp_path):
    model = torch.nn.Linear(2, 2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"model_0000009.pth.tmp-{dead}").write_bytes(b"half")
    (tmp_path / f"model_0000019.pth.tmp-{os.getpid()}").write_bytes(b"being written")
    SafeCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert sorted(os.listdir(tmp_path)) == [f"model_0000019.pth.tmp-{os.getpid()}"]
