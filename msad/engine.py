"""What train_net_T.py and train_net_S.py share: config set-up, the Trainer, the entry point."""
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator

from .config import add_msad_config
from .data import register_coco_from_config
from .env import has_compiled_ops, summary

logger = logging.getLogger("msad")


def setup(args):
    """Config from ``--config-file`` and overrides, datasets registered, logging set up."""
    cfg = get_cfg()
    add_msad_config(cfg)
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file: no such file {args.config_file}")
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available here; "
                           "add 'MODEL.DEVICE cpu' to the command line")
    register_coco_from_config(cfg)
    default_setup(cfg, args)
    logger.info("Environment:\n%s", summary())
    return cfg


class Trainer(DefaultTrainer):
    """Detectron2's trainer with a COCO evaluator that works with or without Detectron2's _C."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        DatasetCatalog.get(dataset_name)  # bundled splits are generated when first loaded
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(
            cfg.OUTPUT_DIR, "inference"), use_fast_impl=has_compiled_ops())


def run(args, trainer_cls=Trainer):
    """Train, resume or ``--eval-only``, as Detectron2's own ``train_net.py`` does."""
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not args.resume:
            raise ValueError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <file>")
        model = trainer_cls.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return trainer_cls.test(cfg, model)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
