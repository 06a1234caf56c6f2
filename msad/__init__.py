"""msad: low-resolution object detection by distillation, as a Detectron2 plugin.

Importing this package registers its backbones, meta-architectures and bundled datasets.
"""
import warnings

# Upstream's deprecation notices about its own code, printed at import and at every first call
# (fvcore scripts its focal loss with torch.jit.script; Detectron2's anchor generator calls
# torch.meshgrid without `indexing`): noise to msad's users, who can change neither.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*torch.meshgrid.*", category=UserWarning)

# Registration by import:
from . import modeling  # noqa: E402,F401
from .config import add_msad_config, load_config  # noqa: E402
from .data.synthetic import register_synthetic  # noqa: E402
from .export.predictor import Predictor  # noqa: E402

register_synthetic()

__all__ = ["add_msad_config", "load_config", "Predictor"]
