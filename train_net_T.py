#!/usr/bin/env python
"""Train or evaluate the MSAD multi-scale teacher (and the single-scale FCOS baselines).

    python train_net_T.py --config-file configs/MSAD/SLR100-50-T.yaml --num-gpus 8
    python train_net_T.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

Several GPUs or machines go through Detectron2's ``launch`` (torch.distributed); nothing in
Detectron2 needs editing.
"""
from detectron2.engine import default_argument_parser, launch

import msad  # noqa: F401  (registers the architectures and datasets)
from msad.engine.defaults import run


def main(args):
    return run(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
