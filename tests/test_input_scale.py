"""Low-resolution input: a detector trained at factor f given an image that is already 1/f."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import REPO, detector_inputs, quickstart_cfg, small_dataset
from msad.data.input_checks import CheckedDatasetMapper


@pytest.mark.parametrize("name", ["student", "lr_baseline"])
def test_low_resolution_input_gives_the_detections_of_the_full_image(name):
    """The nearest-trained detector on an image and on its nearest-decimated copy given as
    low-resolution input: the same detections, boxes scaled by the factor (odd sizes too)."""
    torch.manual_seed(0)
    full = build_model(quickstart_cfg(name, "MODEL.FCOS.SCORE_THRESH_TEST", 0.0)).eval()
    torch.nn.init.constant_(full.head.bbox_pred.bias, 1.0)  # untrained boxes: one stride wide
    low = build_model(quickstart_cfg(name, "MODEL.FCOS.SCORE_THRESH_TEST", 0.0,
                                     "MODEL.FCOS.INPUT_SCALE", "low")).eval()
    low.load_state_dict(full.state_dict())
    images = detector_inputs([(200, 240), (201, 233)], with_boxes=False)
    decimated = [{"image": x["image"][:, ::2, ::2]} for x in images]
    assert low.branch_input_sizes((101, 117)) == full.branch_input_sizes((201, 233)) == [(128, 128)]
    with torch.no_grad():
        on_full, on_low = full(images), low(decimated)
    for x, d, a, b in zip(images, decimated, on_full, on_low):
        a, b = a["instances"], b["instances"]
        assert b.image_size == tuple(d["image"].shape[-2:])  # in the given image's pixels
        assert len(a) == len(b) > 0
        h, w = x["image"].shape[-2:]
        scaled = b.pred_boxes.tensor * 2  # the decimated image reaches one row/column further
        scaled[:, 0::2], scaled[:, 1::2] = scaled[:, 0::2].clamp(max=w), scaled[:, 1::2].clamp(max=h)
        torch.testing.assert_close(scaled, a.pred_boxes.tensor, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.scores, a.scores, atol=1e-6, rtol=0)
        assert torch.equal(b.pred_classes, a.pred_classes)


@pytest.mark.parametrize("name, message", [
    ("thumbdet_4x", "ThumbDet makes its thumbnail from the full-resolution image"),
    ("teacher", "it needs one input with INPUT_FACTOR > 1, and this model reads 2 input"),
    ("hr_baseline", "at factors \\[1\\]"),
])
def test_low_resolution_input_is_refused_where_it_cannot_work(name, message):
    with pytest.raises(ValueError, match=message):
        build_model(quickstart_cfg(name, "MODEL.FCOS.INPUT_SCALE", "low"))


def test_low_resolution_input_is_for_inference_only():
    model = build_model(quickstart_cfg("lr_baseline", "MODEL.FCOS.INPUT_SCALE", "low")).train()
    with pytest.raises(RuntimeError, match="INPUT_SCALE 'low' is for inference"), EventStorage(0):
        model(detector_inputs([(100, 120)]))


def test_the_test_resize_is_divided_by_the_factor_for_low_resolution_input():
    opts = ["INPUT.MIN_SIZE_TEST", 800, "INPUT.MAX_SIZE_TEST", 1333]
    full = CheckedDatasetMapper(quickstart_cfg("student", *opts), is_train=False)
    low = CheckedDatasetMapper(quickstart_cfg("student", *opts, "MODEL.FCOS.INPUT_SCALE", "low"),
                               is_train=False)
    (resize_full,), (resize_low,) = full.augmentations.augs, low.augmentations.augs
    assert (resize_full.short_edge_length, resize_full.max_size) == ((800, 800), 1333)
    assert (resize_low.short_edge_length, resize_low.max_size) == ((400, 400), 666.5)


def test_decimated_dataset_is_what_the_nearest_trained_model_makes_inside(tmp_path):
    """tools/decimate_dataset.py: every other pixel of every other row, boxes halved; an
    existing output folder is refused."""
    import json
    import subprocess
    import sys

    import cv2

    json_file, images = small_dataset(tmp_path, n=2)
    out = tmp_path / "lr2"
    run = [sys.executable, f"{REPO}/tools/decimate_dataset.py", "--json", str(json_file),
           "--images", str(images), "--factor", "2", "--output", str(out)]
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    source, small = json.loads(json_file.read_text()), json.loads((out / "annotations.json").read_text())
    for a, b in zip(source["images"], small["images"]):
        full = cv2.imread(str(images / a["file_name"]))
        low = cv2.imread(str(out / "images" / b["file_name"]))
        assert (b["height"], b["width"]) == low.shape[:2] == full[::2, ::2].shape[:2]
        assert (low == full[::2, ::2]).all()
    assert [b["bbox"] for b in small["annotations"]] == [
        [v / 2 for v in a["bbox"]] for a in source["annotations"]]
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and f"--output {out} exists" in again.stderr


def test_area_resampling_is_the_mean_of_each_block():
    from msad.modeling.resample import downsample

    x = torch.rand(2, 3, 8, 12)
    torch.testing.assert_close(downsample(x, 2, "area"), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(downsample(x, 4, "area"), torch.nn.functional.avg_pool2d(x, 4))
    model = build_model(quickstart_cfg("lr_baseline", "MODEL.FCOS.INPUT_RESAMPLE", "area"))
    images = model.preprocess_image(detector_inputs([(100, 120)], with_boxes=False))
    torch.testing.assert_close(model.extract(images).inputs[0],
                               torch.nn.functional.avg_pool2d(images.tensor, 2))
