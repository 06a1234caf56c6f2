"""The published MSAD models (dvlab-research/MSAD, CVPR 2021) as this project's detectors.

An official checkpoint is Detectron2's ``{"model": state_dict, ...}`` of one module holding
everything its training used: the teacher (TFCOS) has ``T_backbone.*`` (the slimmable ResNet-50
``bottom_up.features.*`` with full-width convolutions and one BatchNorm set per width of
``msad.config.OFFICIAL_WIDTH_LIST``, Detectron2's FPN and P6/P7 from C5 built for its width),
``T_fcos_head.*`` (GroupNorm towers ``cls_tower``/``bbox_tower``, ``cls_logits``, ``bbox_pred`` and
``ctrness`` without biases, one ``scales.<l>.scale`` per level) and ``SE.fc.{0,2}.weight``, the one
crossing-level fusion all five levels share. The student (SFCOS) adds ``S_backbone.*`` and
``S_fcos_head.*`` beside a copy of its teacher. ``convert`` maps one of them onto
``MultiScaleTeacher`` or ``MSADStudent``: convolutions sliced to the width and its BatchNorm set
taken (``msad.checkpoint.slimmable``), FPN as it is, towers renamed, the per-level scales stacked,
the shared fusion copied to each level, and zeros for the two biases the official head does not
have.
"""
import os
from typing import Dict, List, NamedTuple

import torch

from ..config import OFFICIAL_WIDTH_LIST, REPO
from .detection_checkpoint import load_state_dict_file
from .slimmable import convert_slimmable_state_dict, resnet_blocks_per_stage, slimmable_key_map

ROLES = ("teacher", "student")
# The official module each role's parameters are under.
PREFIX = {"teacher": "T_", "student": "S_"}
HEAD_MODULES = {"cls_tower": "cls_subnet", "bbox_tower": "bbox_subnet", "cls_logits": "cls_score",
                "bbox_pred": "bbox_pred", "ctrness": "ctrness"}
FUSION_LAYERS = {"SE.fc.0.weight": "fc1.weight", "SE.fc.2.weight": "fc2.weight"}
RES2_CHANNELS = 256  # at width 1: the FPN's first lateral reads int(256 x width) of them


class Conversion(NamedTuple):
    state: Dict[str, torch.Tensor]  # every key of our model
    mapped: Dict[str, str]  # our key <- the official key it came from
    dropped: Dict[str, List[str]]  # why -> the official keys left out
    filled: Dict[str, str]  # our key -> why it has no official source


def read_checkpoint(path):
    """The state_dict of an official checkpoint file, loaded without running code."""
    state = load_state_dict_file(path, "the official checkpoint")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a state_dict with values that are not tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_role(state, path):
    """"student" for an official SFCOS file (it also holds its teacher), "teacher" for TFCOS."""
    if any(k.startswith("S_backbone.") for k in state):
        return "student"
    if any(k.startswith("T_backbone.") for k in state):
        return "teacher"
    raise ValueError(f"{path} is not an official MSAD checkpoint: it has no T_backbone.* or "
                     f"S_backbone.* keys (its {len(state)} keys start {sorted(state)[:3]})")


def checkpoint_width(state, role, path):
    """The width the official file was trained at, read from its FPN (its ResNet convolutions
    are stored at full width whatever the width)."""
    key = f"{PREFIX[role]}backbone.fpn_lateral2.weight"
    if key not in state:
        raise ValueError(f"{path}: no {key}, which every official MSAD checkpoint has")
    width = state[key].shape[1] / RES2_CHANNELS
    if width not in OFFICIAL_WIDTH_LIST:
        raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}: {width} x 256 input "
                         f"channels is none of the official widths {list(OFFICIAL_WIDTH_LIST)}")
    return width


def checkpoint_num_classes(state, role):
    return state[f"{PREFIX[role]}fcos_head.cls_logits.weight"].shape[0]


def read_official(path, role, width):
    """The state_dict of the official file `path`, checked to hold a `role` model of `width`;
    and the role of the file itself (a student's file also holds its teacher)."""
    state = read_checkpoint(path)
    found = checkpoint_role(state, path)
    if role == "student" and found == "teacher":
        raise ValueError(f"{path} is an official teacher (TFCOS: T_* keys only): it holds no "
                         "student; convert it with --role teacher")
    found_width = checkpoint_width(state, role, path)
    if found_width != width:
        key = f"{PREFIX[role]}backbone.fpn_lateral2.weight"
        raise ValueError(f"--width {width}: {path} is a width-{found_width} model ({key} has "
                         f"shape {tuple(state[key].shape)})")
    return state, found


def official_config(role, width):
    """The bundled config of the official `role` model at `width`
    (configs/MSAD/official/SLR<width>-50-<T|S>.yaml)."""
    name = f"SLR{round(width * 100):03d}-50-{role[0].upper()}.yaml"
    return os.path.join(REPO, "configs", "MSAD", "official", name)


