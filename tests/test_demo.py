"""Running a trained model on one's own images: model_info.json, msad.Predictor, tools/demo.py."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from helpers import REPO, edit_json, small_dataset, tool, train_net
from msad.checkpoint.model_info import MODEL_INFO
from msad.data.synthetic import CLASSES
from msad.export.predictor import Predictor

demo = tool("demo")

ALL_DETECTIONS = ["MODEL.FCOS.SCORE_THRESH_TEST", "0.0"]  # an untrained model scores low


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart LR FCOS after one training iteration on a small COCO-format set whose
    category ids are not 1..5: its OUTPUT_DIR (config.yaml, model_final.pth, model_info.json)."""
    root = tmp_path_factory.mktemp("demo")
    json_file, images = small_dataset(root, n=2)
    edit_json(json_file, lambda coco: [d.update(id=d["id"] * 10) for d in coco["categories"]]
              + [a.update(category_id=a["category_id"] * 10) for a in coco["annotations"]])
    out = root / "lr"
    proc = train_net("--config-file", f"{REPO}/configs/quickstart/lr_baseline.yaml",
                     "DATASETS.COCO_INSTANCES", f"[['mine', '{json_file}', '{images}']]",
                     "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", 1,
                     "OUTPUT_DIR", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """A folder with three msad_synth_val images."""
    from detectron2.data import DatasetCatalog

    folder = tmp_path_factory.mktemp("val_images")
    for d in DatasetCatalog.get("msad_synth_val")[:3]:
        shutil.copy(d["file_name"], folder)
    return folder


def predictor(trained, *opts, **kwargs):
    return Predictor.from_files(str(trained / "config.yaml"), str(trained / "model_final.pth"),
                                [*ALL_DETECTIONS, *opts], **kwargs)


def run_demo(trained, *args):
    """tools/demo.py in this process: (exit message or None)."""
    try:
        demo.main(["--config-file", str(trained / "config.yaml"), "--weights",
                   str(trained / "model_final.pth"), *map(str, args), "--opts", *ALL_DETECTIONS])
    except SystemExit as e:
        return str(e.code)
    return None


def test_training_keeps_what_inference_needs_beside_the_checkpoint(trained):
    info = json.loads((trained / MODEL_INFO).read_text())
    assert info["thing_classes"] == list(CLASSES)
    assert info["thing_dataset_ids"] == [10, 20, 30, 40, 50]
    assert info["config"]["INPUT.FORMAT"] == "RGB" and info["config"]["MODEL.FCOS.INPUT_FACTOR"] == 2
    p = predictor(trained)  # the dataset 'mine' is not registered in this process
    assert p.metadata.thing_classes == list(CLASSES)
    assert p.metadata.thing_dataset_id_to_contiguous_id == {10: 0, 20: 1, 30: 2, 40: 3, 50: 4}


def test_the_predictor_gives_what_the_model_gives(trained, val_images):
    p = predictor(trained)
    images = [cv2.imread(str(f)) for f in sorted(val_images.iterdir())[:2]]
    with torch.no_grad():
        expected = [o["instances"] for o in p.model([p.model_input(x) for x in images])]
        alone = p.model([p.model_input(images[0])])[0]["instances"]
    # model_input: RGB (the config's INPUT.FORMAT) as float CHW, boxes asked for in its own size
    x = p.model_input(images[0])
    assert torch.equal(x["image"], torch.as_tensor(images[0][:, :, ::-1].transpose(2, 0, 1).copy()).float())
    assert (x["height"], x["width"]) == images[0].shape[:2]
    for got, want in zip([p(images[0])] + p.batch(images), [alone] + expected):
        assert len(got) > 0 and got.image_size == want.image_size
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
        assert torch.equal(got.scores, want.scores)
        assert torch.equal(got.pred_classes, want.pred_classes)


def test_the_predictor_resizes_as_the_test_loader_does_and_scales_it_for_small_images(trained):
    full = predictor(trained, "INPUT.MIN_SIZE_TEST", 400, "INPUT.MAX_SIZE_TEST", 600)
    low = predictor(trained, "INPUT.MIN_SIZE_TEST", 400, "INPUT.MAX_SIZE_TEST", 600,
                    input_scale="low")
    image = np.zeros((100, 300, 3), np.uint8)
    assert full.model_input(image)["image"].shape[-2:] == (200, 600)
    assert low.model_input(image)["image"].shape[-2:] == (100, 300)  # 200 / 2, at most 300
    assert low.model.given_factor == 2


def test_the_predictor_refuses_a_config_that_does_not_describe_the_weights(trained):
    with pytest.raises(ValueError, match=r"INPUT.FORMAT 'BGR' \(trained with 'RGB'\)") as e:
        predictor(trained, "INPUT.FORMAT", "BGR")
    assert str(trained / MODEL_INFO) in str(e.value)
    with pytest.raises(ValueError, match=r"MODEL.FCOS.INPUT_FACTOR 1 \(trained with 2\)"):
        Predictor.from_files(f"{REPO}/configs/quickstart/hr_baseline.yaml",
                             str(trained / "model_final.pth"))


def test_without_model_info_class_names_come_from_the_config_or_are_numbered(trained, tmp_path):
    weights = tmp_path / "model.pth"
    shutil.copy(trained / "model_final.pth", weights)
    named = Predictor.from_files(f"{REPO}/configs/quickstart/lr_baseline.yaml", str(weights))
    assert named.metadata.thing_classes == list(CLASSES)  # msad_synth_val names them
    numbered = Predictor.from_files(f"{REPO}/configs/quickstart/lr_baseline.yaml", str(weights),
                                    ["DATASETS.TEST", "()", "DATASETS.TRAIN", "()"])
    assert numbered.metadata.thing_classes == [f"class {i}" for i in range(5)]


def test_demo_draws_every_image_of_a_folder_and_lists_the_predictors_boxes(
        trained, val_images, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(val_images, folder)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run_demo(trained, "--input", folder, "--output", out,
                    "--confidence-threshold", 0.05) is None
    printed = capsys.readouterr().out
    assert "Skipped 1 file that is not a readable image" in printed and "notes.txt" in printed
    assert "model latency per image: median" in printed
    names = sorted(f.name for f in val_images.iterdir())
    assert sorted(f.name for f in out.iterdir()) == sorted(names + ["detections.json"])
    results = json.loads((out / "detections.json").read_text())
    p = predictor(trained)
    for name in names:
        image = cv2.imread(str(folder / name))
        drawn = cv2.imread(str(out / name))
        # boxes and labels drawn: pixels changed far beyond what re-encoding the JPEG changes
        changed = (np.abs(drawn.astype(int) - image).max(axis=2) > 40).mean()
        ok, again = cv2.imencode(".jpg", image)
        noise = (np.abs(cv2.imdecode(again, 1).astype(int) - image).max(axis=2) > 40).mean()
        assert drawn.shape == image.shape and changed > 0.005 > noise, (changed, noise)
        want = p(image)
        want = want[want.scores >= 0.05]
        got = [r for r in results if r["file_name"] == str(folder / name)]
        assert len(got) == len(want) > 0
        boxes = torch.tensor([r["bbox"] for r in got])
        boxes[:, 2:] += boxes[:, :2]
        torch.testing.assert_close(boxes, want.pred_boxes.tensor, atol=1e-4, rtol=0)
        assert [r["score"] for r in got] == pytest.approx(want.scores.tolist(), abs=1e-6)
        assert [r["category_id"] for r in got] == [10 * (c + 1) for c in want.pred_classes.tolist()]
        assert [r["category_name"] for r in got] == [CLASSES[c] for c in want.pred_classes.tolist()]


def test_demo_writes_a_drawn_frame_for_every_frame_of_a_video(trained, val_images, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (160, 120))
    frame = cv2.resize(cv2.imread(str(sorted(val_images.iterdir())[0])), (160, 120))
    for i in range(10):
        writer.write(np.roll(frame, 4 * i, axis=1))
    writer.release()
    assert run_demo(trained, "--video-input", video, "--output", tmp_path / "out",
                    "--confidence-threshold", 0.05, "--draw-scale", 2) is None
    written = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while (read := written.read())[0]:
        frames.append(read[1])
    assert len(frames) == 10 and frames[0].shape == (240, 320, 3)  # drawn twice as large
    results = json.loads((tmp_path / "out" / "clip.json").read_text())
    assert {r["frame"] for r in results} == set(range(10))


@pytest.mark.parametrize("make_input, message", [
    (lambda t: ["--input", t / "empty"], "the folder holds no file"),
    (lambda t: ["--input", f"{t}/*.png"], "the pattern matches no file"),
    (lambda t: ["--input", t / "nope.jpg"], "no such file or folder"),
    (lambda t: ["--video-input", t / "nope.mp4"], "no such file"),
    (lambda t: ["--video-input", t / "text.mp4"], "OpenCV cannot open it as a video"),
])
def test_demo_names_inputs_it_cannot_use(trained, tmp_path, make_input, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.mp4").write_text("not a video")
    args = make_input(tmp_path)
    error = run_demo(trained, *args, "--output", tmp_path / "out")
    assert error and message in error and str(args[1]) in error
    assert not (tmp_path / "out").exists()


def test_demo_stops_at_a_bad_file_with_strict_and_never_overwrites_an_input(
        trained, val_images, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(val_images, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    error = run_demo(trained, "--input", folder, "--output", tmp_path / "out", "--strict")
    assert error and "cannot read" in error and "broken.jpg" in error
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    error = run_demo(trained, "--input", folder, "--output", folder)
    assert error and "--output would overwrite the input" in error
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_demo_refuses_weights_of_another_model_and_exits_non_zero(trained, val_images):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--config-file",
         str(trained / "config.yaml"), "--weights", str(trained / "model_final.pth"),
         "--input", str(val_images), "--output", str(val_images / "out"),
         "--opts", "MODEL.SLIMMABLE.WIDTH", "0.5"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "does not fit this model (another width or architecture?)" in proc.stderr
    assert str(trained / "model_final.pth") in proc.stderr
    assert not (val_images / "out").exists()


@pytest.mark.skipif(os.path.exists("/dev/video0"), reason="this machine has a camera")
def test_demo_says_when_there_is_no_camera(trained, tmp_path):
    error = run_demo(trained, "--webcam", "--output", tmp_path / "webcam.mp4")
    assert error and "--webcam: camera 0: OpenCV cannot open it as a video" in error
