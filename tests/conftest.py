import os
import sys
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))


def quickstart_cfg(name="teacher", *opts):
    """The (unfrozen) config of configs/quickstart/<name>.yaml with `opts` overrides."""
    from msad.config import load_config

    return load_config(os.path.join(REPO, "configs", "quickstart", f"{name}.yaml"), opts)


def torchvision_opts(arch, norm="BN"):
    """Overrides that put torchvision's `arch` (msad/modeling/torchvision_backbone.py) under a config."""
    return ("MODEL.BACKBONE.NAME", "build_torchvision_fpn_backbone", "MODEL.TORCHVISION.ARCH", arch,
            "MODEL.TORCHVISION.NORM", norm)


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


@pytest.fixture
def cfg():
    return quickstart_cfg()


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
