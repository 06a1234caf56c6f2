"""Checkpoints that a kill cannot truncate, and weights files that cannot run code when loaded.

Every file this project reads weights from (MODEL.WEIGHTS, a resumed checkpoint, the teacher,
the slimmable ImageNet checkpoint) goes through ``torch.load(weights_only=True)`` or, for
Detectron2's ``.pkl`` model-zoo format, an unpickler that only rebuilds numpy arrays.
"""
import errno
import glob
import os
import pickle
import shutil

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import TEMPORARY_SUFFIX, is_out_of_space, write_atomically


def tensor_bytes(obj):
    """Bytes of the tensors in a nested dict / list (a checkpoint's payload)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts of numpy arrays (Detectron2 / Caffe2 ``.pkl`` weights) and nothing else."""

    ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
               *((f"numpy.{core}.{module}", name) for core in ("core", "_core")
                 for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                      ("numeric", "_frombuffer")))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: a weights "
                                         "file holds arrays only")
        return super().find_class(module, name)


def _load_weights(path):
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights_file(path, what):
    """The object in a weights file, loaded without running code.  Errors name `path` and `what`,
    the config key or option that pointed to it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        return _load_weights(path)
    except Exception as e:  # pickle errors, truncated files, refused globals
        raise RuntimeError(f"{what}: cannot load {path} as a weights-only checkpoint "
                           f"(it may be truncated, or contain code objects): {e}") from e


def load_state_dict_file(path, what):
    """The state_dict of a checkpoint (``{'model': ...}`` or bare), loaded without running code."""
    ckpt = load_weights_file(path, what)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds no state_dict")
    return state


class SafeCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, writing each checkpoint and ``last_checkpoint`` atomically,
    loading weights only, and refusing a checkpoint made for another model.

    Detectron2 only warns when a checkpoint's tensors have other shapes (another width) or none
    of its keys fit (another architecture), and goes on with a half-initialised model; here
    that is an error naming the file.  Missing keys and a classifier for another number of
    classes are only logged, so a backbone-only, a teacher or a COCO checkpoint can start
    a detector to train; with ``complete=True`` (inference, export) they are an error too,
    since those parameters would run with their random initial values.  (Files that Detectron2
    loads by name-matching heuristics, Caffe2 ``.pkl`` and ``?matching_heuristics=True``, keep
    Detectron2's warnings.)

    `source` names what pointed to the file (a config key or option) in error messages.
    """

    def __init__(self, model, save_dir="", *, source="MODEL.WEIGHTS", complete=False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.source = source
        self.complete = complete

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **kwargs}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        try:
            write_atomically(path, "wb", lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)
        except (OSError, RuntimeError) as e:
            if not is_out_of_space(e):
                raise
            kept = self.get_checkpoint_file() if self.has_checkpoint() else "none yet"
            raise OSError(errno.ENOSPC, (
                f"OUTPUT_DIR={self.save_dir} ran out of space while saving {basename}: a "
                f"checkpoint of this run needs about {tensor_bytes(data) / 2**20:.0f} MiB, "
                f"{shutil.disk_usage(self.save_dir).free / 2**20:.0f} MiB are free there. The "
                f"last complete checkpoint is kept ({kept}): free some space and continue "
                "with --resume")) from e

    def tag_last_checkpoint(self, last_filename_basename):
        write_atomically(os.path.join(self.save_dir, "last_checkpoint"), "w",
                         lambda f: f.write(last_filename_basename))

    def resume_or_load(self, path, *, resume=True):
        if self.save_dir and self.save_to_disk:
            self.remove_temporaries_of_killed_runs()
        if resume and self.has_checkpoint():
            self.source = f"--resume ({os.path.join(self.save_dir, 'last_checkpoint')})"
        return super().resume_or_load(path, resume=resume)

    def remove_temporaries_of_killed_runs(self):
        """Delete the temporary files of saves that a kill interrupted: their process is gone,
        or has this process's id (reused after a restart; this one has not saved yet)."""
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), f"*{TEMPORARY_SUFFIX}*")):
            pid = path.rsplit(TEMPORARY_SUFFIX, 1)[1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _is_running(int(pid))):
                os.remove(path)
                self.logger.info("Removed %s, left by a run killed while saving", path)

    def load(self, path, *args, **kwargs):
        self._path = path
        return super().load(path, *args, **kwargs)

    # _load_file, _torch_load and _load_model are private to fvcore's Checkpointer and
    # Detectron2's DetectionCheckpointer, and are how Detectron2 itself extends loading: no
    # public hook reads a file or checks what it loads.  Checked against fvcore
    # 0.1.5.post20221221 and Detectron2 0.7.2; tests/test_upstream.py fails when they change.
    def _load_file(self, filename):
        # Detectron2 reads .pkl and .pyth with pickle / plain torch.load: here without code.
        if filename.endswith(".pkl"):
            loaded = self._torch_load(filename)
            if "model" in loaded and "__author__" in loaded:  # Detectron2 model-zoo format
                return loaded
            weights = loaded.get("blobs", loaded)  # Caffe2 detection / ImageNet models
            weights = {k: v for k, v in weights.items() if not k.endswith("_momentum")}
            return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):  # pycls
            state = self._torch_load(filename).get("model_state")
            if not isinstance(state, dict):
                raise ValueError(f"{self.source}: {filename} has no 'model_state' (pycls format)")
            return {"model": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # .pth: through _torch_load, URL queries honoured

    def _torch_load(self, f):
        loaded = load_weights_file(f, self.source)
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.source}: {f} holds no state_dict")
        return loaded

    def _load_model(self, checkpoint):
        model_keys = set(self.model.state_dict())
        checkpoint_keys = {k.removeprefix("module.") for k in checkpoint["model"]}
        if not checkpoint.get("matching_heuristics") and not model_keys & checkpoint_keys:
            raise ValueError(
                f"{self.source}: {self._path} is a checkpoint of another architecture: none of "
                f"its {len(checkpoint_keys)} tensors (e.g. {sorted(checkpoint_keys)[:2]}) is a "
                f"parameter of {type(self.model).__name__}")
        incompatible = super()._load_model(checkpoint)
        # Another number of classes only changes the classifier, which is then trained afresh
        # (fine-tuning, as in Detectron2); any other shape means another model.
        wrong = [f"{k}: checkpoint {c}, model {m}" for k, c, m in incompatible.incorrect_shapes
                 if ".cls_score." not in f".{k}"]
        if wrong:
            raise ValueError(
                f"{self.source}: {self._path} does not fit this model (another width or "
                f"architecture?): {len(wrong)} tensors of another shape, e.g. {wrong[:3]}")
        # Learnt weights named first: they say which model the checkpoint lacks better than
        # buffers (the teacher's per-branch BatchNorm statistics) do.
        learnt = dict(self.model.named_parameters())
        missing = sorted(set(incompatible.missing_keys)
                         | {k for k, _, _ in incompatible.incorrect_shapes},
                         key=lambda k: (k not in learnt, k))
        if self.complete and missing:
            raise ValueError(
                f"{self.source}: {self._path} lacks {len(missing)} parameters of "
                f"{type(self.model).__name__} (e.g. {missing[:3]}), which would run with "
                "random values: it is a checkpoint of another model or number of classes (a "
                "student's checkpoint never holds its teacher: use the teacher's own)")
        return incompatible
