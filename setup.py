#!/usr/bin/env python
"""msad: low-resolution object detection by distillation (MSAD, ThumbDet) on Detectron2.

torch, torchvision and Detectron2 are not listed as requirements on purpose: they must match
each other and the user's CUDA, so tools/setup.sh installs them (keeping any the user has).
"""
from setuptools import find_packages, setup

setup(
    name="msad",
    version="0.1.0",
    description="Multi-scale aligned distillation and ThumbDet for low-resolution detection, "
    "as a Detectron2 plugin",
    packages=find_packages(include=["msad", "msad.*"]),
    py_modules=["msad_runtime"],  # runs an exported model without torch: one file to copy
    python_requires=">=3.10",
    install_requires=["fvcore", "pycocotools", "opencv-python-headless", "numpy", "Pillow"],
)
