"""Checkpoints that a kill cannot truncate, and weights that cannot run code when loaded."""
import os
import pickle

import pytest
import torch
from detectron2.modeling import build_model

import msad.checkpoint.detection_checkpoint as checkpoint_module
from helpers import RunsCode, quickstart_cfg
from msad.checkpoint.detection_checkpoint import SafeCheckpointer, load_state_dict_file


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    checkpointer = SafeCheckpointer(build_model(quickstart_cfg("teacher")), str(tmp_path))
    checkpointer.save("model_0000009")
    good = (tmp_path / "model_0000009.pth").read_bytes()

    def killed_midway(data, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as a kill would stop the write

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000009")
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000019")
    assert (tmp_path / "model_0000009.pth").read_bytes() == good  # the old file, whole
    assert not (tmp_path / "model_0000019.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]  # no temp files


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": payload}}, f)
    with pytest.raises(RuntimeError, match=r"MODEL\.TEACHER\.WEIGHTS: cannot load .*evil\.pth"):
        load_state_dict_file(str(path), "MODEL.TEACHER.WEIGHTS")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(RuntimeError, match="cut.pth"):
        load_state_dict_file(str(path), "MODEL.WEIGHTS")