def convert(state, role, width, target: Dict[str, torch.Tensor]) -> Conversion:
    """Map the official `state` (its `role`'s parameters, at `width`) onto `target`, the
    state_dict of our model (keys and shapes); raise naming the keys if anything does not fit."""
    pre = PREFIX[role]
    bn_index = OFFICIAL_WIDTH_LIST.index(width)
    out, mapped, filled = {}, {}, {}

    def put(ours, official, tensor=None):
        tensor = state[official] if tensor is None else tensor
        if ours not in target:
            raise KeyError(f"{official} maps to {ours}, which the model does not have")
        if tuple(tensor.shape) != tuple(target[ours].shape):
            raise ValueError(f"{official} has shape {tuple(tensor.shape)}, {ours} "
                             f"{tuple(target[ours].shape)}")
        out[ours] = tensor.clone()
        mapped[ours] = official

    # The ResNet: slices of the full-width convolutions, this width's BatchNorm set.
    resnet = {k.removeprefix("backbone.bottom_up."): v for k, v in target.items()
              if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")}
    bottom_up = f"{pre}backbone.bottom_up."
    sources = {dst: (src, kind)
               for src, dst, kind in slimmable_key_map(resnet_blocks_per_stage(resnet))}
    for key, tensor in convert_slimmable_state_dict(state, width, OFFICIAL_WIDTH_LIST, resnet,
                                                    prefix=bottom_up).items():
        module, field = key.rsplit(".", 1)
        src, kind = sources[module]
        out[f"backbone.bottom_up.{key}"] = tensor
        mapped[f"backbone.bottom_up.{key}"] = (
            f"{bottom_up}{src}.weight[:{tensor.shape[0]}, :{tensor.shape[1]}]" if kind == "conv"
            else f"{bottom_up}{src}.bn.{bn_index}.{field}")
    # FPN, P6 and P7 (the student reads P2-P6 of the half image: it has no P7).
    for key in state:
        if key.startswith(f"{pre}backbone.") and not key.startswith(bottom_up):
            ours = key.replace(f"{pre}backbone.", "backbone.", 1)
            if ours in target:
                put(ours, key)
    # The head: towers and predictors renamed, per-level scales stacked, zero biases added.
    head = f"{pre}fcos_head."
    scales = sorted((k for k in state if k.startswith(f"{head}scales.")),
                    key=lambda k: int(k.split(".")[-2]))
    for key in state:
        if key.startswith(head) and not key.startswith(f"{head}scales."):
            module, rest = key[len(head):].split(".", 1)
            if module not in HEAD_MODULES:
                raise KeyError(f"{key}: the official head has no module {module!r}")
            put(f"head.{HEAD_MODULES[module]}.{rest}", key)
    put("head.scales", f"{head}scales.<level>.scale",
        torch.cat([state[k].reshape(1) for k in scales]) if scales else torch.empty(0))
    for bias in ("head.bbox_pred.bias", "head.ctrness.bias"):
        if bias not in out:
            out[bias] = torch.zeros_like(target[bias])
            filled[bias] = "the official bbox_pred and ctrness convolutions have no bias"
    # The teacher's fusion: one for all levels there, one per level here.
    if role == "teacher":
        for level in range(sum(k.startswith("fusion.") and k.endswith(".fc1.weight")
                               for k in target)):
            for official, layer in FUSION_LAYERS.items():
                put(f"fusion.{level}.{layer}", official)
    # BatchNorm step counters (not used at inference): the width's set's, where the file has it.
    for key in target:
        if key.endswith("num_batches_tracked") and key not in out:
            src, _ = sources.get(key.removeprefix("backbone.bottom_up.").rsplit(".", 1)[0],
                                 ("", None))
            source = f"{bottom_up}{src}.bn.{bn_index}.num_batches_tracked"
            if src and source in state:
                put(key, source)
            else:
                out[key] = target[key].clone()
                filled[key] = "a BatchNorm step counter (unused at inference)"

    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"the official {role} checkpoint gives no value for {len(missing)} "
                         f"parameters of the model, e.g. {missing[:3]}")
    return Conversion(out, mapped, dropped_keys(state, role, bn_index, target), filled)


def dropped_keys(state, role, bn_index, target):
    """The official keys a `role` conversion leaves out, grouped by why."""
    pre, other = PREFIX[role], PREFIX["teacher" if role == "student" else "student"]
    why = {}
    for key in sorted(state):
        if key.startswith(f"{pre}backbone.bottom_up.") and ".bn." in key:
            if f".bn.{bn_index}." in key:
                continue
            reason = "BatchNorm sets of the other widths"
        elif key.startswith(f"{pre}backbone.bottom_up.") or key.startswith(f"{pre}fcos_head."):
            continue
        elif key.startswith(f"{pre}backbone."):
            if key.replace(f"{pre}backbone.", "backbone.", 1) in target:
                continue
            reason = "levels this model does not read"
        elif key in FUSION_LAYERS and role == "teacher":
            continue
        elif key.startswith(other) or key in FUSION_LAYERS:
            reason = ("its teacher, which a student here does not hold (convert the official "
                      "teacher file with --role teacher)" if role == "student" else "the student")
        else:
            reason = "not a parameter of this model"
        why.setdefault(reason, []).append(key)
    return why
