"""The frozen teacher of a distilled detector, from ``MODEL.TEACHER``: which config it is built
from, checked against its weights' model_info.json and the student's classes, built and loaded.

Its config is the ``config.yaml`` its training wrote beside ``MODEL.TEACHER.WEIGHTS`` (it holds
every override the teacher was trained with: classes, width, ...), unless the command line names
``MODEL.TEACHER.CONFIG_FILE``: that is the user's choice, checked against model_info.json.
"""
import logging
import os
from typing import NamedTuple, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from ..checkpoint.detection_checkpoint import load_state_dict_file
from ..checkpoint.model_info import check_model_info, read_model_info
from ..config import NO_IMAGENET_START, TRAINING_CONFIG, load_config
from ..modeling.distill import freeze

logger = logging.getLogger("msad")


def use_trained_config(cfg, named):
    """Point MODEL.TEACHER.CONFIG_FILE of the (unfrozen) `cfg` at the config.yaml beside
    MODEL.TEACHER.WEIGHTS, if there is one and the command line did not name a config
    (`named`)."""
    spec = cfg.MODEL.TEACHER
    trained = os.path.join(os.path.dirname(spec.WEIGHTS), TRAINING_CONFIG)
    if not named and spec.WEIGHTS and os.path.isfile(trained):
        spec.CONFIG_FILE = trained


class Teacher(NamedTuple):
    cfg: CfgNode  # the config it is built from
    info: Optional[dict]  # the model_info.json of its weights, if they have one


def resolve_teacher(cfg):
    """The teacher MODEL.TEACHER names: its config, checked against the weights' own
    model_info.json and against the student (the same number of classes)."""
    spec = cfg.MODEL.TEACHER
    if not spec.WEIGHTS:
        raise ValueError("MODEL.TEACHER.WEIGHTS is empty: name the teacher's checkpoint")
    if not os.path.isfile(spec.WEIGHTS):
        raise FileNotFoundError(f"MODEL.TEACHER.WEIGHTS: no such file {spec.WEIGHTS}")
    if not spec.CONFIG_FILE:
        raise ValueError(
            f"MODEL.TEACHER.WEIGHTS={spec.WEIGHTS} has no {TRAINING_CONFIG} beside it (the config "
            "its training wrote) and MODEL.TEACHER.CONFIG_FILE is empty: name the teacher's config")
    teacher_cfg = load_config(spec.CONFIG_FILE, what="MODEL.TEACHER.CONFIG_FILE")
    info_path, info = read_model_info(spec.WEIGHTS)
    if info is not None:
        check_model_info(teacher_cfg, info, info_path)
    teacher_classes, classes = teacher_cfg.MODEL.FCOS.NUM_CLASSES, cfg.MODEL.FCOS.NUM_CLASSES
    if teacher_classes != classes:
        raise ValueError(
            f"the teacher ({spec.CONFIG_FILE}) detects {teacher_classes} classes and the student "
            f"{classes} (MODEL.FCOS.NUM_CLASSES): a teacher must be trained on the student's "
            "classes")
    return Teacher(teacher_cfg, info)


def check_teacher(cfg):
    """The teacher resolves (resolve_teacher), and its class names, when its model_info.json
    has them, are those of the student's training data (registered by now)."""
    info = resolve_teacher(cfg).info
    dataset = cfg.DATASETS.TRAIN[0]
    theirs, ours = info and info["thing_classes"], MetadataCatalog.get(dataset).get("thing_classes")
    if theirs and ours and list(theirs) != list(ours):
        raise ValueError(
            f"the teacher (MODEL.TEACHER.WEIGHTS={cfg.MODEL.TEACHER.WEIGHTS}) was trained on the "
            f"classes {list(theirs)}, the student's DATASETS.TRAIN {dataset} has {list(ours)}")


def build_frozen_teacher(cfg):
    """The teacher named by MODEL.TEACHER, with its weights, in eval mode, no gradients."""
    spec = cfg.MODEL.TEACHER
    teacher_cfg = resolve_teacher(cfg).cfg
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.merge_from_list(NO_IMAGENET_START)  # its trained weights follow
    teacher = build_model(teacher_cfg)
    state = load_state_dict_file(spec.WEIGHTS, "MODEL.TEACHER.WEIGHTS")
    expected = teacher.state_dict()
    missing = [k for k in expected if k not in state]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or mismatched:
        raise ValueError(
            f"MODEL.TEACHER.WEIGHTS={spec.WEIGHTS} does not fit the model of "
            f"MODEL.TEACHER.CONFIG_FILE={spec.CONFIG_FILE}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(mismatched)} of another shape {mismatched[:3]}")
    teacher.load_state_dict({k: state[k] for k in expected})
    freeze(teacher)
    logger.info("Frozen teacher %s from %s, built from %s", type(teacher).__name__, spec.WEIGHTS,
                spec.CONFIG_FILE)
    return teacher
