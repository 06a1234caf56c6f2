"""Bad input: each gives an error naming the file, key or value, a non-zero exit and nothing
overwritten, or is repaired and counted in the log."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from PIL import Image

from helpers import (QUICKSTART_TEACHER, RunsCode, detector_inputs, edit_json, quickstart_cfg,
                     small_dataset, torchvision_opts, train_net, train_net_here)
from msad.checkpoint.detection_checkpoint import SafeCheckpointer
from msad.data.coco import load_coco_checked
from msad.data.input_checks import BadImageError, CheckedDatasetMapper, check_training_records
from msad.engine.teacher import build_frozen_teacher

SHORT_RUN = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()",
             "DATALOADER.NUM_WORKERS", "0"]


def train_on(json_file, images, out, *opts, flags=(), script="train_net_T.py",
             config=QUICKSTART_TEACHER, run=train_net_here):
    """A short run on the one dataset `json_file`, `images`: in this process unless `run` is
    train_net (the script's own process)."""
    return run("--config-file", config, *flags, "DATASETS.COCO_INSTANCES",
                     f"[['bad_set', '{json_file}', '{images}']]", "DATASETS.TRAIN", "('bad_set',)",
                     *SHORT_RUN, *opts, "OUTPUT_DIR", out, script=script)


def failed_naming(proc, *names):
    """The process failed, and its last lines (the error) name every one of `names`."""
    tail = proc.stderr[-4000:]
    return proc.returncode != 0 and all(str(n) in tail for n in names)


# ---- dataset files ------------------------------------------------------------------------

def test_missing_dataset_json_is_named_before_anything_is_written(tmp_path):
    """As the script's process: its exit status and its last lines."""
    proc = train_on(tmp_path / "nope.json", tmp_path, tmp_path / "out", run=train_net)
    assert failed_naming(proc, "DATASETS.COCO_INSTANCES", tmp_path / "nope.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, error", [
    ('{"images": [{"id": 1, "file_name": "a.jpg"', "JSONDecodeError"),  # cut short
    ('{"annotations": [], "categories": [{"id": 1, "name": "a"}]}', "no 'images' list"),
])
def test_malformed_dataset_json_is_named(tmp_path, content, error):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=f"{bad}.*{error}"):
        load_coco_checked(str(bad), str(tmp_path), "bad_set")
    proc = train_on(bad, tmp_path, tmp_path / "out")
    assert failed_naming(proc, bad, "is not a COCO instances file")


# ---- image files --------------------------------------------------------------------------

def _break(images, kind):
    """Make 000001.jpg missing, truncated or not an image; return its path."""
    path = images / "000001.jpg"
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_text("this is not an image")
    return path


@pytest.mark.parametrize("kind", ["missing", "truncated", "not an image"])
def test_a_bad_image_stops_training_naming_the_file(tmp_path, kind):
    json_file, images = small_dataset(tmp_path, n=2)
    path = _break(images, kind)
    proc = train_on(json_file, images, tmp_path / "out")
    assert failed_naming(proc, path, "DATALOADER.BAD_IMAGES skip")
    assert not (tmp_path / "out" / "last_checkpoint").exists()


@pytest.mark.parametrize("kind", ["truncated", "not an image"])
def test_the_mapper_names_an_unreadable_image_and_can_skip_it(tmp_path, kind, cfg):
    json_file, images = small_dataset(tmp_path, n=1)
    path = _break(images, kind)
    record = load_coco_checked(str(json_file), str(images), "one")[0]
    with pytest.raises(BadImageError, match=str(path)):
        CheckedDatasetMapper(cfg, is_train=True)(dict(record))
    with pytest.raises(BadImageError, match=str(path)):  # evaluation never skips
        CheckedDatasetMapper(cfg, is_train=False)(dict(record))
    cfg.DATALOADER.BAD_IMAGES = "skip"
    mapper = CheckedDatasetMapper(cfg, is_train=True)
    assert mapper(dict(record)) is None and mapper(dict(record)) is None
    assert mapper.skipped == {str(path)}  # counted once


