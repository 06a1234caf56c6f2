"""Export: every detector's TorchScript/ONNX file gives eager PyTorch's detections on an image of
another size than it was traced at; the torch-free runtime; the exported student's AP; bad input."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import msad_runtime
from helpers import REPO, quickstart_cfg, run_tool, tool_here, torchvision_opts, train_in_process
from msad.checkpoint.detection_checkpoint import SafeCheckpointer
from msad.export.exporter import (CHECK_SHAPE, TRACE_SHAPE, ExportedPredictor, check_format,
                                  eager_raw, export, predictor_for_export, synthetic_image)
from msad.modeling.resample import resize_by_convolution

DETECTORS = ("hr_baseline", "lr_baseline", "teacher", "student", "student_light", "bicubic_4x",
             "thumbdet_4x")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Each quickstart detector's checkpoint, randomly initialised but made to find many boxes
    (class probabilities near 0.27, boxes of about two strides): NMS and top-k have work to do."""
    root = tmp_path_factory.mktemp("export_weights")
    for name in DETECTORS:
        save_firing(quickstart_cfg(name), root / name)
    return root


def save_firing(cfg, folder):
    """`cfg`'s model, random but made to find many boxes, saved as folder/model_final.pth."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-1.0)
        model.head.cls_score.weight.mul_(0.1)
        model.head.bbox_pred.bias.fill_(1.0)
        model.head.bbox_pred.weight.mul_(0.1)
    folder.mkdir()
    SafeCheckpointer(model, str(folder)).save("model_final")


def config(name):
    return os.path.join(REPO, "configs", "quickstart", f"{name}.yaml")


def exported(weights, tmp_path, name, fmt, input_scale=None, postprocess=True, opts=()):
    """(eager predictor, runtime detector) of one export, traced on the synthetic trace image."""
    # Random weights score the padding as high as the image: keep more than the 100 detections
    # there are slots for, or most images keep only boxes later clipped away.
    predictor = predictor_for_export(config(name), str(weights / name / "model_final.pth"),
                                     ["TEST.DETECTIONS_PER_IMAGE", 400, *opts], input_scale)
    export(predictor, fmt, str(tmp_path / "out"), synthetic_image(0, TRACE_SHAPE), postprocess)
    return predictor, msad_runtime.Detector(str(tmp_path / "out"))


def assert_same_detections(predictor, detector, image):
    eager, found = predictor(image), detector(image)
    assert len(eager) >= 10, "too few detections to compare"
    assert len(found.scores) == len(eager)
    classes, boxes, scores = (eager.pred_classes.numpy(), eager.pred_boxes.tensor.numpy(),
                              eager.scores.numpy())
    np.testing.assert_allclose(found.scores, scores, rtol=0, atol=TOLERANCE)  # in order
    # Scores tied within float noise may come in either order: match each exported detection
    # to the eager one of its class and box among those tied with it.
    unmatched = list(range(len(scores)))
    for cls, box, score in zip(found.classes, found.boxes, found.scores):
        match = next((j for j in unmatched if classes[j] == cls and abs(scores[j] - score)
                      <= TOLERANCE and np.abs(boxes[j] - box).max() <= TOLERANCE), None)
        assert match is not None, f"exported detection {cls} {box} {score} not found eagerly"
        unmatched.remove(match)
    assert found.class_names == [predictor.metadata.thing_classes[c] for c in found.classes]


def check_image(detector):
    """The comparison image: after the test resize, another size than the trace image's."""
    image = synthetic_image(1, CHECK_SHAPE)
    assert detector.preprocess(image).shape != detector.preprocess(
        synthetic_image(0, TRACE_SHAPE)).shape
    return image


AREA = ("MODEL.FCOS.INPUT_RESAMPLE", "area")


@pytest.mark.parametrize("name,fmt,input_scale,opts", [
    *[(name, "onnx", None, ()) for name in DETECTORS],
    ("student", "onnx", "low", ()), ("student_light", "onnx", "low", ()),
    ("lr_baseline", "onnx", "low", ()), ("lr_baseline", "onnx", None, AREA),
    ("student", "torchscript", "low", ()), ("thumbdet_4x", "torchscript", None, ()),
    ("teacher", "torchscript", None, ())])
