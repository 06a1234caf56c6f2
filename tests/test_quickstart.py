"""The main job repeats: seeded stages, the same APs from two runs, another seed another result."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, quickstart_cfg, run_tool


def quickstart(output, *args):
    proc = run_tool("quickstart.py", "--output", output, "--timing-images", 3, *args,
                    "SOLVER.MAX_ITER", 20)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((output / "summary.json").read_text()), proc.stdout


@pytest.mark.slow
def test_a_rerun_prints_the_same_aps_and_another_seed_other_aps(tmp_path):
    both, both_table = quickstart(tmp_path / "a", "--seeds", 2)
    again, _ = quickstart(tmp_path / "b", "--seed", 1)
    assert both["seeds"] == [0, 1] and again["seeds"] == [1]
    assert [r["per_seed"]["1"] for r in both["rows"]] == [r["per_seed"]["1"] for r in again["rows"]]
    assert [r["per_seed"]["0"] for r in both["rows"]] != [r["per_seed"]["1"] for r in both["rows"]]
    assert sum(r["AP"] > 0 for r in again["rows"]) >= 3  # not merely zeros that agree
    # Several seeds: mean ± std over them, and each seed's AP.
    row = both["rows"][0]
    assert row["AP"] == pytest.approx((row["per_seed"]["0"]["AP"] + row["per_seed"]["1"]["AP"]) / 2)
    assert "±" in both_table and "AP of seeds 0,1" in both_table
    assert (tmp_path / "a" / "seed1" / "thumbdet_4x" / "model_final.pth").exists()


def test_each_quickstart_config_writes_where_the_quickstart_puts_its_seed():
    """A config run alone is exactly the quickstart's stage of the configs' SEED."""
    from quickstart import STAGES, stage_opts

    for stage in STAGES:
        cfg = quickstart_cfg(stage.name)
        alone = [cfg.OUTPUT_DIR, str(cfg.SEED)] + [
            cfg.MODEL.WEIGHTS if key == "MODEL.WEIGHTS" else cfg.MODEL.TEACHER.WEIGHTS
            for key in stage.sources]
        opts = stage_opts(stage, "output/quickstart", cfg.SEED, [])
        assert alone == opts[1::2], stage.name


def test_reuse_trained_retrains_what_depends_on_a_retrained_stage(tmp_path):
    from quickstart import STAGES, stages_to_train

    everything = {stage.name for stage in STAGES}
    assert stages_to_train(STAGES, str(tmp_path), 0, reuse_trained=False) == everything
    assert stages_to_train(STAGES, str(tmp_path), 0, reuse_trained=True) == everything
    for name in everything - {"teacher"}:
        os.makedirs(tmp_path / "seed0" / name)
        (tmp_path / "seed0" / name / "model_final.pth").write_bytes(b"")
    assert stages_to_train(STAGES, str(tmp_path), 0, reuse_trained=True) == {
        "teacher", "lr_teacher_init", "student"}  # the two that start from the teacher
    assert stages_to_train(STAGES, str(tmp_path), 1, reuse_trained=True) == everything


def test_seed_and_output_are_set_by_the_tool_not_by_overrides(tmp_path):
    for args, message in ((["--seeds", 0], "--seeds must be at least 1"),
                          (["--seed", -1], "--seed must be 0 or more"),
                          (["SEED", 3], "set SEED with --seed"),
                          (["--", "SEED", 3], "set SEED with --seed"),
                          (["OUTPUT_DIR", tmp_path], "set OUTPUT_DIR with --output"),
                          (["SOLVER.MAX_ITER", 10, "--seeds", 3], "options go before"),
                          (["SOLVER.MAX_ITER"], "KEY VALUE pairs")):
        proc = run_tool("quickstart.py", "--output", tmp_path / "out", *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_stopped_quickstart_stops_its_running_stage(tmp_path):
    """SIGTERM (a scheduler, a timeout) must not leave a training process running alone."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "quickstart.py"),
                             "--output", str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.time() + 120
    stage = []
    while not stage and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        stage = open(children).read().split()
    assert stage, f"no training stage started: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not os.path.exists(f"/proc/{stage[0]}")
