"""The detectors and backbones: one FCOS forward on the full-resolution grid (fcos.py), its
input scales and level pairing (alignment.py), and the meta-architectures that fill it in.

Importing this package registers the backbones and meta-architectures with Detectron2.
"""
from . import backbone, fcos, student, teacher, thumbdet, torchvision_backbone  # noqa: F401
