"""MSAD student: frozen teacher, distillation loss and warm-up, resume, teacher-free inference."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import (QUICKSTART_TEACHER, detector_inputs, quickstart_cfg, student_cfg,
                     student_with_teacher)
from msad.engine.defaults import DistillationTrainer
from msad.engine.hooks import IterationSchedule
from msad.engine.teacher import build_frozen_teacher
from msad.modeling.alignment import Branch
from msad.modeling.distill import aligned_feature_l1, warmup_factor


def test_distillation_l1_matches_a_hand_computation():
    s = [torch.tensor([[[[3.0, -3.0], [6.0, 0.0]]]]), torch.tensor([[[[9.0]]]])]
    t = [torch.zeros(1, 1, 2, 2), torch.tensor([[[[3.0]]]])]
    # Level 1: mean(|1|, |-1|, |2|, |0|) = 1; level 2: |3 - 1| = 2.
    assert aligned_feature_l1(s, t, temperature=3.0).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="aligned level 1"):
        aligned_feature_l1(s, [t[0], torch.zeros(1, 1, 2, 2)], 3.0)


def test_student_distillation_loss_is_alpha_t2_warmup_l1(untrained_teachers, tmp_path):
    student = student_with_teacher(student_cfg(untrained_teachers, tmp_path)).train()
    student.distill_warmup = 0.5
    batch = detector_inputs([(200, 240), (256, 192)])
    with EventStorage(0):
        losses = student(batch)
    with torch.no_grad():
        images = student.preprocess_image(batch)
        mine = student.extract(images).head_in
        fused = student.teacher.extract(images).head_in
    want = 0.2 * 3.0**2 * 0.5 * aligned_feature_l1(mine, fused, 3.0)
    torch.testing.assert_close(losses["loss_distill"], want)
    assert {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"} <= set(losses)


def test_without_distillation_the_teacher_only_initialises_the_student(untrained_teachers, tmp_path):
    """configs/quickstart/lr_teacher_init.yaml: the student's recipe with KD_ALPHA 0, the
    ablation that separates distillation from starting at the teacher's weights."""
    ablation, student = quickstart_cfg("lr_teacher_init"), quickstart_cfg("student")
    assert ablation.MODEL.MSAD.KD_ALPHA == 0.0 and student.MODEL.MSAD.KD_ALPHA > 0
    ablation.MODEL.MSAD.KD_ALPHA = student.MODEL.MSAD.KD_ALPHA
    ablation.OUTPUT_DIR = student.OUTPUT_DIR
    assert ablation == student  # the student's recipe otherwise, teacher init included
    cfg = student_cfg(untrained_teachers, tmp_path, "MODEL.MSAD.KD_ALPHA", 0.0)
    student = student_with_teacher(cfg).train()
    student.init_from_teacher()
    teacher_state = student.teacher.state_dict()
    assert all(torch.equal(v, teacher_state[k]) for k, v in student.state_dict().items())

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran although nothing is distilled")

    student.teacher.extract = student.teacher.preprocess_image = boom
    with EventStorage(0):
        losses = student(detector_inputs([(200, 240)]))
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}


@pytest.mark.parametrize("iteration,factor", [(0, 0.0), (250, 0.5), (500, 1.0), (1000, 1.0)])
def test_warmup_factor(iteration, factor):
    assert warmup_factor(iteration, 500) == factor


def test_warmup_hook_reads_the_trainer_iteration_so_it_survives_resume():
    model = SimpleNamespace(distill_warmup=None)
    storage = EventStorage(300)
    hook = IterationSchedule("distill_warmup", partial(warmup_factor, warmup_iters=500))
    hook.trainer = SimpleNamespace(iter=300, model=model, storage=storage)  # resumed at 300
    hook.before_step()
    assert model.distill_warmup == pytest.approx(0.6)