def test_grayscale_palette_and_rgba_images_are_converted(tmp_path, cfg):
    json_file, images = small_dataset(tmp_path, n=3)
    records = load_coco_checked(str(json_file), str(images), "modes")
    for record, mode in zip(records, ["L", "P", "RGBA"]):
        png = os.path.splitext(record["file_name"])[0] + ".png"
        Image.open(record["file_name"]).convert(mode).save(png)
        record["file_name"] = png
        image = CheckedDatasetMapper(cfg, is_train=True)(dict(record))["image"]
        assert image.shape[0] == 3 and image.shape[1:] == (record["height"], record["width"])


def test_bad_images_can_be_skipped_and_are_counted(tmp_path):
    """Missing, truncated and non-image files, grayscale and RGBA images, bad boxes and an image
    without boxes, all in one set: with DATALOADER.BAD_IMAGES skip, training runs to the end."""
    json_file, images = small_dataset(tmp_path, n=8)
    _break(images, "truncated")
    (images / "000002.jpg").unlink()
    (images / "000003.jpg").write_text("not an image")
    for name, mode in (("000004.jpg", "L"), ("000005.jpg", "RGBA")):
        Image.open(images / name).convert(mode).save(images / name.replace(".jpg", ".png"))

    def edit(coco):
        for im in coco["images"]:
            if im["id"] in (4, 5):
                im["file_name"] = im["file_name"].replace(".jpg", ".png")
        boxes = [a for a in coco["annotations"] if a["image_id"] == 6]
        boxes[0]["bbox"] = [10, 10, 0, 5]  # zero width
        boxes[1]["bbox"] = [30, 30, -8, 10]  # negative width
        boxes[2]["bbox"] = [-20, 5, 60, 40]  # partly outside: clipped
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 7]

    edit_json(json_file, edit)
    proc = train_on(json_file, images, tmp_path / "out", "DATALOADER.BAD_IMAGES", "skip",
                    "SOLVER.MAX_ITER", "8", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
                    "INPUT.RANDOM_FLIP", "none", run=train_net)  # its log, as printed
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Skipping 1 training images whose files do not exist" in log and "000002.jpg" in log
    assert "Dropped 2 boxes of zero or negative size" in log
    assert "Clipped 1 boxes that extend outside their image" in log
    for name in ("000001.jpg", "000003.jpg"):
        assert f"cannot use image {images / name}" in log
    assert "bad images skipped by this data-loader worker" in log
    assert (tmp_path / "out" / "model_final.pth").exists()


