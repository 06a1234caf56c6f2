#!/usr/bin/env python
"""Train or evaluate a distilled detector: the MSAD low-resolution student, ThumbDet.

    python train_net_S.py --config-file configs/MSAD/SLR100-50-S.yaml --num-gpus 8
    python train_net_S.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

The teacher (MODEL.TEACHER.CONFIG_FILE / WEIGHTS) is loaded only to train: it is frozen, in eval
mode, outside the student's checkpoint, optimizer and DDP wrapper.  --eval-only runs the student
alone and needs no teacher.
"""
import msad  # noqa: F401  (registers the architectures and datasets)
from msad.engine.defaults import DistillationTrainer, main

if __name__ == "__main__":
    main(DistillationTrainer)