def test_exported_detector_matches_eager_at_another_size(weights, tmp_path, name, fmt,
                                                         input_scale, opts):
    predictor, detector = exported(weights, tmp_path, name, fmt, input_scale, opts=opts)
    assert detector.metadata["input"]["input_scale"] == (input_scale or "full")
    assert_same_detections(predictor, detector, check_image(detector))


@pytest.mark.parametrize("name,input_scale", [("student", "low"), ("thumbdet_4x", None)])
def test_raw_outputs_match_the_eager_head(weights, tmp_path, name, input_scale):
    predictor, detector = exported(weights, tmp_path, name, "onnx", input_scale, False)
    image = check_image(detector)
    raw, eager = detector.run(detector.preprocess(image)), eager_raw(predictor, image)
    assert len(raw) == len(eager) == 15 == len(detector.metadata["outputs"])
    for a, b in zip(raw, eager):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE)
    # Each level's maps are 1/stride of the padded input, as model.json says.
    padded = [-(-s // detector.metadata["input"]["size_divisibility"])
              * detector.metadata["input"]["size_divisibility"]
              for s in detector.preprocess(image).shape[1:]]
    for level, logits in zip(detector.metadata["levels"], raw[:5]):
        assert list(logits.shape[2:]) == [s // level["stride"] for s in padded]
    with pytest.raises(msad_runtime.ExportError, match="no-postprocess"):
        detector(image)


@pytest.mark.parametrize("input_scale", [None, "low"])
def test_mobilenet_v2_student_exports(tmp_path, input_scale):
    """The deployment case: a MobileNetV2 student (torchvision's layout) through ONNX."""
    mobilenet = torchvision_opts("mobilenet_v2")
    save_firing(quickstart_cfg("student", *mobilenet), tmp_path / "student")
    predictor = predictor_for_export(config("student"), str(tmp_path / "student/model_final.pth"),
                                     ["TEST.DETECTIONS_PER_IMAGE", 400, *mobilenet], input_scale)
    assert type(predictor.model.backbone.bottom_up).__name__ == "MobileNetV2Backbone"
    export(predictor, "onnx", str(tmp_path / "out"), synthetic_image(0, TRACE_SHAPE))
    detector = msad_runtime.Detector(str(tmp_path / "out"))
    assert_same_detections(predictor, detector, check_image(detector))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("factor", [2, 4])
def test_resize_by_convolution_is_the_antialiased_resize(mode, factor):
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    expected = F.interpolate(x, scale_factor=1 / factor, mode=mode, align_corners=False,
                             antialias=True)
    assert (resize_by_convolution(x, factor, mode) - expected).abs().max() < 4e-16
    assert (resize_by_convolution(x.float(), factor, mode) - expected).abs().max() < 2e-7
    with pytest.raises(ValueError, match="does not divide"):
        resize_by_convolution(x[..., :95], factor, mode)


def test_openvino_runs_the_onnx_file_alike(weights, tmp_path):
    pytest.importorskip("openvino")
    predictor, _ = exported(weights, tmp_path, "thumbdet_4x", "onnx")
    detector = msad_runtime.Detector(str(tmp_path / "out"), backend="openvino")
    assert_same_detections(predictor, detector, check_image(detector))


def test_model_json_describes_the_model(weights, tmp_path):
    predictor, detector = exported(weights, tmp_path, "student", "onnx", "low")
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["outputs"] == ["boxes", "classes", "scores", "image_size"]
    assert meta["input"] == {**meta["input"], "format": "RGB", "input_factor": 2,
                             "input_scale": "low", "size_divisibility": 64}
    assert [lv["stride"] for lv in meta["levels"]] == [4, 8, 16, 32, 64]  # of the 1/2 image
    assert meta["thing_classes"] == list(predictor.metadata.thing_classes)
    # The student alone: none of its training teacher's weights are in the graph.
    import onnx
    names = [t.name for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer]
    assert names and not any("teacher" in n or "fusion" in n for n in names)


def test_runtime_runs_without_torch_or_detectron2(weights, tmp_path):
    exported(weights, tmp_path, "student", "onnx", "low")
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), synthetic_image(1, CHECK_SHAPE))
    code = ("import sys, numpy as np, msad_runtime; from PIL import Image\n"
            f"d = msad_runtime.Detector({str(tmp_path / 'out')!r})\n"
            f"found = d(np.asarray(Image.open({str(image)!r}))[:, :, ::-1].copy())\n"
            "assert len(found.scores) > 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'detectron2', 'torchvision', 'msad')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_exported_predictor_and_demo_use_the_export(weights, tmp_path):
    predictor, _ = exported(weights, tmp_path, "hr_baseline", "onnx")
    image = synthetic_image(1, CHECK_SHAPE)
    instances = ExportedPredictor(str(tmp_path / "out"))(image)
    torch.testing.assert_close(instances.pred_boxes.tensor, predictor(image).pred_boxes.tensor,
                               rtol=0, atol=TOLERANCE)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), image)
    proc = tool_here("demo", "--weights", tmp_path / "out" / "model.onnx", "--input",
                    tmp_path / "in", "--output", tmp_path / "drawn", "--confidence-threshold", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = json.loads((tmp_path / "drawn" / "detections.json").read_text())
    assert len(listed) == len(instances) and (tmp_path / "drawn" / "a.png").is_file()
    proc = tool_here("demo", "--weights", tmp_path / "out", "--config-file", config("student"),
                    "--input", tmp_path / "in", "--output", tmp_path / "drawn2")
    assert proc.returncode != 0 and "drop --config-file" in proc.stderr


# ---- bad input ---------------------------------------------------------------------------------
def test_a_model_file_that_does_not_match_its_metadata_is_refused(weights, tmp_path):
    exported(weights, tmp_path, "student", "onnx")
    with open(tmp_path / "out" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(msad_runtime.ExportError, match="model.onnx is not the file its model.json"):
        msad_runtime.Detector(str(tmp_path / "out"))
    os.remove(tmp_path / "out" / "model.json")
    with pytest.raises(msad_runtime.ExportError, match="no model.json"):
        msad_runtime.Detector(str(tmp_path / "out" / "model.onnx"))


def test_missing_packages_and_unsupported_opsets_are_named(monkeypatch):
    with pytest.raises(ValueError, match="--opset 9 is not supported"):
        check_format("onnx", 9)
    for package in ("onnx", "onnxruntime"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, package, None)
            with pytest.raises(RuntimeError, match=f"needs the {package} package"):
                check_format("onnx", 17)
    check_format("torchscript", 17)  # needs neither
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(msad_runtime.ExportError, match="needs the openvino package"):
        msad_runtime.backend_package("openvino")


def test_the_cli_names_a_missing_onnx(weights, tmp_path):
    code = ("import sys, runpy; sys.modules['onnx'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "tools",
                                                                      "export_model.py"),
                           "--config-file", config("student"), "--weights",
                           str(weights / "student" / "model_final.pth"), "--format", "onnx",
                           "--output", str(tmp_path / "x")], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "needs the onnx package" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["hr_baseline", "thumbdet_4x", "teacher"])