def test_boxes_are_clipped_or_dropped_and_counted(caplog):
    record = {"file_name": __file__, "height": 50, "width": 80, "annotations": [
        {"bbox": [10, 10, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},  # fine
        {"bbox": [70, 40, 30, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},  # clipped
        {"bbox": [5, 5, 0, 9], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},  # zero width
        {"bbox": [30, 30, 20, 20], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # zero size
        {"bbox": [40, 40, 30, 25], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # negative
        {"bbox": [90, 60, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},  # outside
        {"bbox": [float("nan"), 1, 2, 2], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
    ]}
    (checked,) = check_training_records([record])
    assert [a["bbox"] for a in checked["annotations"]] == [[10, 10, 20, 20], [70, 40, 80, 50]]
    assert len(record["annotations"]) == 7  # the input is left as it was
    assert "Clipped 1 boxes" in caplog.text and "Dropped 5 boxes" in caplog.text


def test_records_without_a_size_are_checked_against_the_image_header(tmp_path, caplog):
    json_file, images = small_dataset(tmp_path, n=1)
    record = load_coco_checked(str(json_file), str(images), "sizeless")[0]
    height, width = record.pop("height"), record.pop("width")
    record["annotations"] = [
        {"bbox": [width - 5, 0, 20, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0},
        {"bbox": [float("nan"), 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]
    (checked,) = check_training_records([record])
    assert [a["bbox"] for a in checked["annotations"]] == [[width - 5, 0, width, 10]]
    assert "Clipped 1 boxes" in caplog.text and "Dropped 1 boxes" in caplog.text


def test_a_machine_error_is_not_taken_for_a_bad_image(tmp_path, cfg, monkeypatch):
    """Too many open files, I/O errors: raised as they are, never skipped as a bad image."""
    import errno

    import detectron2.data.dataset_mapper as dataset_mapper

    json_file, images = small_dataset(tmp_path, n=1)
    record = load_coco_checked(str(json_file), str(images), "machine")[0]

    def no_more_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(dataset_mapper.utils, "read_image", no_more_files)
    cfg.DATALOADER.BAD_IMAGES = "skip"
    with pytest.raises(OSError, match="Too many open files") as raised:
        CheckedDatasetMapper(cfg, is_train=True)(dict(record))
    assert not isinstance(raised.value, BadImageError)


# ---- image sizes, images without boxes -----------------------------------------------------

def _student_cfg(teachers):
    return quickstart_cfg("student", "MODEL.TEACHER.WEIGHTS", str(teachers / "teacher.pth"))


def _thumbdet_cfg(teachers):
    return quickstart_cfg("thumbdet_4x", "MODEL.TEACHER.WEIGHTS",
                          str(teachers / "hr_baseline.pth"), "MODEL.THUMBDET.WARMUP_ITERS", 0)


@pytest.mark.parametrize("make_cfg", [lambda t: quickstart_cfg("teacher"), _student_cfg, _thumbdet_cfg],
                         ids=["teacher", "student", "thumbdet_4x"])
def test_tiny_odd_sized_and_empty_images_train_and_predict(make_cfg, untrained_teachers):
    """Smaller than the largest stride (128), sizes not multiples of 2, 4 or 64, and an image
    with no boxes: the losses are finite and every prediction lies in its image's own pixels."""
    cfg = make_cfg(untrained_teachers)
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    if cfg.MODEL.TEACHER.CONFIG_FILE:
        model.attach_teacher(build_frozen_teacher(cfg))
    sizes = [(21, 35), (97, 131), (250, 9 * 4 + 3)]
    batch = detector_inputs(sizes)
    batch[2]["instances"] = batch[2]["instances"][:0]  # no boxes
    with EventStorage(0):
        losses = model.train()(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    torch.nn.init.constant_(model.head.bbox_pred.bias, 1.0)  # untrained boxes: one stride wide
    with torch.no_grad():
        out = model.eval()(detector_inputs(sizes, with_boxes=False))
    for o, (h, w) in zip(out, sizes):
        inst = o["instances"]
        assert inst.image_size == (h, w) and len(inst) > 0
        boxes = inst.pred_boxes.tensor
        assert boxes.min() >= 0 and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_odd_sizes_keep_the_hr_lr_alignment_exact(cfg):
    teacher = build_model(cfg).eval()
    images = teacher.preprocess_image(detector_inputs([(97, 131), (21, 250)], with_boxes=False))
    assert images.tensor.shape[-2:] == (128, 256)  # P7 of the full image: stride 128
    with torch.no_grad():
        hr, lr = teacher.extract(images).branch_levels
    assert [f.shape[-2:] for f in hr] == [f.shape[-2:] for f in lr]


# ---- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("opts, message", [
    (["MODEL.SLIMMABLE.WIDTH", "0.6"], "MODEL.SLIMMABLE.WIDTH=0.6 is not one of"),
    (["DATALOADER.BAD_IMAGES", "ignore"], "DATALOADER.BAD_IMAGES='ignore'"),
    (["MODEL.WEIGHTS", "no/such/model.pth"], "MODEL.WEIGHTS: no such file no/such/model.pth"),
    ([*torchvision_opts("mobilenet_v2"), "MODEL.TORCHVISION.PRETRAINED", "no/mnv2.pth"],
     "MODEL.TORCHVISION.PRETRAINED: no such file no/mnv2.pth"),
])
def test_bad_config_values_are_named_before_anything_is_written(tmp_path, opts, message):
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, *opts, "OUTPUT_DIR", tmp_path / "out")
    assert failed_naming(proc, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opts, message", [
    (["MODEL.FCOS.SIZE_DIVISIBILITY", 96], "MODEL.FCOS.SIZE_DIVISIBILITY=96 must be a multiple of 128"),
    (["MODEL.FCOS.INPUT_FACTOR", 3], "MODEL.FCOS.INPUT_FACTOR must be a power of two >= 1, got 3"),
])
def test_bad_input_scale_values_are_named_before_training(tmp_path, opts, message):
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, *opts, "OUTPUT_DIR", tmp_path / "out")
    assert failed_naming(proc, message)
    assert not list((tmp_path / "out").glob("*.pth"))


def test_an_output_dir_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, "OUTPUT_DIR", blocker / "out")
    assert failed_naming(proc, f"OUTPUT_DIR={blocker / 'out'} is not a writable directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_a_read_only_output_dir_is_named(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, "OUTPUT_DIR", read_only)
    assert failed_naming(proc, f"OUTPUT_DIR={read_only} is not a writable directory")


def test_a_fresh_run_into_an_earlier_runs_directory_is_refused(tmp_path, untrained_teachers):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(untrained_teachers / "teacher.pth", out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, "OUTPUT_DIR", out)
    assert failed_naming(proc, f"OUTPUT_DIR={out} holds the checkpoints of an earlier run", "--resume")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_resumed_run_that_meets_a_bad_image_leaves_its_checkpoints_alone(tmp_path):
    json_file, images = small_dataset(tmp_path, n=2)
    out = tmp_path / "run"
    first = train_on(json_file, images, out)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = {p.name: p.read_bytes() for p in out.glob("*.pth")} | {
        "last_checkpoint": (out / "last_checkpoint").read_bytes()}
    path = _break(images, "not an image")
    resumed = train_on(json_file, images, out, "SOLVER.MAX_ITER", "4", flags=["--resume"])
    assert failed_naming(resumed, path)
    assert {p.name: p.read_bytes() for p in out.glob("*.pth")} | {
        "last_checkpoint": (out / "last_checkpoint").read_bytes()} == checkpoints


# ---- checkpoints --------------------------------------------------------------------------

def test_a_checkpoint_of_another_width_is_refused_for_model_weights(tmp_path):
    wide = build_model(quickstart_cfg("teacher", "MODEL.SLIMMABLE.WIDTH", 0.5))
    SafeCheckpointer(wide, str(tmp_path)).save("wide")
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, "--eval-only",
                     "MODEL.WEIGHTS", tmp_path / "wide.pth", "OUTPUT_DIR", tmp_path / "eval")
    assert failed_naming(proc, f"MODEL.WEIGHTS: {tmp_path / 'wide.pth'} does not fit this model",
                         "tensors of another shape")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save({"model": {"features.0.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}},
               tmp_path / "other.pth")
    model = build_model(quickstart_cfg("teacher"))
    with pytest.raises(ValueError, match=r"other\.pth is a checkpoint of another architecture"):
        SafeCheckpointer(model).load(str(tmp_path / "other.pth"))


def test_another_number_of_classes_only_leaves_the_classifier_untrained(tmp_path):
    five = build_model(quickstart_cfg("teacher"))
    SafeCheckpointer(five, str(tmp_path)).save("five")
    three = build_model(quickstart_cfg("teacher", "MODEL.FCOS.NUM_CLASSES", 3))
    untrained = three.head.cls_score.weight.clone()
    SafeCheckpointer(three).load(str(tmp_path / "five.pth"))  # fine-tuning: no error
    assert torch.equal(three.head.cls_score.weight, untrained)
    assert torch.equal(three.backbone.bottom_up.stem.conv1.weight,
                       five.backbone.bottom_up.stem.conv1.weight)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_model_weights_that_would_run_code_are_refused(tmp_path, suffix):
    payload = RunsCode()
    payload.marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": payload}, "__author__": "x"}, f)
    proc = train_net_here("--config-file", QUICKSTART_TEACHER, "--eval-only", "MODEL.WEIGHTS", path,
                     "OUTPUT_DIR", tmp_path / "eval")
    assert failed_naming(proc, f"MODEL.WEIGHTS: cannot load {path} as a weights-only checkpoint")
    assert not payload.marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_pkl_weights_of_numpy_arrays_still_load(tmp_path, protocol):
    model = build_model(quickstart_cfg("teacher"))
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    arrays["head.cls_score.bias"] = np.full(5, 0.5, np.float32)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": arrays, "__author__": "test"}, f, protocol=protocol)
    SafeCheckpointer(model).load(str(tmp_path / "zoo.pkl"))
    assert torch.equal(model.head.cls_score.bias, torch.full((5,), 0.5))