def test_teacher_is_frozen_outside_the_student_and_stays_in_eval(untrained_teachers, tmp_path):
    student = student_with_teacher(student_cfg(untrained_teachers, tmp_path))
    teacher = student.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(k.startswith("_teacher") or "teacher" in k for k in student.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in student.parameters()}.isdisjoint({id(p) for p in teacher.parameters()})
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    student.train()
    assert not teacher.training
    with EventStorage(0):
        for _ in range(2):
            loss = sum(student(detector_inputs([(224, 224)])).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics included


def test_student_inference_never_runs_the_teacher(untrained_teachers, tmp_path):
    student = student_with_teacher(student_cfg(untrained_teachers, tmp_path)).eval()

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran at inference")

    student.teacher.forward = boom
    student.teacher.extract = boom
    student.teacher.preprocess_image = boom
    with torch.no_grad():
        out = student(detector_inputs([(200, 210), (256, 256), (190, 250)], with_boxes=False))
    assert len(out) == 3
    # And without any teacher at all, as after --eval-only.
    with torch.no_grad():
        assert len(build_model(student_cfg(untrained_teachers, tmp_path)).eval()(
            detector_inputs([(200, 200)], with_boxes=False))) == 1


def test_a_teacher_must_be_another_compatible_model(untrained_teachers, tmp_path):
    cfg = student_cfg(untrained_teachers, tmp_path)
    student = build_model(cfg)
    with pytest.raises(TypeError, match="separate msad detector"):
        student.attach_teacher(student)
    wide = build_model(quickstart_cfg("teacher", "MODEL.FPN.OUT_CHANNELS", 32))
    with pytest.raises(ValueError, match="OUT_CHANNELS"):
        student.attach_teacher(wide)
    teacher = build_model(quickstart_cfg("teacher"))
    student.attach_teacher(teacher)
    assert student.teacher_pairs(teacher) == [(i, i) for i in range(5)]


def test_light_student_distills_the_four_levels_it_shares(untrained_teachers, tmp_path):
    cfg = quickstart_cfg("student_light", "MODEL.TEACHER.CONFIG_FILE", QUICKSTART_TEACHER,
                         "MODEL.TEACHER.WEIGHTS", str(untrained_teachers / "teacher.pth"))
    student = student_with_teacher(cfg).train()
    assert student.branches == [Branch(2, ("p3", "p4", "p5", "p6", "p7"))]  # of the 0.5x image
    assert student.full_resolution_levels == ["p4", "p5", "p6", "p7", "p8"]
    assert student.teacher_pairs(student.teacher) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with EventStorage(0):
        losses = student(detector_inputs([(224, 256)]))
    assert losses["loss_distill"].item() > 0


def test_while_distilling_the_batch_is_padded_for_student_and_teacher(untrained_teachers, tmp_path):
    """Aligned levels are compared on one padded batch: a teacher that needs a coarser multiple
    than the student (here by config) raises the student's padding for training only."""
    student = build_model(student_cfg(untrained_teachers, tmp_path))
    teacher = build_model(quickstart_cfg("teacher", "MODEL.FCOS.SIZE_DIVISIBILITY", 256))
    student.attach_teacher(teacher)
    batch = detector_inputs([(200, 300)])
    assert student.train().preprocess_image(batch).tensor.shape[-2:] == (256, 512)
    with EventStorage(0):
        assert student(batch)["loss_distill"].item() > 0
    assert student.eval().preprocess_image(batch).tensor.shape[-2:] == (256, 384)


@pytest.mark.parametrize("key,value,message", [
    ("MODEL.TEACHER.WEIGHTS", "nowhere/teacher.pth", "nowhere/teacher.pth"),
    ("MODEL.TEACHER.CONFIG_FILE", "nowhere/teacher.yaml", "nowhere/teacher.yaml"),
    ("MODEL.TEACHER.CONFIG_FILE", "", "CONFIG_FILE is empty"),
])
def test_missing_untrained_teachers_are_named(untrained_teachers, tmp_path, key, value, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        build_frozen_teacher(student_cfg(untrained_teachers, tmp_path, key, value))


def test_teacher_checkpoint_of_another_width_is_refused(untrained_teachers, tmp_path):
    cfg = student_cfg(untrained_teachers, tmp_path)
    wide = build_model(quickstart_cfg("teacher", "MODEL.SLIMMABLE.WIDTH", 0.5))
    DetectionCheckpointer(wide, save_dir=str(tmp_path)).save("wide")
    cfg.MODEL.TEACHER.WEIGHTS = str(tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"does not fit.*of another shape"):
        build_frozen_teacher(cfg)


def _trainer(cfg):
    cfg.freeze()
    return DistillationTrainer(cfg)


def test_fresh_run_starts_from_the_teacher_and_resume_from_the_student(untrained_teachers, tmp_path):
    cfg = student_cfg(untrained_teachers, tmp_path, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1)
    trainer = _trainer(cfg.clone())
    trainer.resume_or_load(resume=False)
    teacher_sd = trainer.teacher.state_dict()
    student_sd = trainer.model.state_dict()
    assert torch.equal(student_sd["head.cls_score.weight"], teacher_sd["head.cls_score.weight"])
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert saved.keys() == trainer.model.state_dict().keys()  # no teacher inside

    resumed = _trainer(cfg.clone())
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert not torch.equal(resumed.model.state_dict()["head.cls_score.weight"],
                           resumed.teacher.state_dict()["head.cls_score.weight"])


def test_channel_normalised_distillation_ignores_the_teachers_scale_and_offset():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, 4, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g)]
    scaled = [t[0] * torch.tensor([5.0, 0.2, 3.0]).view(1, 3, 1, 1) + 7.0]
    plain = aligned_feature_l1(s, t, 1.0, "channel")
    assert aligned_feature_l1(s, scaled, 1.0, "channel").item() == pytest.approx(plain.item(), rel=1e-4)
    assert aligned_feature_l1(s, scaled, 1.0).item() != pytest.approx(aligned_feature_l1(s, t, 1.0).item())
    assert aligned_feature_l1(t, t, 1.0, "channel").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="MODEL.MSAD.KD_NORMALIZE must be one of"):
        aligned_feature_l1(s, t, 1.0, "batch")


