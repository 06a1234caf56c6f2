"""The main job (tools/quickstart.py): end to end, seeded stages that repeat, its table, its options."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, quickstart_cfg, tool, tool_here, train_in_process
from msad.benchmark.quickstart import STAGES, stage_opts, stages_to_train
from msad.benchmark.report import format_table, summarise


@pytest.mark.slow
def test_the_main_job_runs_end_to_end_with_another_seed(main_job):
    """The table, the summary, the pictures, each model where --seed puts it."""
    tmp_path, proc = main_job
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [1]
    assert [r["name"] for r in summary["rows"]] == [stage.name for stage in STAGES]
    assert sum(r["AP"] > 0 for r in summary["rows"]) >= 3  # trained: not merely zeros
    assert all(r["gmacs"] > 0 and r["ms_per_image"] > 0 for r in summary["rows"])
    assert f"{summary['rows'][0]['AP']:7.2f}" in proc.stdout
    for stage in STAGES:
        assert (tmp_path / "seed1" / stage.name / "model_final.pth").exists(), stage.name
    for picture in ("detections.png", "ap_vs_cost.png", "ap_vs_cost.svg"):
        assert (tmp_path / picture).stat().st_size > 1000, picture
    assert len(list(tmp_path.glob("thumbnails_*.png"))) == 2


@pytest.mark.slow
def test_several_seeds_reuse_what_is_trained_and_report_mean_and_std(main_job, tmp_path):
    """--seeds 2 --reuse-trained through the whole tool, on the main job's models copied as the
    models of two seeds: nothing is trained again, and the table and summary.json give the mean
    ± std over the seeds and each seed's AP."""
    out, _ = main_job
    for seed in (1, 2):
        shutil.copytree(out / "seed1", tmp_path / f"seed{seed}")
    proc = tool_here("quickstart", "--output", tmp_path, "--seed", 1, "--seeds", 2,
                     "--reuse-trained", "--timing-images", 3, "SOLVER.MAX_ITER", 20)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("] reusing ") == 2 * len(STAGES)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    row = next(r for r in summary["rows"] if r["AP"] is not None)
    assert row["per_seed"]["1"] == row["per_seed"]["2"] and row["AP_std"] == 0
    assert "±" in proc.stdout and "AP of seeds 1,2" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["hr_baseline", "teacher", "student", "thumbdet_4x"])
def test_a_stage_repeats_its_seed_and_another_seed_trains_another_model(stage, untrained_teachers,
                                                                       tmp_path):
    """What makes a rerun of the main job print the same APs, for each kind of model: its
    training script, seeded by SEED (data order, augmentation, initial weights, loader workers),
    gives the same weights; another SEED other ones."""
    teacher = {"student": ("MODEL.TEACHER.WEIGHTS", untrained_teachers / "teacher.pth"),
               "thumbdet_4x": ("MODEL.TEACHER.WEIGHTS", untrained_teachers / "hr_baseline.pth")}
    script = next(s.script for s in STAGES if s.name == stage)
    weights = {}
    for run, seed in (("first", 0), ("again", 0), ("other", 1)):
        train_in_process("--config-file", f"configs/quickstart/{stage}.yaml",
                         *teacher.get(stage, ()), "SEED", seed, "SOLVER.MAX_ITER", 3,
                         "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path / run, script=script)
        weights[run] = torch.load(tmp_path / run / "model_final.pth", weights_only=True)["model"]
    assert weights["first"].keys() == weights["again"].keys()
    assert all(torch.equal(weights["first"][k], weights["again"][k]) for k in weights["first"])
    assert not all(torch.equal(weights["first"][k], weights["other"][k]) for k in weights["first"])


def test_several_seeds_show_mean_and_std_and_each_seeds_ap():
    per_seed = {"0": {"AP": 10.0, "APs": 4.0, "APm": 20.0, "APl": None},
                "1": {"AP": 14.0, "APs": 6.0, "APm": 22.0, "APl": None}}
    row = {"model": "HR FCOS", **summarise(per_seed), "per_seed": per_seed,
           "backbone_input": "256x256", "gmacs": 0.65, "ms_per_image": 20.0}
    assert row["AP"] == 12.0 and row["AP_std"] == pytest.approx(2 ** 1.5)
    assert row["APl"] is None and row["APl_std"] is None
    table = format_table([row], [0, 1])
    assert "12.00 ± 2.83" in table and "AP of seeds 0,1" in table and "10.00 14.00" in table
    assert "n/a" in table
    one = format_table([{**row, **summarise({"0": per_seed["0"]})}], [0])
    assert "±" not in one and "  10.00" in one


def test_each_quickstart_config_writes_where_the_quickstart_puts_its_seed():
    """A config run alone is exactly the quickstart's stage of the configs' SEED."""

    for stage in STAGES:
        cfg = quickstart_cfg(stage.name)
        alone = [cfg.OUTPUT_DIR, str(cfg.SEED)] + [
            cfg.MODEL.WEIGHTS if key == "MODEL.WEIGHTS" else cfg.MODEL.TEACHER.WEIGHTS
            for key in stage.sources]
        opts = stage_opts(stage, "output/quickstart", cfg.SEED, [])
        assert alone == opts[1::2], stage.name


def test_reuse_trained_retrains_what_depends_on_a_retrained_stage(tmp_path):

    everything = {stage.name for stage in STAGES}
    assert stages_to_train(STAGES, str(tmp_path), 0, reuse_trained=False) == everything
    assert stages_to_train(STAGES, str(tmp_path), 0, reuse_trained=True) == everything
    for name in everything - {"teacher"}:
        os.makedirs(tmp_path / "seed0" / name)
        (tmp_path / "seed0" / name / "model_final.pth").write_bytes(b"")
    assert stages_to_train(STAGES, str(tmp_path), 0, reuse_trained=True) == {
        "teacher", "lr_teacher_init", "student"}  # the two that start from the teacher
    assert stages_to_train(STAGES, str(tmp_path), 1, reuse_trained=True) == everything


def test_seed_and_output_are_set_by_the_tool_not_by_overrides(tmp_path, capsys):
    for args, message in ((["--seeds", 0], "--seeds must be at least 1"),
                          (["--seed", -1], "--seed must be at least 0"),
                          (["SEED", 3], "set SEED with --seed"),
                          (["--", "SEED", 3], "set SEED with --seed"),
                          (["OUTPUT_DIR", tmp_path], "set OUTPUT_DIR with --output"),
                          (["SOLVER.MAX_ITER", 10, "--seeds", 3], "options go before"),
                          (["SOLVER.MAX_ITER"], "KEY VALUE pairs")):
        with pytest.raises(SystemExit) as exit:
            tool("quickstart").main(["--output", str(tmp_path / "out"), *map(str, args)])
        assert exit.value.code == 2 and message in capsys.readouterr().err
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
