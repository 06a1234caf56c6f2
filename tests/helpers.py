"""What several test files share: paths, configs, inputs, and running the scripts and tools."""
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import traceback

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from msad.config import load_config
from msad.data.synthetic import generate_split
from msad.engine.teacher import build_frozen_teacher, use_trained_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_TEACHER = os.path.join(REPO, "configs", "quickstart", "teacher.yaml")


def quickstart_cfg(name="teacher", *opts):
    """The (unfrozen) config of configs/quickstart/<name>.yaml with `opts` overrides, its
    teacher's config chosen as the training scripts choose it."""
    cfg = load_config(os.path.join(REPO, "configs", "quickstart", f"{name}.yaml"), opts)
    use_trained_config(cfg, named="MODEL.TEACHER.CONFIG_FILE" in opts[0::2])
    return cfg


def torchvision_opts(arch, norm="BN"):
    """Overrides that put torchvision's `arch` (msad/modeling/torchvision_backbone.py) under a
    config."""
    return ("MODEL.BACKBONE.NAME", "build_torchvision_fpn_backbone", "MODEL.TORCHVISION.ARCH", arch,
            "MODEL.TORCHVISION.NORM", norm)


def detector_inputs(sizes, seed=0, with_boxes=True):
    """Detectron2's batched inputs of random images of `sizes` ((h, w) each), with two boxes."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
        d = {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "height": h,
             "width": w}
        if with_boxes:
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.tensor([[2.0, 3.0, w / 2, h / 2], [w / 3, h / 4, w - 1, h - 2]]))
            inst.gt_classes = torch.tensor([0, 3])
            d["instances"] = inst
        batch.append(d)
    return batch


def train_net(*args, script="train_net_T.py", timeout=1500, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def train_in_process(*args, script="train_net_T.py"):
    """What `script` (train_net_T.py or train_net_S.py) does with `args`, in this process (its
    checks raise here); each script's own process is tested once, in test_train_net.py."""
    from msad.engine.defaults import DistillationTrainer, Trainer, main

    trainer = {"train_net_T.py": Trainer, "train_net_S.py": DistillationTrainer}[script]
    main(trainer, [str(a) for a in args])


def train_net_here(*args, script="train_net_T.py"):
    """train_in_process, reported as train_net reports the script's process: exit status 0, or
    1 with the traceback (what the process prints last) as stderr; logs are not captured."""
    try:
        train_in_process(*args, script=script)
    except Exception as e:
        return subprocess.CompletedProcess(args, 1, "", "".join(traceback.format_exception(e)))
    return subprocess.CompletedProcess(args, 0, "", "")


def final_ap(log):
    """The numbers of the last 'copypaste:' line that Detectron2 prints after evaluating."""
    rows = re.findall(r"copypaste: ([-0-9.,na]+)$", log, flags=re.M)
    assert rows, log[-3000:]
    return rows[-1]


def tool(name):
    """The module of tools/<name>.py, loaded once (the tools are scripts, not a package)."""
    module_name = f"tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name,
                                                      os.path.join(REPO, "tools", f"{name}.py"))
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def tool_here(name, *args):
    """tools/<name>.py's main(argv) in this process, reported as run_tool reports the tool's
    process: exit status, what it printed, and its error message or traceback last on stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tool(name).main([str(a) for a in args])
        except SystemExit as e:  # as Python exits: a message goes to stderr with status 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else 1 if e.code else 0
        except Exception as e:
            print("".join(traceback.format_exception(e)), file=sys.stderr)
            code = 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def small_dataset(root, n=4, seed=3):
    """`n` synthetic images and their COCO JSON under `root`; returns (json path, image dir)."""
    json_file, images = root / "set.json", root / "images"
    generate_split(str(json_file), str(images), n, seed)
    return json_file, images


def edit_json(json_file, edit):
    coco = json.loads(json_file.read_text())
    edit(coco)
    json_file.write_text(json.dumps(coco))


class RunsCode:
    """Pickles into a call of os.system: a file that runs code when unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def student_cfg(teachers, tmp_path, *opts):
    """The quickstart student, distilled from the teacher.pth of `teachers` (the
    untrained_teachers fixture), writing into `tmp_path`."""
    return quickstart_cfg("student", "MODEL.TEACHER.CONFIG_FILE", QUICKSTART_TEACHER,
                          "MODEL.TEACHER.WEIGHTS", str(teachers / "teacher.pth"),
                          "OUTPUT_DIR", str(tmp_path),
                          "DATALOADER.NUM_WORKERS", 0, *opts)


def student_with_teacher(cfg):
    student = build_model(cfg)
    student.attach_teacher(build_frozen_teacher(cfg))
    return student