def test_low_resolution_input_is_refused_for_models_that_read_the_full_image(weights, name):
    with pytest.raises(ValueError, match="INPUT_SCALE"):
        predictor_for_export(config(name), str(weights / name / "model_final.pth"),
                             input_scale="low")


def test_weights_for_another_number_of_classes_are_refused(weights):
    with pytest.raises(ValueError, match=r"lacks 2 parameters .*head\.cls_score"):
        predictor_for_export(config("student"), str(weights / "student" / "model_final.pth"),
                             ["MODEL.FCOS.NUM_CLASSES", 7])


def test_outputs_other_than_the_metadata_s_are_refused(weights, tmp_path):
    exported(weights, tmp_path, "hr_baseline", "onnx")
    meta_path = tmp_path / "out" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, outputs=["scores", "boxes", "classes",
                                                        "image_size"])))
    with pytest.raises(msad_runtime.ExportError, match="has outputs .*model.json says"):
        msad_runtime.Detector(str(tmp_path / "out"))
    meta_path.write_text(json.dumps(dict(meta, format="tflite")))
    with pytest.raises(msad_runtime.ExportError, match="names format 'tflite'"):
        msad_runtime.Detector(str(tmp_path / "out"))


def test_runtime_command_line_prints_the_detections(weights, tmp_path):
    _, detector = exported(weights, tmp_path, "student", "onnx", "low")
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), synthetic_image(1, CHECK_SHAPE))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "msad_runtime.py"),
                           str(tmp_path / "out"), str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    found = detector(cv2.imread(str(image)))
    assert printed["file"] == str(image) and len(printed["detections"]) == len(found.scores) > 0
    assert printed["detections"][0]["class"] == found.class_names[0]
    np.testing.assert_allclose(printed["detections"][0]["bbox"], found.boxes[0], atol=0.01)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "msad_runtime.py"),
                           str(tmp_path / "out"), str(image), "--benchmark", "2"],
                          capture_output=True, text=True)
    timing = json.loads(proc.stdout)
    assert timing["input"] == list(CHECK_SHAPE) and timing["latency_ms_p90"] >= timing[
        "latency_ms_median"] > 0 and timing["peak_memory_mb"] > 0


