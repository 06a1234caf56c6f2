"""What train_net_T.py and train_net_S.py share: config set-up and checks, and the trainers."""
import functools
import logging
import os
import tempfile
import weakref

import torch
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.engine import (AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase,
                               create_ddp_model, default_argument_parser, default_setup, launch)
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.detection_checkpoint import SafeCheckpointer
from ..config import IMAGENET_START_KEYS, load_config
from ..data.coco import register_coco_from_config
from ..data.input_checks import (CheckedDatasetMapper, check_bad_image_policy,
                                 check_training_records)
from ..modeling.backbone import check_width
from ..modeling.distill import DistilledDetector
from ..utils.env import has_compiled_ops, summary
from .hooks import BestCheckpoint, IterationSchedule, LossNormalizerState, ModelInfoWriter, unwrap
from .teacher import build_frozen_teacher, check_teacher, use_trained_config

logger = logging.getLogger("msad")


def has_checkpoint(cfg):
    return os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def check_writable(directory, what):
    """Create `directory` if needed and prove a file can be written there."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"{what}={directory} is not a writable directory: {e}") from None


class Trainer(DefaultTrainer):
    """Detectron2's trainer with checked data, safe checkpoints, CPU multi-process training and
    a COCO evaluator that works with or without Detectron2's _C."""

    trains_distilled = False  # a DistilledDetector is trained by train_net_S.py

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two differences: DDP gets device_ids only for a CUDA
        # model (Detectron2 passes [local_rank], which DDP refuses for a CPU model, so CPU
        # training in several processes failed), and the checkpointer is SafeCheckpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cuda = next(model.parameters()).device.type == "cuda"
        model = create_ddp_model(model, broadcast_buffers=False,
                                 device_ids=[comm.get_local_rank()] if on_cuda else None)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's optimizer; where the model names learning-rate factors for some of its
        parameters (``lr_factors``, {name prefix: factor}), each of those is scaled."""
        factors = getattr(model, "lr_factors", {})
        if not factors:
            return super().build_optimizer(cfg, model)

        def lr_factor(name):
            return next((f for prefix, f in factors.items() if name.startswith(prefix)), 1.0)

        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS, lr_factor_func=lr_factor)
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD(
            params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True))

    @classmethod
    def check_config(cls, cfg, args):
        """Refuse a run that cannot work before anything is written to OUTPUT_DIR."""
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        distilled = issubclass(arch, DistilledDetector)
        if not args.eval_only and distilled != cls.trains_distilled:
            script = "train_net_S.py" if distilled else "train_net_T.py"
            raise ValueError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE} is trained "
                             f"by {script}")
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available "
                               "here; add 'MODEL.DEVICE cpu' to the command line")
        if cfg.MODEL.BACKBONE.NAME == "build_slimmable_resnet_fpn_backbone":
            check_width(cfg.MODEL.SLIMMABLE.WIDTH, cfg.MODEL.SLIMMABLE.WIDTH_LIST)
        if comm.get_world_size() > 1 and not cfg.MODEL.DEVICE.startswith("cuda") \
                and torch.distributed.get_backend() == "nccl":
            raise RuntimeError(f"MODEL.DEVICE={cfg.MODEL.DEVICE} in {comm.get_world_size()} "
                               "processes: Detectron2's launch chose NCCL because this machine "
                               "has CUDA, and NCCL cannot reduce CPU tensors; to train on CPU, "
                               "hide the GPUs with CUDA_VISIBLE_DEVICES=")
        # --resume, as in Detectron2: continue from OUTPUT_DIR's last checkpoint if there is one.
        resumes = args.resume and has_checkpoint(cfg)
        if not args.resume and not args.eval_only and has_checkpoint(cfg):
            raise FileExistsError(
                f"OUTPUT_DIR={cfg.OUTPUT_DIR} holds the checkpoints of an earlier run, which a "
                "fresh run would overwrite: add --resume to continue it, or choose another "
                "OUTPUT_DIR")
        if args.eval_only and not resumes and not cfg.MODEL.WEIGHTS:
            raise ValueError("--eval-only needs the weights to evaluate: add MODEL.WEIGHTS <file>")
        weights = cfg.MODEL.WEIGHTS.split("?")[0]  # Detectron2 accepts ?matching_heuristics=True
        if not resumes and weights and "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"MODEL.WEIGHTS: no such file {weights}")
        start = IMAGENET_START_KEYS.get(cfg.MODEL.BACKBONE.NAME)  # the backbone's ImageNet file
        path = start and functools.reduce(getattr, start.split("."), cfg)
        if not resumes and path and not os.path.isfile(path):
            raise FileNotFoundError(f"{start}: no such file {path}")
        check_bad_image_policy(cfg.DATALOADER.BAD_IMAGES)

    @classmethod
    def check_data(cls, cfg, args):
        """Refuse data the model cannot learn or evaluate, before anything is written: more
        categories than MODEL.FCOS.NUM_CLASSES."""
        for dataset in cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN:
            check_num_classes(cfg, dataset)

    def resume_or_load(self, resume=True):
        if resume and not self.checkpointer.has_checkpoint():
            logger.info("--resume: no checkpoint in OUTPUT_DIR=%s yet, so this is a fresh run",
                        self.cfg.OUTPUT_DIR)
        super().resume_or_load(resume)

    def build_hooks(self):
        hooks = super().build_hooks() + [LossNormalizerState(), ModelInfoWriter()]
        if self.cfg.TEST.EVAL_PERIOD > 0 and self.cfg.DATASETS.TEST:  # after the EvalHook
            # EvalHook names the metrics of several datasets <dataset>/bbox/AP: the first decides.
            metric = "bbox/AP" if len(self.cfg.DATASETS.TEST) == 1 else \
                f"{self.cfg.DATASETS.TEST[0]}/bbox/AP"
            hooks.append(BestCheckpoint(self.cfg.TEST.EVAL_PERIOD, self.checkpointer, metric))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg):
        # Detectron2's loader over records whose files and boxes were checked first
        # (msad.data.input_checks); empty images are dropped after the bad boxes are.
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        dicts = check_training_records(dicts, cfg.DATALOADER.BAD_IMAGES)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            dicts = filter_images_with_only_crowd_annotations(dicts)
        if not dicts:
            raise ValueError(f"DATASETS.TRAIN={cfg.DATASETS.TRAIN}: no image with a usable box")
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True),
                                            dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        DatasetCatalog.get(dataset_name)  # bundled splits are generated when first loaded
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(
            cfg.OUTPUT_DIR, "inference"), use_fast_impl=has_compiled_ops())


class DistillationTrainer(Trainer):
    """The trainer of train_net_S.py: attaches the frozen teacher (MODEL.TEACHER) to the
    DistilledDetector it trains and runs the detector's iteration schedules."""

    trains_distilled = True

    def __init__(self, cfg):
        super().__init__(cfg)
        student = unwrap(self.model)
        self.teacher = None
        if self.builds_teacher(cfg):
            self.teacher = build_frozen_teacher(cfg)
            student.attach_teacher(self.teacher, bn_mode=cfg.MODEL.TEACHER.BN_MODE)

    @classmethod
    def check_data(cls, cfg, args):
        super().check_data(cfg, args)
        if not args.eval_only and cls.builds_teacher(cfg):
            check_teacher(cfg)  # its files and classes, before anything is written

    @staticmethod
    def builds_teacher(cfg):
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        return bool(cfg.MODEL.TEACHER.WEIGHTS or cfg.MODEL.TEACHER.CONFIG_FILE
                    or arch.teacher_required)

    def build_hooks(self):
        schedules = unwrap(self.model).iteration_schedules()
        return super().build_hooks() + [IterationSchedule(attribute, schedule)
                                        for attribute, schedule in schedules.items()]

    def resume_or_load(self, resume=True):
        # Only a fresh run starts from the teacher; --resume continues the student's own weights.
        fresh = not (resume and self.checkpointer.has_checkpoint())
        if fresh and self.teacher is not None and self.cfg.MODEL.TEACHER.INIT_STUDENT:
            unwrap(self.model).init_from_teacher()
        super().resume_or_load(resume)


