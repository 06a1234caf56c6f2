"""Backbones in torchvision's layout: torchvision's ImageNet files load as torchvision writes them,
the stages compute what torchvision's own model computes, refusals name what is wrong, and every
msad detector trains on them."""
import logging

import pytest
import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import detector_inputs, quickstart_cfg, torchvision_opts
from msad.modeling.torchvision_backbone import (build_torchvision_fpn_backbone,
                                                torchvision_resnet_key)


def imagenet_file(arch, path, seed=0):
    """torchvision's `arch` saved as torchvision saves its ImageNet files (a bare state_dict,
    num_batches_tracked included), with every parameter and BatchNorm statistic random, so that a
    tensor loaded into the wrong place changes the outputs."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_(0.0, 0.1 if tensor.dim() > 1 else 0.5)
    torch.save(model.state_dict(), path)
    return model.eval()


def backbone(arch, pretrained="", norm="FrozenBN", freeze_at=0, in_features=None):
    cfg = quickstart_cfg("teacher", *torchvision_opts(arch, norm),
                         "MODEL.TORCHVISION.PRETRAINED", str(pretrained),
                         "MODEL.BACKBONE.FREEZE_AT", freeze_at)
    if in_features:
        cfg.MODEL.FPN.IN_FEATURES = in_features
    return build_torchvision_fpn_backbone(cfg, ShapeSpec(channels=3))


def test_torchvision_resnet_names_map_to_detectron2_s():
    assert torchvision_resnet_key("conv1.weight") == "stem.conv1.weight"
    assert torchvision_resnet_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert torchvision_resnet_key("layer1.0.conv3.weight") == "res2.0.conv3.weight"
    assert torchvision_resnet_key("layer3.5.bn2.bias") == "res4.5.conv2.norm.bias"
    assert torchvision_resnet_key("layer4.0.downsample.0.weight") == "res5.0.shortcut.weight"
    assert torchvision_resnet_key("layer2.0.downsample.1.running_mean") == \
        "res3.0.shortcut.norm.running_mean"
    assert torchvision_resnet_key("fc.weight") is None
    with pytest.raises(KeyError, match="features.0.0.weight"):
        torchvision_resnet_key("features.0.0.weight")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_stages_compute_what_torchvision_computes(arch, norm, tmp_path, caplog):
    path = tmp_path / f"{arch}.pth"
    reference = imagenet_file(arch, path)
    with caplog.at_level(logging.INFO, logger="msad.modeling.torchvision_backbone"):
        bottom_up = backbone(arch, path, norm).bottom_up.eval()
    classifier = "fc.bias, fc.weight" if arch != "mobilenet_v2" else \
        "classifier.1.bias, classifier.1.weight"
    assert f"left out: {classifier} (the ImageNet classifier)" in caplog.text
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        if arch == "mobilenet_v2":
            stem, want_stem = bottom_up.features[:2](x), reference.features[:2](x)
            want_first, want_last = reference.features[:4](x), reference.features(x)
        else:
            r = reference
            stem = bottom_up.stem(x)
            want_stem = r.maxpool(r.relu(r.bn1(r.conv1(x))))
            want_first = r.layer1(want_stem)
            want_last = r.layer4(r.layer3(r.layer2(want_first)))
        outputs = bottom_up(x)
    torch.testing.assert_close(stem, want_stem, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs["res2"], want_first, rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs["res5"], want_last, rtol=0, atol=1e-5)
    assert {k: v.stride for k, v in bottom_up.output_shape().items()} == \
        {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@pytest.mark.parametrize("arch", ["resnet34", "resnet101"])
def test_deeper_and_basic_block_resnets_load_every_tensor(arch, tmp_path):
    path = tmp_path / f"{arch}.pth"
    reference = imagenet_file(arch, path)
    bottom_up = backbone(arch, path).bottom_up
    ours = bottom_up.state_dict()
    for key, tensor in reference.state_dict().items():
        name = torchvision_resnet_key(key)
        if name is not None and not key.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], tensor), key


def test_a_file_of_another_architecture_is_refused_naming_expected_and_found_keys(tmp_path):
    imagenet_file("mobilenet_v2", tmp_path / "mnv2.pth")
    with pytest.raises(ValueError) as error:
        backbone("resnet50", tmp_path / "mnv2.pth")
    message = str(error.value)
    assert "mnv2.pth does not hold torchvision's resnet50 (MODEL.TORCHVISION.ARCH)" in message
    assert "'conv1.weight'" in message and "'features.0.0.weight'" in message
    imagenet_file("resnet18", tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"keys resnet34 expects are missing \['layer1.2.conv1"):
        backbone("resnet34", tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"of another shape \['layer1.0.conv1.weight: file "
                                         r"\(64, 64, 3, 3\), resnet50 \(64, 64, 1, 1\)"):
        backbone("resnet50", tmp_path / "r18.pth")


def test_bad_settings_are_refused_with_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.TORCHVISION.PRETRAINED: no such file"):
        backbone("mobilenet_v2", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="MODEL.TORCHVISION.ARCH='vgg16' is not one of"):
        backbone("vgg16")
    with pytest.raises(ValueError, match="MODEL.TORCHVISION.NORM='GN': MobileNetV2 takes one of"):
        backbone("mobilenet_v2", norm="GN")
    with pytest.raises(ValueError, match=r"MobileNetV2 has no stage \['res6'\]"):
        backbone("mobilenet_v2", in_features=["res4", "res6"])
    (tmp_path / "code.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot load .*code.pth as a weights-only"):
        backbone("resnet18", tmp_path / "code.pth")


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_freeze_at_freezes_the_stem_and_stages_below_it(arch):
    bottom_up = backbone(arch, norm="BN", freeze_at=2).bottom_up
    if arch == "mobilenet_v2":
        frozen, trained = bottom_up.features[:4], bottom_up.features[4:]
    else:
        frozen = torch.nn.ModuleList([bottom_up.stem, bottom_up.res2])
        trained = torch.nn.ModuleList([bottom_up.res3, bottom_up.res4, bottom_up.res5])
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in trained.modules())


@pytest.fixture(scope="module")
def trained_teachers(tmp_path_factory):
    """Each backbone's randomly initialised quickstart teacher and HR FCOS, saved with the
    config.yaml a run writes beside its weights (which a student then builds its teacher from)."""
    root = tmp_path_factory.mktemp("torchvision_teachers")
    for arch in ("mobilenet_v2", "resnet18"):
        for name in ("teacher", "hr_baseline"):
            torch.manual_seed(0)
            cfg = quickstart_cfg(name, *torchvision_opts(arch, "BN"))
            folder = root / arch / name
            folder.mkdir(parents=True)
            torch.save({"model": build_model(cfg).state_dict()}, folder / "model_final.pth")
            (folder / "config.yaml").write_text(cfg.dump())
    return root


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("name", ["hr_baseline", "lr_baseline", "teacher", "student",
                                  "student_light", "bicubic_4x", "thumbdet_4x"])
def test_every_detector_trains_a_step_on_the_backbone(arch, name, trained_teachers):
    from msad.engine.teacher import build_frozen_teacher
    from msad.modeling.distill import DistilledDetector

    teacher = "hr_baseline" if name == "thumbdet_4x" else "teacher"
    cfg = quickstart_cfg(name, *torchvision_opts(arch, "BN"), "MODEL.TEACHER.WEIGHTS",
                         str(trained_teachers / arch / teacher / "model_final.pth"))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert type(model.backbone.bottom_up).__name__ == \
        ("MobileNetV2Backbone" if arch == "mobilenet_v2" else "ResNet")
    if isinstance(model, DistilledDetector):
        model.attach_teacher(build_frozen_teacher(cfg))
        model.init_from_teacher()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with EventStorage(0):
        losses = model(detector_inputs([(128, 128), (112, 96)]))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert ("loss_distill" in losses) == (name == "student" or name == "student_light")
    sum(losses.values()).backward()
    unused = [n for n, p in trained if p.grad is None]
    assert not unused, f"parameters without a gradient: {unused[:5]}"
    model.eval()
    with torch.no_grad():
        (result,) = model(detector_inputs([(120, 100)], with_boxes=False))
    assert result["instances"].image_size == (120, 100)


def test_a_student_distills_from_a_teacher_on_another_backbone_but_cannot_start_from_it(
        trained_teachers):
    """A MobileNetV2 student learns from a ResNet-18 teacher's aligned FPN levels (same FPN
    width); copying the teacher's weights into it is refused, naming the keys to match."""
    from msad.engine.teacher import build_frozen_teacher

    cfg = quickstart_cfg("student", *torchvision_opts("mobilenet_v2"), "MODEL.TEACHER.WEIGHTS",
                         str(trained_teachers / "resnet18" / "teacher" / "model_final.pth"))
    student = build_model(cfg).train()
    student.attach_teacher(build_frozen_teacher(cfg))
    assert type(student.teacher.backbone.bottom_up).__name__ == "ResNet"
    with pytest.raises(ValueError, match=r"of another shape.*MODEL.TORCHVISION.ARCH"):
        student.init_from_teacher()
    with EventStorage(0):
        losses = student(detector_inputs([(128, 128)]))
    assert losses["loss_distill"] > 0
