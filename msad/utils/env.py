"""Which Detectron2, torch, CUDA and export runtimes this environment uses: ``python -m msad.utils.env``."""
import os
from importlib.metadata import PackageNotFoundError, version


def has_compiled_ops():
    """True when Detectron2's ``_C`` extension loads (else torchvision's ops are used)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def detectron2_distribution():
    for name in ("detectron2", "sal-detectron2"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "not installed by pip (a source checkout on the path)"


def installed(name):
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"{name} not installed"


def summary():
    import detectron2
    import torch
    import torchvision

    ops = "present" if has_compiled_ops() else "absent, torchvision's ops are used"
    return "\n".join([
        f"detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)} "
        f"({detectron2_distribution()}); compiled _C ops: {ops}",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, built for CUDA "
        f"{torch.version.cuda or 'none'}, CUDA available: {torch.cuda.is_available()}",
        "export: " + ", ".join(installed(n) for n in ("onnx", "onnxruntime", "openvino")),
    ])


if __name__ == "__main__":
    print(summary())