def dataset_classes(dataset):
    """The category names of a registered dataset (loading it if its metadata does not have
    them yet, as for COCO-format files)."""
    metadata = MetadataCatalog.get(dataset)
    if metadata.get("thing_classes") is None:
        DatasetCatalog.get(dataset)  # load_coco_json sets them
    return metadata.get("thing_classes")


def check_num_classes(cfg, dataset):
    names = dataset_classes(dataset)
    if names is None:
        return
    num_classes = cfg.MODEL.FCOS.NUM_CLASSES
    if len(names) > num_classes:
        raise ValueError(
            f"dataset {dataset} has {len(names)} categories {list(names)[:10]}, and "
            f"MODEL.FCOS.NUM_CLASSES is {num_classes}: set it to {len(names)}")
    if len(names) < num_classes:
        logger.warning("dataset %s has %d categories and MODEL.FCOS.NUM_CLASSES is %d: the "
                       "other %d classes are never trained", dataset, len(names), num_classes,
                       num_classes - len(names))


def setup(args, trainer_cls=Trainer):
    """Config from ``--config-file`` and overrides, checked, datasets registered, logging."""
    cfg = load_config(args.config_file, args.opts)
    use_trained_config(cfg, named="MODEL.TEACHER.CONFIG_FILE" in args.opts[0::2])
    cfg.freeze()
    trainer_cls.check_config(cfg, args)
    register_coco_from_config(cfg)  # checks the files
    trainer_cls.check_data(cfg, args)
    check_writable(cfg.OUTPUT_DIR, "OUTPUT_DIR")  # last: it creates OUTPUT_DIR
    default_setup(cfg, args)
    # This package's messages (data checks, teacher loading) go where Detectron2's go.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="msad", abbrev_name="msad")
    logger.info("Environment:\n%s", summary())
    return cfg


def run(args, trainer_cls=Trainer):
    """Train, resume or ``--eval-only``, as Detectron2's own ``train_net.py`` does."""
    cfg = setup(args, trainer_cls)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        return trainer_cls.test(cfg, model)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(trainer_cls, argv=None):
    """The command line of train_net_T.py and train_net_S.py, as Detectron2's ``train_net.py``:
    Detectron2's arguments, then ``run`` in each process its ``launch`` starts."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args, trainer_cls))
