"""ThumbDet: down-sampler sizes, statistics loss, KD and mimic losses, phases, frozen teacher."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import detector_inputs, quickstart_cfg
from msad.engine.teacher import build_frozen_teacher
from msad.modeling.resample import downsample
from msad.modeling.thumbdet import (CONSTANT_CHANNEL_STD, LearnedDownsampler, detection_phase,
                                    feature_mimic, image_statistics_loss, sigmoid_kd)


def thumbdet_cfg(weights, *opts):
    return quickstart_cfg("thumbdet_4x", "MODEL.TEACHER.WEIGHTS", str(weights), *opts)


def thumbdet_with_teacher(cfg):
    model = build_model(cfg)
    model.attach_teacher(build_frozen_teacher(cfg))
    return model


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("size", [(64, 64), (65, 67), (97, 130), (1, 3)])
def test_thumbnail_size_is_exact(factor, size):
    out = LearnedDownsampler(factor)(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, math.ceil(size[0] / factor), math.ceil(size[1] / factor))


@pytest.mark.parametrize("factor", [2, 4])
def test_learned_thumbnail_starts_as_the_bicubic_one(factor):
    batch = torch.rand(2, 3, 256, 512)
    torch.testing.assert_close(LearnedDownsampler(factor)(batch),
                               downsample(batch, factor, "bicubic"), rtol=0, atol=0)


@pytest.mark.parametrize("factor", [2, 4])
def test_every_thumbnail_pixel_keeps_its_gradient_whatever_the_weights(factor):
    """The paper's output ReLU passes no gradient once its input is negative everywhere; the
    residual always does, and with every hidden unit dead the thumbnail is the bicubic one."""
    downsampler = LearnedDownsampler(factor)
    with torch.no_grad():
        downsampler.conv1.weight.fill_(-5.0)  # every hidden ReLU dead
        downsampler.conv2.weight.normal_(-3.0, 1.0)
    image = torch.rand(1, 3, 64, 64, requires_grad=True)
    thumb = downsampler(image)
    torch.testing.assert_close(thumb, downsample(image, factor, "bicubic"))
    for c in range(3):
        for i, j in [(0, 0), (5, 7), (thumb.shape[2] - 1, thumb.shape[3] - 1)]:
            (grad,) = torch.autograd.grad(thumb[0, c, i, j], image, retain_graph=True)
            assert grad[0, c].abs().sum() > 0, (c, i, j)
    with torch.no_grad():
        downsampler.conv1.weight.normal_(0.0, 1.0)  # hidden units alive: the correction learns
    thumb = downsampler(image)
    (grad,) = torch.autograd.grad((thumb ** 2).sum(), downsampler.conv2.weight)
    assert grad.abs().sum() > 0


def test_the_correction_keeps_each_images_channel_means_and_spares_the_padding():
    downsampler = LearnedDownsampler(4)
    with torch.no_grad():
        downsampler.conv2.weight.normal_(-1.0, 1.0)  # a large correction, mostly negative
    batch = torch.full((2, 3, 64, 96), 0.5)
    batch[0, :, :40, :50] = torch.rand(3, 40, 50)
    batch[1, :, :64, :81] = torch.rand(3, 64, 81)
    sizes = [(40, 50), (64, 81)]
    thumb, bicubic = downsampler(batch, sizes), downsample(batch, 4, "bicubic")
    assert (thumb - bicubic).abs().max() > 0.5  # it does correct
    for i, (h, w) in enumerate(sizes):
        inside = (slice(None), slice(0, math.ceil(h / 4)), slice(0, math.ceil(w / 4)))
        torch.testing.assert_close(thumb[i][inside].mean(dim=(1, 2)),
                                   bicubic[i][inside].mean(dim=(1, 2)))
        outside = torch.ones_like(thumb[i], dtype=torch.bool)
        outside[inside] = False
        assert torch.equal(thumb[i][outside], bicubic[i][outside])


def test_a_constant_thumbnail_channel_is_warned_with_its_iteration(untrained_teachers, caplog):
    model = thumbdet_with_teacher(thumbdet_cfg(untrained_teachers / "hr_baseline.pth")).train()
    batch = detector_inputs([(200, 240), (256, 190)])
    with EventStorage(7) as storage:
        model(batch)
    assert model.constant_thumbnail_channels == []
    assert storage.history("thumbnail_min_channel_std").latest() > 0.05
    real = model.downsampler.forward

    def green_dies(*args):
        # As it would with this down-sampler: flat within each image, at each image's own mean.
        out = real(*args)
        green = out[:, 1:2].mean(dim=(2, 3), keepdim=True).expand_as(out[:, 1:2])
        return torch.cat([out[:, :1], green, out[:, 2:]], dim=1)

    model.downsampler.forward = green_dies
    with caplog.at_level("WARNING", logger="msad.modeling.thumbdet"), EventStorage(123):
        model(batch)
        model(batch)  # still dead: warned once, not at every step
    warnings = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert len(warnings) == 1 and "channel(s) [1] constant at iteration 123" in warnings[0]
    assert model.constant_thumbnail_channels == [1]


def test_unknown_factor_is_named():
    with pytest.raises(ValueError, match="FACTOR must be one of \\(2, 4\\), got 3"):
        LearnedDownsampler(3)
    with pytest.raises(ValueError, match="got 8"):
        build_model(quickstart_cfg("thumbdet_4x", "MODEL.FCOS.INPUT_FACTOR", 8))


def test_statistics_loss_matches_a_hand_computation():
    source = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]],
                           [[0.2, 0.2], [0.2, 0.2]]])
    thumb = torch.tensor([[[0.5]], [[0.3]], [[0.2]]])
    # Means: source (0.5, 0.5, 0.2), thumb (0.5, 0.3, 0.2): MSE = 0.04 / 3.
    # Variances: source (0.25, 0, 0), thumb (0, 0, 0): MSE = 0.0625 / 3, weighted 0.1.
    loss = image_statistics_loss([source], [thumb], var_weight=0.1)
    assert loss.item() == pytest.approx(0.04 / 3 + 0.1 * 0.0625 / 3)


def test_statistics_loss_is_zero_for_a_constant_image_and_thumbnail():
    image = torch.full((3, 20, 24), 0.37)
    assert image_statistics_loss([image], [image[:, :5, :6]]).item() < 1e-12  # float rounding


def test_kd_and_mimic_are_zero_only_for_identical_outputs():
    a, b = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    assert sigmoid_kd(a, a.clone(), 2.0).abs().item() < 1e-6
    assert sigmoid_kd(a, b, 2.0).item() > 0
    # x T^2, as the official code does not:
    assert sigmoid_kd(a, b, 2.0).item() == pytest.approx(4 * sigmoid_kd(a, b, 2.0, False).item())
    assert feature_mimic([a], [a.clone()]).item() == 0.0
    assert feature_mimic([a], [b]).item() > 0
    small = torch.randn(2, 5, 2, 2)
    assert feature_mimic([a], [small], "resize").item() > 0


@pytest.mark.parametrize("iteration,phase", [(0, 0.0), (99, 0.0), (100, 1.0), (5000, 1.0)])
def test_detection_phase_switches_after_warmup(iteration, phase):
    assert detection_phase(iteration, 100) == phase


def test_only_the_statistics_loss_trains_during_warmup(untrained_teachers):
    model = thumbdet_with_teacher(thumbdet_cfg(untrained_teachers / "hr_baseline.pth")).train()
    batch = detector_inputs([(200, 240), (256, 190)])
    model.detection_phase = 0.0
    with EventStorage(0):
        warm = model(batch)
    assert warm["loss_image_stats"].item() > 0
    assert all(v.item() == 0 for k, v in warm.items() if k != "loss_image_stats")
    sum(warm.values()).backward()  # every parameter is in the graph: DDP needs no flag
    assert all(p.grad is not None for p in model.parameters())
    model.detection_phase = 1.0
    with EventStorage(1):
        trained = model(batch)
    assert set(trained) == set(warm)
    assert all(v.item() > 0 for v in trained.values())


def test_teacher_is_frozen_and_unused_at_inference(untrained_teachers):
    model = thumbdet_with_teacher(thumbdet_cfg(untrained_teachers / "hr_baseline.pth"))
    teacher = model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any("teacher" in k for k in model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with EventStorage(0):
        loss = sum(model.train()(detector_inputs([(224, 224)])).values())
    loss.backward()
    opt.step()
    assert not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran at inference")

    teacher.forward = teacher.extract = teacher.preprocess_image = boom
    with torch.no_grad():
        out = model.eval()(detector_inputs([(201, 199), (256, 256), (96, 130)], with_boxes=False))
    assert [o["instances"].image_size for o in out] == [(201, 199), (256, 256), (96, 130)]


def test_a_teacher_whose_levels_cannot_align_is_refused(untrained_teachers):
    model = build_model(thumbdet_cfg(untrained_teachers / "hr_baseline.pth", "MODEL.FCOS.IN_FEATURES", ["p5", "p6"],
                                     "MODEL.FPN.IN_FEATURES", ["res5"]))
    teacher = build_model(quickstart_cfg("hr_baseline", "MODEL.FCOS.IN_FEATURES",
                                         ["p3", "p4", "p5", "p6"], "MODEL.FPN.NUM_TOP_LEVELS", 1))
    with pytest.raises(ValueError, match=r"no level of the student aligns.*p7.*p8"):
        model.attach_teacher(teacher)


def test_images_smaller_than_the_factor_are_refused(untrained_teachers):
    model = build_model(thumbdet_cfg(untrained_teachers / "hr_baseline.pth")).eval()
    with pytest.raises(ValueError, match="3x50 image is smaller than MODEL.FCOS.INPUT_FACTOR=4"):
        model(detector_inputs([(3, 50)], with_boxes=False))


def test_bicubic_baseline_is_the_single_scale_fcos_on_the_bicubic_thumbnail():
    model = build_model(quickstart_cfg("bicubic_4x")).train()
    assert type(model).__name__ == "SingleScaleFCOS" and not hasattr(model, "downsampler")
    batch = detector_inputs([(200, 240)])
    images = model.preprocess_image(batch)
    torch.testing.assert_close(model.extract(images).inputs[0],
                               downsample(images.tensor, 4, "bicubic"), rtol=0, atol=0)
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}


def test_thumbnail_picture_shows_three_equal_panels(untrained_teachers, tmp_path):
    from msad.benchmark.pictures import write_comparisons

    import cv2
    from detectron2.data import DatasetCatalog

    model = build_model(thumbdet_cfg(untrained_teachers / "hr_baseline.pth")).eval()
    dicts = DatasetCatalog.get("msad_synth_val")[:1]
    [(path, contrast)] = write_comparisons(model, dicts, str(tmp_path))
    assert 0.8 < contrast["bicubic"] < 1.0  # bicubic blurs a little
    assert contrast["learned"] == pytest.approx(contrast["bicubic"])  # untrained: no correction
    picture = cv2.imread(path)
    h, w = dicts[0]["height"], dicts[0]["width"]
    assert picture.shape == (28 + 2 * h, 3 * 2 * w, 3)
    assert os.path.basename(path) == f"thumbnails_{dicts[0]['image_id']}.png"


def train_thumbdet(teacher_weights, out, seed, pushed_weights=None):
    """The quickstart ThumbDet 4x, 30 iterations (warm-up 10), through train_net_S.py's trainer."""
    from detectron2.utils.env import seed_all_rng
    from msad.engine.defaults import DistillationTrainer

    cfg = thumbdet_cfg(teacher_weights, "SEED", seed, "SOLVER.MAX_ITER", 30,
                       "MODEL.THUMBDET.WARMUP_ITERS", 10, "DATASETS.TEST", "()",
                       "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(out))
    cfg.freeze()
    seed_all_rng(seed)  # as default_setup does in train_net_S.py
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    if pushed_weights is not None:
        trainer.model.downsampler.load_state_dict(pushed_weights)
    trainer.train()
    return trainer


def thumbnail_statistics(cfg, model, dataset_dicts):
    """Per image: (image channel means, thumbnail channel means, thumbnail channel stds)."""
    from detectron2.data.detection_utils import read_image

    out = []
    model.eval()
    with torch.no_grad():
        for d in dataset_dicts:
            image = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
            tensor = torch.as_tensor(image.transpose(2, 0, 1).copy(), dtype=torch.float32)
            images = model.preprocess_image([{"image": tensor}])
            unit = model.unit_range(images.tensor)
            h, w = d["height"], d["width"]
            thumb = model.thumbnail(images)[0, :, :math.ceil(h / 4), :math.ceil(w / 4)].flatten(1)
            out.append((unit[0, :, :h, :w].flatten(1).mean(1), thumb.mean(1), thumb.std(1)))
    return out


@pytest.fixture(scope="module")
def briefly_trained_hr_fcos(tmp_path_factory):
    """The quickstart HR FCOS after 40 iterations: a teacher whose BatchNorm statistics are
    those of real features (a random one's make its features, and the mimic loss, explode)."""
    from detectron2.utils.env import seed_all_rng
    from msad.engine.defaults import Trainer

    out = tmp_path_factory.mktemp("hr40")
    cfg = quickstart_cfg("hr_baseline", "SOLVER.MAX_ITER", 40, "DATASETS.TEST", "()",
                         "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(out))
    cfg.freeze()
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return str(out / "model_final.pth")


@pytest.mark.slow
def test_learned_thumbnail_stays_an_image_over_seeds_and_from_pushed_weights(
        briefly_trained_hr_fcos, tmp_path):
    from detectron2.data import DatasetCatalog

    val = DatasetCatalog.get("msad_synth_val")[:4]
    teacher = briefly_trained_hr_fcos
    dark = LearnedDownsampler(4)
    with torch.no_grad():  # what killed the paper's ReLU output: a correction far below zero
        dark.conv1.weight.uniform_(0.0, 0.5)
        dark.conv2.weight.fill_(-0.5)
    runs = [(seed, None) for seed in range(5)] + [(0, dark.state_dict())]
    for seed, pushed in runs:
        trainer = train_thumbdet(teacher, tmp_path / f"{seed}-{pushed is None}", seed, pushed)
        spreads = trainer.storage.history("thumbnail_min_channel_std").values()
        assert len(spreads) == 30 and min(v for v, _ in spreads) > CONSTANT_CHANNEL_STD
        assert trainer.model.constant_thumbnail_channels == []
        statistics = thumbnail_statistics(trainer.cfg, trainer.model, val)
        for image_mean, thumb_mean, thumb_std in statistics:
            assert (thumb_std > 10 * CONSTANT_CHANNEL_STD).all(), (seed, thumb_std)
            assert (thumb_mean - image_mean).abs().max() < 0.1, (seed, thumb_mean, image_mean)
