"""What train_net_T.py and train_net_S.py share: config set-up, the trainers and their hooks,
teacher loading."""
import functools
import logging
import os
import tempfile
import weakref

import torch
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.engine import (AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase,
                               create_ddp_model, default_setup)
from detectron2.engine.hooks import BestCheckpointer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .backbone import check_width
from .checkpoint import SafeCheckpointer, load_state_dict_file
from .config import IMAGENET_START_KEYS, NO_IMAGENET_START, TRAINING_CONFIG, load_config
from .data import register_coco_from_config
from .distill import DistilledDetector, freeze
from .env import has_compiled_ops, summary
from .input_checks import CheckedDatasetMapper, check_bad_image_policy, check_training_records
from .predictor import check_model_info, read_model_info, write_model_info

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


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class LossNormalizerState(HookBase):
    """Keeps FCOS's loss normaliser (an EMA of the positive count, which Detectron2 holds as a
    plain attribute outside the state_dict) in the trainer's checkpoints, so that a resumed run
    goes on with it instead of restarting it from its start value."""

    def state_dict(self):
        value = getattr(unwrap(self.trainer.model), "loss_normalizer", None)
        return {} if value is None else {"loss_normalizer": value}

    def load_state_dict(self, state):
        if "loss_normalizer" in state:
            unwrap(self.trainer.model).loss_normalizer = state["loss_normalizer"]


class IterationSchedule(HookBase):
    """Sets ``model.<attribute> = schedule(trainer.iter)`` before every step, and logs it.

    Reading the trainer's iteration (not counting calls) makes a resumed run continue the
    schedule where it stopped: the distillation warm-up ramp, ThumbDet's training phase.
    """

    def __init__(self, attribute, schedule):
        self.attribute = attribute
        self.schedule = schedule

    def before_step(self):
        value = self.schedule(self.trainer.iter)
        setattr(unwrap(self.trainer.model), self.attribute, value)
        self.trainer.storage.put_scalar(self.attribute, value, smoothing_hint=False)


class BestCheckpoint(BestCheckpointer):
    """Detectron2's ``BestCheckpointer`` (``model_best.pth``, by box AP, after each evaluation),
    whose best score so far is kept in the trainer's checkpoints, so that a resumed run does
    not replace the best model with a worse one."""

    def state_dict(self):
        return {} if self.best_metric is None else {"best_metric": self.best_metric,
                                                    "best_iter": self.best_iter}

    def load_state_dict(self, state):
        if "best_metric" in state:
            self.best_metric, self.best_iter = state["best_metric"], state["best_iter"]


class ModelInfoWriter(HookBase):
    """Writes what inference needs (class names, the config values the weights depend on) to
    OUTPUT_DIR/model_info.json, beside the checkpoints, when training starts
    (msad/predictor.py reads it)."""

    def before_train(self):
        if comm.is_main_process():
            cfg = self.trainer.cfg
            write_model_info(cfg, MetadataCatalog.get(cfg.DATASETS.TRAIN[0]))


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
        # (msad/input_checks.py); empty images are dropped after the bad boxes are.
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
    def check_config(cls, cfg, args):
        super().check_config(cfg, args)
        if not args.eval_only and cls.builds_teacher(cfg):
            teacher_config(cfg)  # its files and classes, before anything is written

    @classmethod
    def check_data(cls, cfg, args):
        super().check_data(cfg, args)
        if not args.eval_only and cls.builds_teacher(cfg):
            check_teacher_classes(read_model_info(cfg.MODEL.TEACHER.WEIGHTS)[1], cfg)

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


def teacher_config(cfg):
    """The config of the teacher MODEL.TEACHER names, checked against the weights' own
    model_info.json and against the student: the same classes."""
    spec = cfg.MODEL.TEACHER
    if not spec.WEIGHTS:
        raise ValueError("MODEL.TEACHER.WEIGHTS is empty: name the teacher's checkpoint")
    if not os.path.isfile(spec.WEIGHTS):
        raise FileNotFoundError(f"MODEL.TEACHER.WEIGHTS: no such file {spec.WEIGHTS}")
    if not spec.CONFIG_FILE:
        raise ValueError(
            f"MODEL.TEACHER.WEIGHTS={spec.WEIGHTS} has no {TRAINING_CONFIG} beside it (the config "
            "its training wrote) and MODEL.TEACHER.CONFIG_FILE is empty: name the teacher's config")
    teacher_cfg = load_config(spec.CONFIG_FILE, what="MODEL.TEACHER.CONFIG_FILE")
    info_path, info = read_model_info(spec.WEIGHTS)
    if info is not None:
        check_model_info(teacher_cfg, info, info_path)
    teacher_classes, classes = teacher_cfg.MODEL.FCOS.NUM_CLASSES, cfg.MODEL.FCOS.NUM_CLASSES
    if teacher_classes != classes:
        raise ValueError(
            f"the teacher ({spec.CONFIG_FILE}) detects {teacher_classes} classes and the student "
            f"{classes} (MODEL.FCOS.NUM_CLASSES): a teacher must be trained on the student's "
            "classes")
    return teacher_cfg


def check_teacher_classes(info, cfg):
    """The teacher's class names (from its model_info.json) are the student's training data's."""
    dataset = cfg.DATASETS.TRAIN[0]
    theirs, ours = info and info["thing_classes"], MetadataCatalog.get(dataset).get("thing_classes")
    if theirs and ours and list(theirs) != list(ours):
        raise ValueError(
            f"the teacher (MODEL.TEACHER.WEIGHTS={cfg.MODEL.TEACHER.WEIGHTS}) was trained on the "
            f"classes {list(theirs)}, the student's DATASETS.TRAIN {dataset} has {list(ours)}")


def build_frozen_teacher(cfg):
    """The teacher named by MODEL.TEACHER, with its weights, in eval mode, no gradients."""
    spec = cfg.MODEL.TEACHER
    teacher_cfg = teacher_config(cfg)
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.merge_from_list(NO_IMAGENET_START)  # its trained weights follow
    teacher = build_model(teacher_cfg)
    state = load_state_dict_file(spec.WEIGHTS, "MODEL.TEACHER.WEIGHTS")
    expected = teacher.state_dict()
    missing = [k for k in expected if k not in state]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or mismatched:
        raise ValueError(
            f"MODEL.TEACHER.WEIGHTS={spec.WEIGHTS} does not fit the model of "
            f"MODEL.TEACHER.CONFIG_FILE={spec.CONFIG_FILE}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(mismatched)} of another shape {mismatched[:3]}")
    teacher.load_state_dict({k: state[k] for k in expected})
    freeze(teacher)
    logger.info("Frozen teacher %s from %s, built from %s", type(teacher).__name__, spec.WEIGHTS,
                spec.CONFIG_FILE)
    return teacher


def setup(args, trainer_cls=Trainer):
    """Config from ``--config-file`` and overrides, checked, datasets registered, logging."""
    cfg = load_config(args.config_file, args.opts)
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
