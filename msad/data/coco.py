"""COCO-format instance files registered with Detectron2, their errors naming the file:
the bundled splits and every ``[name, json_file, image_root]`` of ``DATASETS.COCO_INSTANCES``;
and detections written as COCO results."""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from ..checkpoint.model_info import dataset_id_list


def load_coco_checked(json_file, image_root, name):
    """Detectron2's ``load_coco_json``, with a malformed file named in the error."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset {name}: no such file {json_file}")
    try:
        records = load_coco_json(json_file, image_root, name)
    # JSONDecodeError is a ValueError; pycocotools and load_coco_json assert on bad structure.
    except (ValueError, KeyError, TypeError, IndexError, AssertionError) as e:
        raise ValueError(f"dataset {name}: {json_file} is not a COCO instances file: "
                         f"{type(e).__name__}: {e}") from e
    if not records:  # pycocotools reads a file without "images" as an empty dataset
        with open(json_file) as f:
            if not isinstance(json.load(f).get("images"), list):
                raise ValueError(f"dataset {name}: {json_file} is not a COCO instances file: "
                                 "it has no 'images' list")
    return records


def register_coco_checked(name, json_file, image_root):
    """``register_coco_instances`` for a COCO-format file, loaded by :func:`load_coco_checked`."""
    DatasetCatalog.register(name, lambda: load_coco_checked(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  evaluator_type="coco")


def check_coco_instances_entry(entry):
    """One ``[name, json_file, image_root]`` of ``DATASETS.COCO_INSTANCES``, checked."""
    if len(entry) != 3:
        raise ValueError(f"DATASETS.COCO_INSTANCES entry {entry!r} must be "
                         "[name, json_file, image_root]")
    name, json_file, image_root = entry
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"DATASETS.COCO_INSTANCES: {name}: no such file {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"DATASETS.COCO_INSTANCES: {name}: no such directory {image_root}")
    return entry


def register_coco_from_config(cfg):
    """Register every ``[name, json_file, image_root]`` of ``DATASETS.COCO_INSTANCES``; a name
    registered before (by an earlier config in this process) with other files is replaced."""
    for entry in cfg.DATASETS.COCO_INSTANCES:
        name, json_file, image_root = check_coco_instances_entry(entry)
        if name in DatasetCatalog.list():
            metadata = MetadataCatalog.get(name)
            if (metadata.get("json_file"), metadata.get("image_root")) == (json_file, image_root):
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_checked(name, json_file, image_root)


def coco_results(instances, metadata, **where):
    """COCO-results entries of `instances`: box [x, y, w, h] in the input's pixels; category_id
    is the dataset's id when the model knows it, else the class index."""
    dataset_ids = dataset_id_list(metadata)
    entries = []
    for (x0, y0, x1, y1), score, cls in zip(instances.pred_boxes.tensor.tolist(),
                                            instances.scores.tolist(),
                                            instances.pred_classes.tolist()):
        entries.append({**where, "category_id": dataset_ids[cls] if dataset_ids else cls,
                        "category_name": metadata.thing_classes[cls],
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return entries
