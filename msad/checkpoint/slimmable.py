"""Reading the slimmable-network ImageNet checkpoint and slicing one width out of it.

Layout of ``s_resnet50_0.25_0.5_0.75_1.0.pt`` (and its ResNet-101 analogue): ``torch.load``
gives ``{'model': state_dict}`` saved from DataParallel (keys start with ``module.``).
``features.0.0`` is the stem conv and ``features.0.1.bn.{i}`` its BatchNorms; ``features.{k}``
for k = 1.. are the bottlenecks in order, whose convs are ``body.{0,3,6}`` with BatchNorms
``body.{1,4,7}.bn.{i}``, and the first block of each stage has ``shortcut.0`` (conv) and
``shortcut.1.bn.{i}``.  Convs are stored at full width; width w uses the leading slice
``[:out, :in]``.  BatchNorm ``i`` is the position of w in the width list the network was trained
with.  ``classifier.*`` is the ImageNet head and is dropped.
"""
import logging

from .detection_checkpoint import load_state_dict_file

logger = logging.getLogger(__name__)

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def slimmable_key_map(blocks_per_stage):
    """Yield (slimmable prefix, Detectron2 ResNet prefix, kind) for every conv and norm."""
    yield "features.0.0", "stem.conv1", "conv"
    yield "features.0.1", "stem.conv1.norm", "bn"
    k = 1
    for s, blocks in enumerate(blocks_per_stage):
        for b in range(blocks):
            d2 = f"res{s + 2}.{b}"
            for j, conv in enumerate(("conv1", "conv2", "conv3")):
                yield f"features.{k}.body.{3 * j}", f"{d2}.{conv}", "conv"
                yield f"features.{k}.body.{3 * j + 1}", f"{d2}.{conv}.norm", "bn"
            if b == 0:
                yield f"features.{k}.shortcut.0", f"{d2}.shortcut", "conv"
                yield f"features.{k}.shortcut.1", f"{d2}.shortcut.norm", "bn"
            k += 1


def resnet_blocks_per_stage(resnet_state):
    """Blocks of each stage (res2, res3, ...) of a Detectron2 ResNet, read from the keys of its
    state_dict (``res<s>.<block>.*``)."""
    blocks = {}
    for key in resnet_state:
        stage, _, rest = key.partition(".")
        if stage.startswith("res"):
            blocks[stage] = max(blocks.get(stage, 0), int(rest.split(".", 1)[0]) + 1)
    return tuple(blocks[f"res{s}"] for s in range(2, 2 + len(blocks)))


def convert_slimmable_state_dict(state, width, width_list, target, prefix="module."):
    """Slice the checkpoint's tensors for `width` into the keys and shapes of `target`.

    `target` is the ResNet's state_dict (its shapes are what the slices must match); the
    checkpoint's ResNet keys start with `prefix` (the official MSAD detectors' with
    ``T_backbone.bottom_up.`` or ``S_backbone.bottom_up.``).
    """
    if width not in width_list:
        raise ValueError(f"width {width} is not in the checkpoint's width list {list(width_list)}")
    bn_index = list(width_list).index(width)
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or state
    out = {}
    for src, dst, kind in slimmable_key_map(resnet_blocks_per_stage(target)):
        fields = [("weight", "weight")] if kind == "conv" else [
            (f"bn.{bn_index}.{f}", f) for f in _BN_FIELDS]
        for src_field, dst_field in fields:
            src_key, dst_key = f"{src}.{src_field}", f"{dst}.{dst_field}"
            if src_key not in state:
                raise KeyError(f"the checkpoint has no key '{prefix}{src_key}' "
                               f"(needed for {dst_key})")
            if dst_key not in target:
                raise KeyError(f"the model has no parameter {dst_key} for '{prefix}{src_key}'")
            tensor, want = state[src_key], tuple(target[dst_key].shape)
            if kind == "conv":
                if tensor.dim() != 4 or tensor.shape[0] < want[0] or tensor.shape[1] < want[1]:
                    raise ValueError(f"'{prefix}{src_key}' has shape {tuple(tensor.shape)}, which "
                                     f"cannot be sliced to {want} for {dst_key}")
                tensor = tensor[: want[0], : want[1]]
            if tuple(tensor.shape) != want:
                raise ValueError(f"'{prefix}{src_key}' has shape {tuple(tensor.shape)}, expected "
                                 f"{want} for {dst_key} at width {width}")
            out[dst_key] = tensor.clone()
    return out


def load_slimmable_resnet(resnet, path, width, width_list):
    """Initialise a Detectron2 ResNet (width `width`) from a slimmable ImageNet checkpoint."""
    state = load_state_dict_file(path, "MODEL.SLIMMABLE.PRETRAINED")
    target = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    converted = convert_slimmable_state_dict(state, width, width_list, target)
    missing = sorted(set(target) - set(converted))
    if missing:
        raise KeyError(f"{path}: the checkpoint gives no value for {missing[:5]}")
    resnet.load_state_dict(converted, strict=False)
    logger.info("Loaded slimmable ResNet width %s (BN index %d) from %s",
                width, list(width_list).index(width), path)
