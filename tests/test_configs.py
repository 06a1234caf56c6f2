"""Every shipped config parses, builds, and the zoo keeps the official schedule."""
import glob
import os

import pytest
from detectron2.modeling import build_model

from conftest import REPO
from msad.engine import load_config

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
ZOO = [c for c in CONFIGS if os.path.basename(c).startswith("SLR") and "light" not in c]


def test_the_zoo_is_complete():
    names = {os.path.basename(c) for c in ZOO}
    assert names == {f"SLR{w}-50-{r}.yaml" for w in ("025", "050", "075", "100") for r in "TS"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_builds_its_model(path):
    cfg = load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.SLIMMABLE.PRETRAINED", ""])
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE


@pytest.mark.parametrize("path", ZOO, ids=os.path.basename)
def test_zoo_uses_the_official_schedule_and_width(path):
    cfg = load_config(path)
    width = int(os.path.basename(path)[3:6]) / 100
    assert cfg.MODEL.SLIMMABLE.WIDTH == width
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == (
        16, 0.01, 90000, (60000, 80000), 500)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333 and cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.MODEL.FCOS.NUM_CLASSES == 80 and cfg.MODEL.MSAD.JOINT_WEIGHT == 0.4
    if path.endswith("-S.yaml"):
        teacher = path.replace("-S.yaml", "-T.yaml")
        assert cfg.MODEL.MSAD.TEACHER.CONFIG_FILE == os.path.relpath(teacher, REPO)
        assert cfg.MODEL.MSAD.TEACHER.WEIGHTS == os.path.join(
            load_config(teacher).OUTPUT_DIR, "model_final.pth")
        assert (cfg.MODEL.MSAD.KD_ALPHA, cfg.MODEL.MSAD.KD_TEMPERATURE,
                cfg.MODEL.MSAD.KD_WARMUP_ITERS) == (0.2, 3.0, 500)
