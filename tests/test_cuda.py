"""The same models on a CUDA GPU (skipped without one; CI has none)."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import (REPO, detector_inputs, final_ap, quickstart_cfg, student_cfg,
                     student_with_teacher, train_net)

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_teacher_trains_a_step_on_cuda(norm):
    model = build_model(quickstart_cfg("teacher", "MODEL.DEVICE", "cuda",
                                       "MODEL.RESNETS.NORM", norm)).train()
    with EventStorage(0):
        losses = model(detector_inputs([(200, 240), (256, 192)]))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) and v.is_cuda for v in losses.values())


def test_student_trains_a_step_on_cuda(untrained_teachers, tmp_path):
    student = student_with_teacher(student_cfg(untrained_teachers, tmp_path, "MODEL.DEVICE", "cuda"))
    with EventStorage(0):
        losses = student.train()(detector_inputs([(224, 224), (192, 256)]))
    sum(losses.values()).backward()
    assert losses["loss_distill"].is_cuda and torch.isfinite(losses["loss_distill"])


def test_cuda_and_cpu_give_the_same_head_outputs():
    torch.manual_seed(0)
    cpu = build_model(quickstart_cfg("teacher")).eval()
    gpu = build_model(quickstart_cfg("teacher", "MODEL.DEVICE", "cuda")).eval()
    gpu.load_state_dict(cpu.state_dict())
    batch = detector_inputs([(200, 240), (256, 192)], with_boxes=False)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    with torch.no_grad():
        outs = []
        for model in (cpu, gpu):
            fused = model.extract(model.preprocess_image(batch)).head_in
            outs.append([t.cpu() for branch in model.head(fused) for t in branch])
    torch.backends.cudnn.allow_tf32 = tf32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)


def test_train_and_eval_scripts_run_on_cuda(tmp_path):
    common = ["MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", 30, "SOLVER.STEPS", "(20,)"]
    teacher = train_net("--config-file", os.path.join(REPO, "configs/quickstart/teacher.yaml"),
                        *common, "OUTPUT_DIR", tmp_path / "t")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    final_ap(teacher.stdout)
    student = train_net("--config-file", os.path.join(REPO, "configs/quickstart/student.yaml"),
                        *common, "MODEL.TEACHER.WEIGHTS", tmp_path / "t" / "model_final.pth",
                        "OUTPUT_DIR", tmp_path / "s", script="train_net_S.py")
    assert student.returncode == 0, student.stderr[-3000:]
    evaluated = train_net("--config-file", os.path.join(REPO, "configs/quickstart/student.yaml"),
                          "--eval-only", "MODEL.DEVICE", "cuda", "MODEL.WEIGHTS",
                          tmp_path / "s" / "model_final.pth", "MODEL.TEACHER.WEIGHTS",
                          "absent.pth", "OUTPUT_DIR", tmp_path / "e", script="train_net_S.py")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert final_ap(evaluated.stdout) == final_ap(student.stdout)


def test_thumbdet_trains_a_step_on_cuda(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from msad.engine.teacher import build_frozen_teacher

    teacher = build_model(quickstart_cfg("hr_baseline", "MODEL.DEVICE", "cuda"))
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save("hr")
    cfg = quickstart_cfg("thumbdet_4x", "MODEL.DEVICE", "cuda",
                         "MODEL.TEACHER.WEIGHTS", str(tmp_path / "hr.pth"))
    model = build_model(cfg)
    model.attach_teacher(build_frozen_teacher(cfg))
    with EventStorage(0):
        losses = model.train()(detector_inputs([(224, 224), (192, 256)]))
    sum(losses.values()).backward()
    assert all(v.is_cuda and torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd"].item() > 0 and losses["loss_mimic"].item() > 0
