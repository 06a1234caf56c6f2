"""The hooks msad's trainers add to Detectron2's: state a resumed run needs, per-iteration
schedules, the best checkpoint, model_info.json."""
from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from detectron2.engine.hooks import BestCheckpointer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.model_info import write_model_info


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
    (msad/checkpoint/model_info.py)."""

    def before_train(self):
        if comm.is_main_process():
            cfg = self.trainer.cfg
            write_model_info(cfg, MetadataCatalog.get(cfg.DATASETS.TRAIN[0]))
