import os
import sys
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))


def quickstart_cfg(name="teacher", *opts):
    """The (unfrozen) config of configs/quickstart/<name>.yaml with `opts` overrides."""
    from detectron2.config import get_cfg

    from msad import add_msad_config

    cfg = get_cfg()
    add_msad_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "quickstart", f"{name}.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture
def cfg():
    return quickstart_cfg()


def pytest_collection_modifyitems(config, items):
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