def test_train_mode_teacher_bn_uses_batch_statistics_and_keeps_its_weights(untrained_teachers, tmp_path):
    eval_student = student_with_teacher(student_cfg(untrained_teachers, tmp_path)).train()
    train_student = build_model(student_cfg(untrained_teachers, tmp_path))
    train_student.attach_teacher(build_frozen_teacher(student_cfg(untrained_teachers, tmp_path)),
                                 bn_mode="train")
    teacher = train_student.teacher
    batch = detector_inputs([(224, 224), (192, 256)])
    in_eval, _ = eval_student.teacher_outputs(batch)
    weights = [p.clone() for p in teacher.parameters()]
    stem = teacher.backbone.bottom_up.stem.conv1.norm
    running = stem.running_mean.clone()
    in_train, _ = train_student.teacher_outputs(batch)
    assert not teacher.training and stem.training  # the detector stays in eval, its BN trains
    assert not torch.allclose(in_eval[0], in_train[0])
    assert not torch.allclose(stem.running_mean, running)  # batch statistics were used
    opt = torch.optim.SGD(train_student.parameters(), lr=0.1)
    with EventStorage(1):
        sum(train_student(batch).values()).backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights, teacher.parameters()))
    with pytest.raises(ValueError, match="MODEL.TEACHER.BN_MODE must be one of"):
        build_model(student_cfg(untrained_teachers, tmp_path)).attach_teacher(
            build_frozen_teacher(student_cfg(untrained_teachers, tmp_path)), bn_mode="frozen")
    frozen = build_model(quickstart_cfg("teacher", "MODEL.RESNETS.NORM", "FrozenBN",
                                         "MODEL.MSAD.BRANCH_BN", False))
    with pytest.raises(ValueError, match="BN_MODE 'train' needs BatchNorm layers"):
        build_model(student_cfg(untrained_teachers, tmp_path)).attach_teacher(frozen, bn_mode="train")
    one_branch = build_model(quickstart_cfg("teacher", "MODEL.MSAD.TEST_BRANCH", "hr"))
    with pytest.raises(ValueError, match="TEST_BRANCH must be 'fused', not 'hr'"):
        build_model(student_cfg(untrained_teachers, tmp_path)).attach_teacher(one_branch)


