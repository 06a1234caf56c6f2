"""What train_net_T.py and train_net_S.py share: config set-up, the Trainer, teacher loading."""
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from .config import add_msad_config
from .data import register_coco_from_config
from .env import has_compiled_ops, summary
from .distill import freeze
from .slimmable import load_state_dict_file

logger = logging.getLogger("msad")


def load_config(config_file, opts=(), what="--config-file"):
    """Detectron2's config plus ours, merged from `config_file` and `opts` overrides."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{what}: no such file {config_file}")
    cfg = get_cfg()
    add_msad_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def has_checkpoint(cfg):
    return os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def write_atomically(path, mode, write):
    """Call write(file) on a temporary file beside `path`, then rename it to `path`.

    A process killed meanwhile leaves the previous `path` (or none), never a truncated one.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, writing each checkpoint and ``last_checkpoint`` atomically."""

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **kwargs}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        write_atomically(path, "wb", lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        write_atomically(os.path.join(self.save_dir, "last_checkpoint"), "w",
                         lambda f: f.write(last_filename_basename))


class Trainer(DefaultTrainer):
    """Detectron2's trainer with a COCO evaluator that works with or without Detectron2's _C,
    and checkpoints that a kill during saving cannot truncate."""

    trains_students = False  # students (with training_hooks) are trained by train_net_S.py

    def build_hooks(self):
        # DefaultTrainer made its checkpointer just before this call; the hooks must get ours.
        self.checkpointer = AtomicCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR,
                                               **self.checkpointer.checkpointables)
        return super().build_hooks()

    @classmethod
    def check_config(cls, cfg, args):
        """Refuse a run that cannot work before anything is written to OUTPUT_DIR."""
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        is_student = hasattr(arch, "training_hooks")
        if not args.eval_only and is_student != cls.trains_students:
            script = "train_net_S.py" if is_student else "train_net_T.py"
            raise ValueError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} is trained "
                             f"by {script}")
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available "
                               "here; add 'MODEL.DEVICE cpu' to the command line")
        if args.resume and not has_checkpoint(cfg):
            raise FileNotFoundError(f"--resume: no checkpoint in OUTPUT_DIR={cfg.OUTPUT_DIR} "
                                    "(no last_checkpoint file); drop --resume to start afresh")
        if args.eval_only and not args.resume and not cfg.MODEL.WEIGHTS:
            raise ValueError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <file>")

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        DatasetCatalog.get(dataset_name)  # bundled splits are generated when first loaded
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(
            cfg.OUTPUT_DIR, "inference"), use_fast_impl=has_compiled_ops())


def build_frozen_teacher(cfg):
    """The teacher named by MODEL.MSAD.TEACHER, with its weights, in eval mode, no gradients."""
    spec = cfg.MODEL.MSAD.TEACHER
    if not spec.CONFIG_FILE:
        raise ValueError("MODEL.MSAD.TEACHER.CONFIG_FILE is empty: name the teacher's config")
    teacher_cfg = load_config(spec.CONFIG_FILE, what="MODEL.MSAD.TEACHER.CONFIG_FILE")
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.MODEL.SLIMMABLE.PRETRAINED = ""  # its trained weights follow
    if not spec.WEIGHTS:
        raise ValueError("MODEL.MSAD.TEACHER.WEIGHTS is empty: name the teacher's checkpoint")
    teacher = build_model(teacher_cfg)
    state = load_state_dict_file(spec.WEIGHTS, "MODEL.MSAD.TEACHER.WEIGHTS")
    expected = teacher.state_dict()
    missing = [k for k in expected if k not in state]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or mismatched:
        raise ValueError(
            f"MODEL.MSAD.TEACHER.WEIGHTS={spec.WEIGHTS} does not fit the model of "
            f"MODEL.MSAD.TEACHER.CONFIG_FILE={spec.CONFIG_FILE}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(mismatched)} of another shape {mismatched[:3]}")
    teacher.load_state_dict({k: state[k] for k in expected})
    freeze(teacher)
    logger.info("Frozen teacher %s from %s", type(teacher).__name__, spec.WEIGHTS)
    return teacher


def setup(args, trainer_cls=Trainer):
    """Config from ``--config-file`` and overrides, checked, datasets registered, logging."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    trainer_cls.check_config(cfg, args)
    register_coco_from_config(cfg)
    default_setup(cfg, args)
    logger.info("Environment:\n%s", summary())
    return cfg


def run(args, trainer_cls=Trainer):
    """Train, resume or ``--eval-only``, as Detectron2's own ``train_net.py`` does."""
    cfg = setup(args, trainer_cls)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return trainer_cls.test(cfg, model)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
