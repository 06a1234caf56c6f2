"""The measurement tools: benchmark table and JSON, AP-vs-cost picture, capacity JSON."""
import json
import os

import pytest

from helpers import REPO, run_tool, tool_here

QUICK = [os.path.join(REPO, "configs", "quickstart", f"{n}.yaml")
         for n in ("hr_baseline", "student", "thumbdet_4x")]


def _benchmark(tmp_path, device):
    out = tmp_path / "bench.json"
    proc = run_tool("benchmark.py", "--device", device, "--configs", *QUICK, "--size", 128, 160,
                    "--runs", 2, "--warmup", 1, "--batch", 2, "--train", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [os.path.basename(r["config"]) for r in result["results"]] == [
        os.path.basename(c) for c in QUICK]
    for r in result["results"]:
        assert r["latency_ms_p90"] >= r["latency_ms_median"] > 0 and r["images_per_s"] > 0
        # A training step (batch 2, with its backward) costs more than one image's inference,
        # and the peak memory after it is at least the inference peak.
        assert r["train_step_ms"] > r["latency_ms_median"]
        assert r["train_peak_memory_mb"] >= r["peak_memory_mb"] > 0
    first_row = next(line for line in proc.stdout.splitlines() if "hr_baseline" in line)
    assert first_row.split()[2] == "1.00"  # ratios are to the first config
    return proc.stdout


def test_benchmark_measures_every_config_side_by_side_on_cpu(tmp_path):
    assert "CPU" in _benchmark(tmp_path, "cpu")


@pytest.mark.cuda
def test_benchmark_on_cuda(tmp_path):
    assert "CPU" not in _benchmark(tmp_path, "cuda").splitlines()[0]


def test_benchmark_runs_exported_models_beside_eager_on_the_same_input(tmp_path):
    out = tmp_path / "runtimes.json"
    student = os.path.join(REPO, "configs", "quickstart", "student.yaml")
    proc = tool_here("benchmark", "--configs", f"{student}:low", "--runtimes", "onnxruntime",
                    "torchscript", "--size", 128, 160, "--runs", 2, "--warmup", 0, "--batch", 1,
                    "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["runtime"] for r in rows] == ["eager", "onnxruntime", "torchscript"]
    assert all(r["input"] == [64, 80] for r in rows)  # the half-size input, for every runtime
    assert all(r["latency_ms_p90"] >= r["latency_ms_median"] > 0 for r in rows)
    assert "vs eager" in proc.stdout and "onnxruntime" in proc.stdout
    proc = tool_here("benchmark", "--configs", student, "--runtimes", "onnxruntime",
                    "--batch", 4)
    assert proc.returncode != 0 and "--batch 1" in proc.stderr


def test_benchmark_names_a_missing_config():
    proc = tool_here("benchmark", "--configs", "configs/none.yaml")
    assert proc.returncode != 0 and "configs/none.yaml" in proc.stderr


def test_ap_vs_cost_picture_from_a_summary(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rows": [
        {"model": "HR", "AP": 17.0, "gmacs": 0.65, "ms_per_image": 23.0},
        {"model": "student", "AP": 15.6, "gmacs": 0.36, "ms_per_image": 16.0}]}))
    proc = run_tool("plot_ap_vs_cost.py", "--summary", summary)
    assert proc.returncode == 0, proc.stderr
    for ext in ("png", "svg"):
        path = tmp_path / f"ap_vs_cost.{ext}"
        assert path.stat().st_size > 1000
    assert b"student" in (tmp_path / "ap_vs_cost.svg").read_bytes()


def test_ap_vs_cost_picture_from_output_dirs(tmp_path):
    run_dir = tmp_path / "hr"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"iteration": 9, "total_loss": 1.0}\n'
                                          '{"iteration": 9, "bbox/AP": 12.5}\n')
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"end_to_end": [
        {"model": "HR FCOS", "config": "configs/MSAD/HR-FCOS-R50.yaml", "total": 315.9}]}))
    proc = tool_here("plot_ap_vs_cost", "--run", f"HR FCOS={run_dir}", "--costs", costs,
                    "--output", tmp_path / "plot")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plot.png").exists()
    proc = tool_here("plot_ap_vs_cost", "--run", f"Nope={run_dir}", "--costs", costs)
    assert proc.returncode != 0 and "'Nope' is not a model" in proc.stderr