def test_student_logs_the_distillations_share_of_the_gradient(untrained_teachers, tmp_path):
    batch = detector_inputs([(224, 224)])
    grads, logged = {}, {}
    for period in (5, 0):
        torch.manual_seed(0)
        student = student_with_teacher(student_cfg(untrained_teachers, tmp_path,
                                                   "MODEL.MSAD.GRAD_SHARE_PERIOD", period)).train()
        student.distill_warmup = 1.0
        with EventStorage(4) as storage:  # the 5th iteration ends a period of 5
            losses = student(batch)
            sum(losses.values()).backward()
            logged[period] = {k: v[0] for k, v in storage.latest().items()}
        grads[period] = [p.grad.clone() for p in student.parameters()]
    # The diagnostic changes no gradient of the step, and is logged only on its iterations.
    assert all(torch.equal(a, b) for a, b in zip(grads[5], grads[0]))
    assert "grad_share/distill" not in logged[0]
    found = logged[5]
    # Each norm by hand: the gradient of that loss alone at the FPN outputs.
    own = student.extract(student.preprocess_image(batch)).head_in
    teacher_features, _ = student.teacher_outputs(batch)
    pairs, t = student.teacher_pairs(student.teacher), student.kd_temperature
    distill = student.kd_alpha * t * t * aligned_feature_l1(
        [own[i] for i, _ in pairs], [teacher_features[j] for _, j in pairs], t)
    with EventStorage(4):
        detection = sum(v for k, v in student.forward_training(
            student.preprocess_image(batch), own, student.head(own),
            student.gt_instances(batch)).items())
    for name, loss in (("distill", distill), ("detection", detection)):
        g = torch.autograd.grad(loss, own, retain_graph=True)
        assert found[f"grad_norm/{name}"] == pytest.approx(
            torch.sqrt(sum((x * x).sum() for x in g)).item(), rel=1e-4), name
    assert 0 < found["grad_share/distill"] < 1
    with pytest.raises(ValueError, match="GRAD_SHARE_PERIOD must be 0"):
        build_model(student_cfg(untrained_teachers, tmp_path, "MODEL.MSAD.GRAD_SHARE_PERIOD", -1))


def test_kd_levels_choose_which_shared_levels_are_distilled(untrained_teachers, tmp_path):
    every = student_with_teacher(student_cfg(untrained_teachers, tmp_path)).train()
    two = student_with_teacher(student_cfg(untrained_teachers, tmp_path,
                                           "MODEL.MSAD.KD_LEVELS", ["p3", "p5"])).train()
    assert two.distilled_pairs(two.teacher) == [(0, 0), (2, 2)]
    assert every.distilled_pairs(every.teacher) == every.teacher_pairs(every.teacher)
    batch = detector_inputs([(224, 224)])
    own = two.extract(two.preprocess_image(batch)).head_in
    teacher_features, _ = two.teacher_outputs(batch)
    two.distill_warmup = 1.0
    with EventStorage(1):
        loss = two(batch)["loss_distill"]
    t = two.kd_temperature
    want = two.kd_alpha * t * t * aligned_feature_l1([own[0], own[2]],
                                                     [teacher_features[0], teacher_features[2]], t)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"MODEL.MSAD.KD_LEVELS names \['p2'\]"):
        build_model(student_cfg(untrained_teachers, tmp_path, "MODEL.MSAD.KD_LEVELS", ["p2"]))
