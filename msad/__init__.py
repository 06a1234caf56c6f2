"""msad: low-resolution object detection by distillation, as a Detectron2 plugin.

Importing this package registers its backbones, meta-architectures and bundled datasets.
"""
# Registration by import:
from . import modeling  # noqa: F401
from .config import add_msad_config, load_config
from .data.synthetic import register_synthetic
from .export.predictor import Predictor

register_synthetic()

__all__ = ["add_msad_config", "load_config", "Predictor"]
