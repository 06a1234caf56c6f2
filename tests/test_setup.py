"""Set-up: the Detectron2 installer, the set-up script's refusals, the environment."""
import base64
import hashlib
import os
import subprocess
import zipfile

import pytest

from helpers import REPO, tool

inst = tool("install_detectron2")


def test_package_imports_and_registers():
    import detectron2  # noqa: F401
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    import msad  # noqa: F401

    assert "MultiScaleTeacher" in META_ARCH_REGISTRY
    assert "SingleScaleFCOS" in META_ARCH_REGISTRY
    assert "build_slimmable_resnet_fpn_backbone" in BACKBONE_REGISTRY
    assert {"msad_synth_train", "msad_synth_val"} <= set(DatasetCatalog.list())


def test_env_summary_names_the_detectron2_and_torch_in_use():
    import detectron2
    import torch

    from msad.utils.env import has_compiled_ops, summary

    text = summary()
    assert os.path.dirname(detectron2.__file__) in text and torch.__version__ in text
    assert ("_C ops: present" in text) == has_compiled_ops()
    assert "export: onnx 1." in text and "onnxruntime 1." in text


def test_the_modules_setup_runs_exist():
    """tools/setup.sh ends by running package modules (python -m ...): each must be importable."""
    import importlib.util
    import re

    with open(os.path.join(REPO, "tools", "setup.sh")) as f:
        modules = re.findall(r"-m (msad[\w.]*)", f.read())
    assert modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module


def test_corrupt_wheel_is_refused_and_removed(tmp_path, capsys):
    wheel = tmp_path / inst.WHEEL_NAME
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit) as e:
        inst.fetch_wheel(tmp_path)
    assert e.value.code == 1
    assert "sha256" in capsys.readouterr().err
    assert not wheel.exists()  # the next run downloads afresh


def _fake_wheel(path):
    info = inst.DIST_INFO
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("detectron2/__init__.py", "__version__ = '0.7.2'\n")
        z.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
        z.writestr("tools/train_net.py", "")
        z.writestr(f"{info}/METADATA", "Name: sal-detectron2\nRequires-Dist: numpy<2\n"
                   "Requires-Dist: black\nRequires-Dist: yacs>=0.1.8\n")
        z.writestr(f"{info}/WHEEL", "Tag: cp310-none-any\n")
        z.writestr(f"{info}/top_level.txt", "detectron2\ntools\n")
        z.writestr(f"{info}/RECORD", "stale\n")


def test_repacked_wheel_is_pure_python_without_C(tmp_path):
    src = tmp_path / "src.whl"
    _fake_wheel(src)
    out = inst.repack(src, tmp_path)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert "detectron2/__init__.py" in names
        assert not any("_C." in n or n.startswith("tools/") for n in names)
        meta = z.read(f"{inst.DIST_INFO}/METADATA").decode()
        assert "numpy<2" not in meta and "black" not in meta and "yacs>=0.1.8" in meta
        assert "Tag: py3-none-any" in z.read(f"{inst.DIST_INFO}/WHEEL").decode()
        for line in z.read(f"{inst.DIST_INFO}/RECORD").decode().splitlines():
            name, digest, size = line.split(",")
            if digest:  # every file but RECORD carries its true hash and size
                data = z.read(name)
                want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                assert digest == "sha256=" + want.decode() and int(size) == len(data)


def test_setup_refuses_old_python_and_touches_nothing(tmp_path):
    fake = tmp_path / "python3.9"
    fake.write_text('#!/bin/sh\n[ "$1" = "-V" ] && { echo "Python 3.9.18"; exit 0; }\nexit 1\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    env = dict(os.environ, PYTHON=str(fake), MSAD_VENV=str(venv))
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "setup.sh")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Python 3.9.18 is too old" in proc.stderr
    assert not venv.exists()


def test_every_config_key_is_commented():
    """Each key add_msad_config sets has a comment on its line or just above it."""
    lines = open(os.path.join(REPO, "msad", "config.py")).read().splitlines()
    assignments = [i for i, line in enumerate(lines) if line.strip().startswith("_C.")
                   and "= CN()" not in line]
    assert len(assignments) > 10
    uncommented = [lines[i].strip() for i in assignments
                   if "#" not in lines[i] and not lines[i - 1].strip().startswith("#")]
    assert not uncommented, uncommented
