import pytest

from helpers import quickstart_cfg, run_tool


@pytest.fixture(scope="session")
def untrained_teachers(tmp_path_factory):
    """Randomly initialised quickstart teacher and HR FCOS checkpoints (teacher.pth,
    hr_baseline.pth): a frozen teacher needs weights, not good ones."""
    import torch
    from detectron2.modeling import build_model
    from msad.checkpoint.detection_checkpoint import SafeCheckpointer

    out = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    for name in ("teacher", "hr_baseline"):
        SafeCheckpointer(build_model(quickstart_cfg(name)), str(out)).save(name)
    return out


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """tools/quickstart.py, in its own process, on the bundled data with --seed 1, every stage
    20 iterations: its output folder and its completed process."""
    out = tmp_path_factory.mktemp("main_job")
    proc = run_tool("quickstart.py", "--output", out, "--timing-images", 3, "--seed", 1,
                    "SOLVER.MAX_ITER", 20)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture
def cfg():
    return quickstart_cfg()


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
