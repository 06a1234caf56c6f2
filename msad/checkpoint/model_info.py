"""``model_info.json``: the facts kept beside a checkpoint, so that it runs without its training data.

Training writes it into OUTPUT_DIR, beside the checkpoints: the class names (and their ids in the
dataset's files) and the config values the weights were trained with that inference depends on.
Whoever loads the weights (``msad.Predictor``, a frozen teacher, the exporter) reads it from the
weights' folder: a config that disagrees with it on what the weights mean (input format, pixel
statistics, factor, number of classes, architecture) is refused rather than run to give wrong boxes.
"""
import functools
import json
import logging
import os

from ..utils.io import write_atomically

logger = logging.getLogger(__name__)

MODEL_INFO = "model_info.json"
# Config values inference depends on.  A config that disagrees with the weights on these runs
# but gives wrong detections: refused.
MUST_MATCH = ("MODEL.META_ARCHITECTURE", "MODEL.FCOS.NUM_CLASSES", "MODEL.FCOS.INPUT_FACTOR",
              "INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD")
# ... and on these it may differ on purpose (another test size, another camera): logged.
MAY_DIFFER = ("MODEL.FCOS.INPUT_RESAMPLE", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST")


def config_value(cfg, key):
    """The value of a dotted config key, as JSON stores it (tuples become lists)."""
    return json.loads(json.dumps(functools.reduce(getattr, key.split("."), cfg)))


def dataset_id_list(metadata):
    """Class index -> the dataset's category id, as a list (None where the metadata has none)."""
    ids = metadata.get("thing_dataset_id_to_contiguous_id")
    return None if ids is None else [k for k, _ in sorted(ids.items(), key=lambda kv: kv[1])]


def dataset_id_mapping(ids):
    """The inverse of ``dataset_id_list``: Detectron2's thing_dataset_id_to_contiguous_id."""
    return ids and {k: i for i, k in enumerate(ids)}


def write_model_info(cfg, metadata):
    """Write OUTPUT_DIR/model_info.json for the model `cfg` trains on the dataset of `metadata`
    (Detectron2's: its class names and their ids in the dataset's files, where it has them)."""
    info = {"thing_classes": metadata.get("thing_classes"),
            # class index -> the dataset's category id, for COCO-format results
            "thing_dataset_ids": dataset_id_list(metadata),
            "config": {key: config_value(cfg, key) for key in MUST_MATCH + MAY_DIFFER}}
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_atomically(os.path.join(cfg.OUTPUT_DIR, MODEL_INFO), "w",
                     lambda f: json.dump(info, f, indent=2))


def read_model_info(weights):
    """(path, contents) of the model_info.json beside `weights`; (path, None) if there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), MODEL_INFO)
    if not os.path.isfile(path):
        return path, None
    try:
        with open(path) as f:
            info = json.load(f)
        return path, {"thing_classes": info["thing_classes"],
                      "thing_dataset_ids": info.get("thing_dataset_ids"),
                      "config": dict(info["config"])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a model_info.json written by msad's training: "
                         f"{type(e).__name__}: {e}") from e


def check_model_info(cfg, info, path):
    """Refuse a config that disagrees with the one the weights were trained with (`info`, read
    from `path`) on what the weights mean; log where it differs on purpose."""
    trained = info["config"]
    wrong = [f"{key} {config_value(cfg, key)!r} (trained with {trained[key]!r})"
             for key in MUST_MATCH if key in trained and config_value(cfg, key) != trained[key]]
    if wrong:
        raise ValueError(
            f"the config disagrees with {path}, written when these weights were trained: "
            + "; ".join(wrong) + ". Use the config they were trained with (their OUTPUT_DIR "
            "holds it as config.yaml), or override those keys")
    for key in MAY_DIFFER:
        if key in trained and config_value(cfg, key) != trained[key]:
            logger.info("%s is %r here, %r in training (%s)", key, config_value(cfg, key),
                        trained[key], path)
