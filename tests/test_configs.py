"""Every shipped config parses, builds, and the zoo keeps the official schedule."""
import glob
import os
import re

import pytest
from detectron2.modeling import build_model

from helpers import REPO
from msad.config import NO_IMAGENET_START, load_config

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
ZOO = [c for c in CONFIGS if os.path.basename(c).startswith("SLR") and "light" not in c
       and os.sep + "official" + os.sep not in c]
OFFICIAL = sorted(glob.glob(os.path.join(REPO, "configs", "MSAD", "official", "SLR*.yaml")))
# What the official MSAD inference does differently (msad/checkpoint/official.py, README).
OFFICIAL_INFERENCE = {"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
                      "MODEL.PIXEL_STD": [1.0, 1.0, 1.0], "MODEL.FCOS.SIZE_DIVISIBILITY": 256,
                      "MODEL.FCOS.TOPK_RANKING": "product", "MODEL.SLIMMABLE.PRETRAINED": ""}


def test_the_zoo_is_complete():
    names = {os.path.basename(c) for c in ZOO}
    assert names == {f"SLR{w}-50-{r}.yaml" for w in ("025", "050", "075", "100") for r in "TS"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_builds_its_model(path):
    cfg = load_config(path, ["MODEL.DEVICE", "cpu", *NO_IMAGENET_START])
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    # What the config says the model is, it is: classes, input factor, the levels its head reads
    # and their width.
    assert model.head.cls_score.out_channels == model.num_classes == cfg.MODEL.FCOS.NUM_CLASSES
    assert model.branches[0].factor == cfg.MODEL.FCOS.INPUT_FACTOR
    shapes = model.backbone.output_shape()
    assert all(shapes[level].channels == cfg.MODEL.FPN.OUT_CHANNELS
               for branch in model.branches for level in branch.levels)
    if cfg.MODEL.BACKBONE.NAME == "build_slimmable_resnet_fpn_backbone":
        res2 = model.backbone.bottom_up.res2[0].conv3.out_channels
        assert res2 == int(256 * cfg.MODEL.SLIMMABLE.WIDTH)


# ../shared/reference/official-configs.md: batch, base LR, iterations, LR steps per config.
OFFICIAL_SCHEDULES = {
    "SLR025-50-T": (16, 0.01, 90000, (60000, 80000)),
    "SLR050-50-T": (8, 0.01, 180000, (120000, 160000)),
    "SLR075-50-T": (8, 0.01, 180000, (120000, 160000)),
    "SLR100-50-T": (8, 0.01, 180000, (120000, 160000)),
    "SLR025-50-S": (32, 0.02, 45000, (30000, 40000)),
    "SLR050-50-S": (32, 0.01, 45000, (30000, 40000)),
    "SLR075-50-S": (32, 0.02, 45000, (30000, 40000)),
    "SLR100-50-S": (16, 0.01, 90000, (60000, 80000)),
}


@pytest.mark.parametrize("path", ZOO, ids=os.path.basename)
def test_zoo_uses_the_official_schedule_and_width(path):
    cfg = load_config(path)
    width = int(os.path.basename(path)[3:6]) / 100
    assert cfg.MODEL.SLIMMABLE.WIDTH == width
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == \
        OFFICIAL_SCHEDULES[os.path.basename(path)[:-len(".yaml")]] + (500,)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333 and cfg.INPUT.MIN_SIZE_TEST == 800
    assert cfg.MODEL.FCOS.NUM_CLASSES == 80 and cfg.MODEL.MSAD.JOINT_WEIGHT == 0.4
    assert cfg.MODEL.SLIMMABLE.PRETRAINED == os.path.join(
        REPO, "pretrained", "s_resnet50_0.25_0.5_0.75_1.0.pt")  # README: put it in pretrained/
    if path.endswith("-S.yaml"):
        teacher = path.replace("-S.yaml", "-T.yaml")
        assert cfg.MODEL.TEACHER.CONFIG_FILE == teacher  # named relative to the config file
        assert cfg.MODEL.TEACHER.WEIGHTS == os.path.join(
            load_config(teacher).OUTPUT_DIR, "model_final.pth")
        assert (cfg.MODEL.MSAD.KD_ALPHA, cfg.MODEL.MSAD.KD_TEMPERATURE,
                cfg.MODEL.MSAD.KD_WARMUP_ITERS) == (0.2, 3.0, 500)


@pytest.mark.parametrize("path", OFFICIAL, ids=os.path.basename)
def test_official_configs_are_the_zoo_with_the_official_inference(path):
    """configs/MSAD/official/X = configs/MSAD/X with only the official inference settings
    (and where the converted weights are) changed; an official teacher has one set of BatchNorm
    statistics for both branches, where the zoo's keeps one per branch."""
    from msad.checkpoint.model_info import config_value

    cfg, zoo = load_config(path), load_config(os.path.join(os.path.dirname(path), "..",
                                                           os.path.basename(path)))
    differ = {k for k in flat_keys(cfg) if config_value(cfg, k) != config_value(zoo, k)}
    assert differ == set(OFFICIAL_INFERENCE) | {"MODEL.WEIGHTS", "OUTPUT_DIR"} | (
        {"MODEL.TEACHER.CONFIG_FILE", "MODEL.TEACHER.WEIGHTS"} if path.endswith("-S.yaml")
        else {"MODEL.MSAD.BRANCH_BN"})
    assert not (path.endswith("-T.yaml") and cfg.MODEL.MSAD.BRANCH_BN)
    assert {k: config_value(cfg, k) for k in OFFICIAL_INFERENCE} == OFFICIAL_INFERENCE
    if path.endswith("-S.yaml"):
        assert cfg.MODEL.TEACHER.CONFIG_FILE == path.replace("-S.yaml", "-T.yaml")


def flat_keys(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


TORCHVISION_ZOO = sorted(glob.glob(os.path.join(REPO, "configs", "*", "torchvision", "*.yaml")))
# The zoo's prefix: torchvision's architecture and the ImageNet file the README names.
TORCHVISION_FILES = {"R50": ("resnet50", "resnet50-0676ba61.pth"),
                     "MNV2": ("mobilenet_v2", "mobilenet_v2-b0353104.pth")}


def test_the_torchvision_zoo_is_complete():
    names = {os.path.relpath(c, os.path.join(REPO, "configs")) for c in TORCHVISION_ZOO}
    assert names == {f"{folder}/torchvision/{prefix}-{model}.yaml" for prefix in TORCHVISION_FILES
                     for folder, models in (("MSAD", ("HR-FCOS", "LR-FCOS", "T", "S")),
                                            ("ThumbDet", ("ThumbDet-2x", "ThumbDet-4x",
                                                          "Bicubic-2x", "Bicubic-4x")))
                     for model in models}


@pytest.mark.parametrize("path", TORCHVISION_ZOO, ids=lambda p: os.path.relpath(p, REPO))
def test_torchvision_zoo_configs_are_their_base_on_torchvision_s_backbone(path):
    """Each is the zoo config it inherits, with the backbone, its own OUTPUT_DIR and a teacher
    (or start) of the same backbone changed, and nothing else."""
    import yaml

    from msad.checkpoint.model_info import config_value

    cfg = load_config(path)
    with open(path) as f:
        base = load_config(os.path.join(os.path.dirname(path), yaml.safe_load(f)["_BASE_"]))
    prefix = os.path.basename(path).split("-")[0]
    arch, imagenet_file = TORCHVISION_FILES[prefix]
    assert cfg.MODEL.TORCHVISION.ARCH == arch and cfg.MODEL.TORCHVISION.NORM == "SyncBN"
    assert cfg.MODEL.TORCHVISION.PRETRAINED == os.path.join(REPO, "pretrained", imagenet_file)
    differ = {k for k in flat_keys(cfg) if config_value(cfg, k) != config_value(base, k)}
    assert differ - {"MODEL.TEACHER.CONFIG_FILE", "MODEL.TEACHER.WEIGHTS", "MODEL.WEIGHTS"} == {
        "MODEL.BACKBONE.NAME", "MODEL.TORCHVISION.NORM", "MODEL.TORCHVISION.PRETRAINED",
        "OUTPUT_DIR"} | ({"MODEL.TORCHVISION.ARCH"} if arch != "resnet50" else set())
    assert cfg.OUTPUT_DIR != base.OUTPUT_DIR
    # A teacher (students, ThumbDet) or a start (the bicubic baselines) of the same backbone.
    hr_fcos = os.path.join(REPO, "configs", "MSAD", "torchvision", f"{prefix}-HR-FCOS.yaml")
    for weights, config in ((cfg.MODEL.TEACHER.WEIGHTS, cfg.MODEL.TEACHER.CONFIG_FILE),
                            (cfg.MODEL.WEIGHTS, hr_fcos)):
        if weights:
            teacher = load_config(config)
            assert weights == os.path.join(teacher.OUTPUT_DIR, "model_final.pth")
            assert teacher.MODEL.TORCHVISION.ARCH == arch
            assert teacher.MODEL.BACKBONE.NAME == "build_torchvision_fpn_backbone"


@pytest.mark.parametrize("old_key, value", [
    ("MODEL.FCOS.INPUT_RESOLUTION", "LR"), ("MODEL.MSAD.SIZE_DIVISIBILITY", 256),
    ("MODEL.MSAD.LR_RESAMPLE", "bicubic"), ("MODEL.MSAD.TEACHER.WEIGHTS", "t.pth"),
    ("MODEL.MSAD.STUDENT.INIT_FROM_TEACHER", False), ("MODEL.THUMBDET.FACTOR", 2),
    ("MODEL.THUMBDET.IN_FEATURES", ["p2"]), ("MODEL.THUMBDET.DOWNSAMPLER", "bicubic")])
def test_a_key_renamed_by_the_input_scale_rework_is_refused_by_name(old_key, value, tmp_path):
    """The keys of before one input-scale concept (see README, "Config keys") are not silently
    ignored: Detectron2 refuses them by name, as any unknown key."""
    student = os.path.join(REPO, "configs", "quickstart", "student.yaml")
    with pytest.raises(AssertionError, match=f"Non-existent key: {re.escape(old_key)}$"):
        load_config(student, [old_key, value])  # on the command line
    in_file = tmp_path / "old.yaml"
    *parents, leaf = old_key.split(".")
    nested = "".join(f"{'  ' * i}{name}:\n" for i, name in enumerate(parents))
    in_file.write_text(f"_BASE_: {student}\n{nested}{'  ' * len(parents)}{leaf}: {value!r}\n")
    with pytest.raises(KeyError, match="Non-existent config key: ") as refused:
        load_config(str(in_file))  # in a config file: named down to the first unknown part
    assert old_key.startswith(str(refused.value).split(": ")[1].rstrip("'\""))
