"""FCOS, HR/LR alignment and the multi-scale teacher."""
import copy

import pytest
import torch
from torch import nn
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import detector_inputs, quickstart_cfg
from msad.modeling.alignment import (Branch, check_levels, level_shift, padding_multiple,
                                     shift_levels)
from msad.modeling.distill import batch_norms
from msad.modeling.resample import downsample
from msad.modeling.teacher import CrossLevelFusion, add_branch_statistics, lr_statistics


@pytest.fixture
def teacher(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def test_level_pairing_is_one_shift_per_factor():
    hr = ["p3", "p4", "p5", "p6", "p7"]
    lr = ["p2", "p3", "p4", "p5", "p6"]
    assert shift_levels(hr, -1) == lr
    assert Branch(1, hr).full_resolution_levels == hr
    assert Branch(2, lr).full_resolution_levels == hr
    assert Branch(4, lr).full_resolution_levels == ["p4", "p5", "p6", "p7", "p8"]
    assert level_shift(4) == 2
    with pytest.raises(ValueError, match="MODEL.FCOS.INPUT_FACTOR must be a power of two"):
        level_shift(3)
    with pytest.raises(ValueError, match="need backbone levels \\['p1'\\]"):
        check_levels(Branch(4, shift_levels(hr, -2)), {"p2", "p3", "p4", "p5", "p6", "p7"})
    with pytest.raises(ValueError, match="'P3' is not an FPN level name"):
        shift_levels(["P3"], 1)


STRIDES = {f"p{level}": 2 ** level for level in range(2, 8)}


def test_padding_is_the_coarsest_stride_read_in_full_image_pixels():
    hr, lr = Branch(1, ("p3", "p4", "p5", "p6", "p7")), Branch(2, ("p2", "p3", "p4", "p5", "p6"))
    assert padding_multiple(0, [hr, lr], STRIDES) == 128  # the teacher: not 256
    assert padding_multiple(0, [lr], STRIDES) == 128  # the LR FCOS and student
    assert padding_multiple(0, [Branch(4, lr.levels)], STRIDES) == 256  # a 4x thumbnail's P6
    assert padding_multiple(0, [Branch(2, ("p3", "p4"))], STRIDES) == 32
    assert padding_multiple(384, [hr, lr], STRIDES) == 384  # a config may raise it
    with pytest.raises(ValueError, match="MODEL.FCOS.SIZE_DIVISIBILITY=192 must be a multiple of "
                                         "128 \\(factor 1 x stride 128 of p7"):
        padding_multiple(192, [hr, lr], STRIDES)


@pytest.mark.parametrize("name, padding", [("teacher", 128), ("hr_baseline", 128),
                                           ("lr_baseline", 128), ("student_light", 256),
                                           ("thumbdet_4x", 256), ("bicubic_4x", 256)])
def test_each_model_pads_to_what_its_levels_need(name, padding):
    model = build_model(quickstart_cfg(name))
    assert model.size_divisibility == padding
    inputs = model.branch_input_sizes((200, 300))
    padded = (256, 384) if padding == 128 else (256, 512)
    assert [(h * b.factor, w * b.factor) for (h, w), b in zip(inputs, model.branches)] == \
        [padded] * len(inputs)
    with pytest.raises(ValueError, match=f"must be a multiple of {padding}"):
        build_model(quickstart_cfg(name, "MODEL.FCOS.SIZE_DIVISIBILITY", padding // 2))


@pytest.mark.parametrize("size", [(256, 256), (512, 768), (768, 256), (384, 640)])
def test_lr_level_l_matches_hr_level_l_plus_1(teacher, size):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        hr = teacher.backbone(x)
        lr = teacher.backbone(downsample(x, 2))
    for level in range(2, 7):
        assert hr[f"p{level + 1}"].shape[-2:] == lr[f"p{level}"].shape[-2:], level


def test_fusion_weights_sum_to_one_per_image():
    fusion = CrossLevelFusion(channels=8, hidden_dim=4)
    hr, lr = torch.randn(3, 8, 5, 6), torch.randn(3, 8, 5, 6)
    w = fusion.weights(hr, lr)
    assert w.shape == (3, 2)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert not torch.allclose(w[0], w[1])  # per image, not per batch
    out = fusion(hr, lr)
    torch.testing.assert_close(out[1], w[1, 0] * hr[1] + w[1, 1] * lr[1])


@pytest.mark.parametrize("arch", ["teacher", "hr", "lr"])
def test_every_image_of_a_batch_is_predicted_in_its_own_size(arch):
    cfg = _arch_cfg(arch)
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.0  # untrained: keep whatever scores there are
    model = build_model(cfg).eval()
    # Untrained regressions are ~0 (empty boxes that postprocessing drops): make them one
    # stride to each side.
    torch.nn.init.constant_(model.head.bbox_pred.bias, 1.0)
    sizes = [(201, 333), (256, 256), (97, 410)]
    batch = detector_inputs(sizes, with_boxes=False)
    batch[1]["height"], batch[1]["width"] = 512, 512  # asked for at another size
    with torch.no_grad():
        out = model(batch)
    assert len(out) == 3
    for o, (h, w), d in zip(out, sizes, batch):
        inst = o["instances"]
        assert inst.image_size == (d["height"], d["width"])
        assert len(inst) > 0
        boxes = inst.pred_boxes.tensor
        assert boxes[:, 2].max() <= d["width"] and boxes[:, 3].max() <= d["height"]


def _arch_cfg(arch):
    if arch == "teacher":
        return quickstart_cfg("teacher")
    opts = ["MODEL.META_ARCHITECTURE", "SingleScaleFCOS"]
    if arch == "hr":
        opts += ["MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]]
    else:
        opts += ["MODEL.FCOS.INPUT_FACTOR", 2, "MODEL.FCOS.IN_FEATURES",
                 ["p2", "p3", "p4", "p5", "p6"], "MODEL.FPN.NUM_TOP_LEVELS", 1]
    return quickstart_cfg("teacher", *opts)


@pytest.mark.parametrize("arch", ["teacher", "hr", "lr"])
def test_no_parameter_is_unused_in_a_training_step(arch):
    model = build_model(_arch_cfg(arch)).train()
    with EventStorage(0):
        losses = model(detector_inputs([(200, 300), (256, 180)]))
    sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_teacher_reports_each_branch_loss_and_weights_the_fused_one(teacher):
    with EventStorage(0):
        losses = teacher(detector_inputs([(200, 300)]))
    assert set(losses) == {f"loss_{b}_{k}" for b in ("hr", "lr", "fused")
                           for k in ("cls", "loc", "ctr")}
    teacher.joint_weight = 1.0
    with EventStorage(0):
        unweighted = teacher(detector_inputs([(200, 300)]))
    torch.testing.assert_close(losses["loss_fused_cls"], 0.4 * unweighted["loss_fused_cls"])


def test_backbone_levels_that_no_branch_uses_are_refused():
    cfg = quickstart_cfg("teacher", "MODEL.META_ARCHITECTURE", "SingleScaleFCOS")  # FPN has P2
    with pytest.raises(ValueError, match=r"\['p2'\].*find_unused_parameters"):
        build_model(cfg)


def test_loss_falls_when_overfitting_two_images(teacher):
    batch = detector_inputs([(224, 288), (256, 256)], seed=1)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.01, momentum=0.9)
    history = []
    with EventStorage(0) as storage:
        # Start Detectron2's EMA loss normaliser at this batch's positive count, so that the
        # loss values measure the fit rather than the normaliser settling.
        teacher(copy.deepcopy(batch))
        teacher.loss_normalizer = storage.history("num_pos_anchors").latest() * len(batch)
        storage.step()
        for _ in range(40):
            loss = sum(teacher(copy.deepcopy(batch)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
            storage.step()
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:3]) / 3, history


def test_syncbn_zoo_config_trains_a_step_in_one_process():
    cfg = quickstart_cfg("teacher", "MODEL.RESNETS.NORM", "SyncBN")
    model = build_model(cfg).train()
    with EventStorage(0):
        losses = model(detector_inputs([(128, 160), (160, 128)]))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_branch_statistics_serve_every_batch_norm_kind_and_swap_back():
    layers = nn.Sequential(nn.BatchNorm2d(2), nn.SyncBatchNorm(2), NaiveSyncBatchNorm(2),
                           FrozenBatchNorm2d(2), nn.BatchNorm2d(2, track_running_stats=False))
    norms = add_branch_statistics(layers)
    assert norms == list(layers[:3])  # the frozen one and the one without statistics: none
    hr_statistics = [n.running_mean for n in norms]
    layers.train()
    with lr_statistics(norms):
        for norm in norms:
            norm(torch.randn(4, 2, 3, 3) + 5.0)
    for norm, hr in zip(norms, hr_statistics):
        assert norm.running_mean is hr and torch.equal(hr, torch.zeros(2))  # HR ones untouched
        assert (norm.running_mean_lr > 0.1).all()  # the LR pass moved its own
    with pytest.raises(ValueError, match="needs BatchNorm with a momentum"):
        add_branch_statistics(nn.BatchNorm2d(2, momentum=None))


def test_branch_bn_keeps_one_set_of_statistics_per_branch_and_gives_the_student_lr_ones():
    torch.manual_seed(0)
    teacher = build_model(quickstart_cfg("teacher", "MODEL.MSAD.BRANCH_BN", True)).train()
    norms = teacher.branch_norms
    assert len(norms) == len(batch_norms(teacher.backbone))
    assert all(torch.equal(n.running_mean, n.running_mean_lr) for n in norms)
    with EventStorage(0):
        teacher(detector_inputs([(224, 224)]))
    stem = norms[0]
    hr_statistics = stem.running_mean
    # The HR pass updated the HR statistics, the LR pass the LR ones, each from its own input.
    assert not torch.allclose(stem.running_mean, stem.running_mean_lr)
    # At inference each branch reads its own statistics: changing the LR ones moves the LR
    # branch's features only.
    teacher.eval()
    images = teacher.preprocess_image(detector_inputs([(224, 224)], with_boxes=False))
    with torch.no_grad():
        hr, lr = teacher.extract(images).branch_levels
        for n in norms:
            n.running_mean_lr += 0.5
        hr2, lr2 = teacher.extract(images).branch_levels
    assert torch.equal(hr[0], hr2[0]) and not torch.allclose(lr[0], lr2[0])
    assert stem.running_mean is hr_statistics  # the LR pass puts each set back in place
    weights = teacher.weights_for_student()
    assert not any(k.endswith("_lr") for k in weights)
    assert torch.equal(weights["backbone.bottom_up.stem.conv1.norm.running_mean"],
                       stem.running_mean_lr)
    student = build_model(quickstart_cfg("student"))
    assert set(weights) >= set(student.state_dict())  # every tensor the student has is given
    with pytest.raises(ValueError, match="MODEL.MSAD.BRANCH_BN needs BatchNorm"):
        build_model(quickstart_cfg("teacher", "MODEL.MSAD.BRANCH_BN", True,
                                   "MODEL.RESNETS.NORM", "FrozenBN"))


def test_teacher_predicts_from_one_branch_on_request_and_logs_its_fusion_weights():
    torch.manual_seed(0)
    teacher = build_model(quickstart_cfg("teacher")).eval()
    batch = detector_inputs([(224, 224)], with_boxes=False)
    hr, lr = teacher.extract(teacher.preprocess_image(batch)).branch_levels
    for branch, levels in (("hr", hr), ("lr", lr)):
        teacher.test_branch = branch
        assert all(torch.equal(a, b) for a, b in zip(teacher.head_features([hr, lr]), levels))
    teacher.test_branch = "fused"
    fused = teacher.head_features([hr, lr])
    assert all(torch.equal(a, fuse(h, l)) for a, fuse, h, l in zip(fused, teacher.fusion, hr, lr))
    teacher.train()
    with EventStorage(0) as storage:
        teacher(detector_inputs([(224, 224)]))
        logged = storage.latest()
    assert sorted(logged)[:5] == [f"fusion_hr_weight/p{i}" for i in range(3, 8)]
    assert all(0 < logged[f"fusion_hr_weight/p{i}"][0] < 1 for i in range(3, 8))
    with pytest.raises(ValueError, match="MODEL.MSAD.TEST_BRANCH must be one of"):
        build_model(quickstart_cfg("teacher", "MODEL.MSAD.TEST_BRANCH", "both"))


def test_centerness_weighted_box_loss_is_the_official_one():
    from fvcore.nn import giou_loss

    torch.manual_seed(0)
    model = build_model(quickstart_cfg("hr_baseline", "MODEL.FCOS.BOX_LOSS_WEIGHTING", "centerness"))
    batch = detector_inputs([(224, 224), (192, 256)])
    with EventStorage(0):
        images = model.preprocess_image(batch)
        levels = model.extract(images).head_in
        anchors = model.anchor_generator(levels)
        gt_labels, gt_boxes = model.label_anchors(anchors, model.gt_instances(batch))
        outputs = model._transpose_dense_predictions(model.head(levels), [model.num_classes, 4, 1])
        official = model.losses(anchors, outputs[0], gt_labels, outputs[1], gt_boxes, outputs[2])
        model.box_loss_weighting = "uniform"
        uniform = model.losses(anchors, outputs[0], gt_labels, outputs[1], gt_boxes, outputs[2])
    labels = torch.stack(gt_labels)
    positive = (labels >= 0) & (labels != model.num_classes)
    weights = model.compute_ctrness_targets(anchors, gt_boxes)[positive]
    grid = torch.cat([a.tensor for a in anchors])
    boxes = torch.stack([model.box2box_transform.apply_deltas(d, grid)
                         for d in torch.cat(outputs[1], dim=1)])[positive]
    giou = giou_loss(boxes, torch.stack(gt_boxes)[positive], reduction="none")
    assert positive.sum() > 5 and weights.min() < 0.9 * weights.max()  # weights that differ
    assert official["loss_fcos_loc"].item() == pytest.approx(((giou * weights).sum() / weights.sum()).item())
    assert official["loss_fcos_loc"].item() != pytest.approx(uniform["loss_fcos_loc"].item())
    for key in ("loss_fcos_cls", "loss_fcos_ctr"):
        assert torch.equal(official[key], uniform[key])
    with pytest.raises(ValueError, match="MODEL.FCOS.BOX_LOSS_WEIGHTING must be one of"):
        build_model(quickstart_cfg("hr_baseline", "MODEL.FCOS.BOX_LOSS_WEIGHTING", "iou"))


def test_fusion_learning_rate_factor_scales_the_fusion_parameters_alone():
    from msad.engine.defaults import Trainer

    cfg = quickstart_cfg("teacher", "MODEL.MSAD.FUSION_LR_FACTOR", 0.1)
    teacher = build_model(cfg)
    fusion = {id(p) for p in teacher.fusion.parameters()}
    groups = Trainer.build_optimizer(cfg, teacher).param_groups
    for group in groups:
        in_fusion = {id(p) in fusion for p in group["params"]}
        assert len(in_fusion) == 1  # no group mixes fusion and other parameters
        expected = 0.1 * cfg.SOLVER.BASE_LR if in_fusion == {True} else cfg.SOLVER.BASE_LR
        assert group["lr"] == pytest.approx(expected)
    assert sum(len(g["params"]) for g in groups) == len(list(teacher.parameters()))
    assert any(id(p) in fusion for g in groups for p in g["params"])
    # factor 1 (the official code's single rate) leaves one rate for all parameters
    assert build_model(quickstart_cfg("teacher", "MODEL.MSAD.FUSION_LR_FACTOR", 1.0)).lr_factors == {}
