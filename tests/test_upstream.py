"""The private fvcore, Detectron2 and torch internals msad overrides or calls, pinned.

No public hook does what each one does (reading a checkpoint file and checking what it loads;
one loss normaliser for the branches of a step; Detectron2's top-k decoding; the opsets torch's
exporter writes).  Each test fails when the upstream code changes, so that the override is
checked against the new version and the fingerprint updated, instead of a silent change of
behaviour.  Checked against fvcore 0.1.5.post20221221, Detectron2 0.7.2, torch 2.14.1.
"""
import hashlib
import importlib
import inspect

import pytest

# "module:Class.method" -> the first 16 hex digits of the sha256 of its source; with what msad
# does with it.
PINNED = {
    # msad.checkpoint.detection_checkpoint.SafeCheckpointer overrides these three ...
    "detectron2.checkpoint.detection_checkpoint:DetectionCheckpointer._load_file": "b01551bdb3eead54",
    "detectron2.checkpoint.detection_checkpoint:DetectionCheckpointer._torch_load": "af77737b9464f34d",
    "fvcore.common.checkpoint:Checkpointer._load_model": "d1330f4f761a82db",
    # ... which these call, in this order.
    "fvcore.common.checkpoint:Checkpointer.load": "ea68c5fa0a146bdd",
    "detectron2.checkpoint.detection_checkpoint:DetectionCheckpointer.load": "e194c13fb9fa2472",
    # msad.modeling.fcos.AlignedFCOS overrides _ema_update, which FCOS.losses calls once per
    # call; and calls _decode_multi_level_predictions (with the per-level decoding it runs).
    "detectron2.modeling.meta_arch.dense_detector:DenseDetector._ema_update": "842a06be70e8fff9",
    "detectron2.modeling.meta_arch.fcos:FCOS.losses": "d0cea8e432de36ca",
    "detectron2.modeling.meta_arch.dense_detector:DenseDetector._decode_multi_level_predictions":
        "17c0126694fbfb6e",
    "detectron2.modeling.meta_arch.dense_detector:DenseDetector._decode_per_level_predictions":
        "5884a6f14fbc4e9d",
}


def fingerprint(target):
    module, qualname = target.split(":")
    obj = importlib.import_module(module)
    for name in qualname.split("."):
        obj = getattr(obj, name)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("target", sorted(PINNED))
def test_a_private_upstream_method_msad_relies_on_is_the_one_checked(target):
    assert fingerprint(target) == PINNED[target], (
        f"{target} changed upstream: check msad's use of it against the new code, then update "
        "its fingerprint here")


def test_torch_still_says_which_opsets_its_exporter_writes():
    # msad.export.exporter.max_opset reads this private constant: no public API gives it.
    from torch.onnx import _constants

    from msad.export.exporter import DEFAULT_OPSET

    assert isinstance(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET, int)
    assert _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET >= DEFAULT_OPSET
