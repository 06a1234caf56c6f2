#!/usr/bin/env python
"""Train or evaluate the MSAD multi-scale teacher (and the single-scale FCOS baselines).

    python train_net_T.py --config-file configs/MSAD/SLR100-50-T.yaml --num-gpus 8
    python train_net_T.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Several GPUs or machines go through Detectron2's ``launch`` (torch.distributed); nothing in
Detectron2 needs editing.
"""
import msad  # noqa: F401  (registers the architectures and datasets)
from msad.engine.defaults import Trainer, main

if __name__ == "__main__":
    main(Trainer)
