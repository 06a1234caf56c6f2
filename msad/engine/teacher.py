"""The frozen teacher of a distilled detector: resolved from ``MODEL.TEACHER``, checked against
its weights' model_info.json and the student's classes, built and loaded."""
import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from ..checkpoint.detection_checkpoint import load_state_dict_file
from ..checkpoint.model_info import check_model_info, read_model_info
from ..config import NO_IMAGENET_START, TRAINING_CONFIG, load_config
from ..modeling.distill import freeze

logger = logging.getLogger("msad")


def teacher_config(cfg):
    """The config of the teacher MODEL.TEACHER names, checked against the weights' own
    model_info.json and against the student: the same classes."""
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
    return teacher_cfg


def check_teacher_classes(info, cfg):
    """The teacher's class names (from its model_info.json) are the student's training data's."""
    dataset = cfg.DATASETS.TRAIN[0]
    theirs, ours = info and info["thing_classes"], MetadataCatalog.get(dataset).get("thing_classes")
    if theirs and ours and list(theirs) != list(ours):
        raise ValueError(
            f"the teacher (MODEL.TEACHER.WEIGHTS={cfg.MODEL.TEACHER.WEIGHTS}) was trained on the "
            f"classes {list(theirs)}, the student's DATASETS.TRAIN {dataset} has {list(ours)}")


def build_frozen_teacher(cfg):
    """The teacher named by MODEL.TEACHER, with its weights, in eval mode, no gradients."""
    spec = cfg.MODEL.TEACHER
    teacher_cfg = teacher_config(cfg)
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