def test_export_tool_checks_and_refuses(weights, tmp_path):
    out = tmp_path / "x"
    proc = tool_here("export_model", "--config-file", config("student"), "--weights",
                    weights / "student" / "model_final.pth", "--format", "onnx", "--input-scale",
                    "low", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"detections": ' in proc.stdout and "checked at" in proc.stdout
    before = (out / "model.onnx").read_bytes()
    for args, message in [
        ((), "already holds model.onnx"),  # nothing overwritten
        (("--opset", 9), "--opset 9 is not supported"),
    ]:
        proc = tool_here("export_model", "--config-file", config("student"), "--weights",
                        weights / "student" / "model_final.pth", "--format", "onnx",
                        "--output", out, *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert (out / "model.onnx").read_bytes() == before
    proc = tool_here("export_model", "--config-file", config("student"), "--weights",
                    weights / "student" / "model_final.pth", "--format", "torchscript",
                    "--output", out)  # another format, the same folder: model.json is taken
    assert proc.returncode != 0 and "model.json" in proc.stderr
    assert not (out / "model.ts").exists() and (out / "model.onnx").read_bytes() == before
    # The teacher reads the full image and its half: it has no low-resolution-only path.
    proc = tool_here("export_model", "--config-file", config("teacher"), "--weights",
                    weights / "teacher" / "model_final.pth", "--format", "onnx",
                    "--input-scale", "low", "--output", tmp_path / "t")
    assert proc.returncode != 0 and "INPUT_SCALE 'low'" in proc.stderr
    # The teacher of a student from the student's weights: they do not hold it.
    proc = tool_here("export_model", "--config-file", config("teacher"), "--weights",
                    weights / "student" / "model_final.pth", "--format", "onnx",
                    "--output", tmp_path / "s")
    assert proc.returncode != 0 and "never holds its teacher" in proc.stderr, proc.stderr[-2000:]
    assert "fusion" in proc.stderr
    assert not (tmp_path / "s" / "model.onnx").exists()


@pytest.mark.slow
def test_exported_student_ap_equals_eager_ap(untrained_teachers, tmp_path):
    """A briefly trained student, evaluated on msad_synth_val by eager PyTorch and by its ONNX
    export through msad_runtime (each reading the image files itself)."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    out = tmp_path / "student"
    train_in_process("--config-file", config("student"), "MODEL.TEACHER.WEIGHTS",
                     untrained_teachers / "teacher.pth", "MODEL.TEACHER.CONFIG_FILE",
                     config("teacher"), "MODEL.MSAD.KD_ALPHA", 0.0, "SOLVER.MAX_ITER", 300,
                     "DATASETS.TEST", "()", "OUTPUT_DIR", out, script="train_net_S.py")
    proc = run_tool("export_model.py", "--config-file", out / "config.yaml", "--weights",
                    out / "model_final.pth", "--format", "onnx", "--output", tmp_path / "onnx")
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictors = {"eager": predictor_for_export(str(out / "config.yaml"),
                                                str(out / "model_final.pth")),
                  "runtime": ExportedPredictor(str(tmp_path / "onnx"))}
    dataset = [[d] for d in DatasetCatalog.get("msad_synth_val")]
    ap = {}
    for name, predict in predictors.items():
        def model(inputs, predict=predict):
            return [{"instances": predict(cv2.imread(x["file_name"]))} for x in inputs]
        ap[name] = inference_on_dataset(model, dataset, COCOEvaluator(
            "msad_synth_val", output_dir=None))["bbox"]["AP"]
    assert ap["eager"] > 2.0, ap  # trained enough for the comparison to mean something
    assert abs(ap["runtime"] - ap["eager"]) <= 0.1, ap
    print(ap)
