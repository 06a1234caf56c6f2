"""Running a trained detector: ``msad.Predictor``, and its export to TorchScript or ONNX for the
Detectron2-free runtime (msad_runtime.py)."""
