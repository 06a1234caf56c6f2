"""The bundled synthetic dataset: deterministic generation and loading through Detectron2."""
import collections
import filecmp
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from msad.data.coco import register_coco_from_config
from msad.data.synthetic import CLASSES, SPLITS, generate_split


# sha256 of the annotations of 6 msad_synth images of seed 5, from the generator of 67ed1f5.
SYNTH_BOXES_SHA256 = "f2721f1274ca62db8ccf036dd8d27f3f6056646fcc051f75d1c4c022d6bf0e3d"


def _generate(root, seed, n=6):
    return generate_split(str(root / "x.json"), str(root / "images"), n, seed)


def test_same_seed_same_bytes(tmp_path):
    _generate(tmp_path / "a", seed=7)
    _generate(tmp_path / "b", seed=7)
    _generate(tmp_path / "c", seed=8)
    files = sorted(os.listdir(tmp_path / "a" / "images"))
    assert len(files) == 6
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "images", tmp_path / "b" / "images",
                                               files, shallow=False)
    assert match == files and not mismatch and not errors
    assert filecmp.cmp(tmp_path / "a" / "x.json", tmp_path / "b" / "x.json", shallow=False)
    assert not filecmp.cmp(tmp_path / "a" / "x.json", tmp_path / "c" / "x.json", shallow=False)


def test_the_bundled_scenes_have_not_changed(tmp_path):
    """The boxes of msad_synth as the version before msad_detail drew them (pixels and JPEG
    bytes depend on OpenCV's version; the boxes only on the random stream and the shapes)."""
    import hashlib

    coco = _generate(tmp_path, seed=5, n=6)
    digest = hashlib.sha256(json.dumps(coco["annotations"], sort_keys=True).encode()).hexdigest()
    assert digest == SYNTH_BOXES_SHA256


def test_boxes_lie_inside_images_and_span_small_to_large(tmp_path):
    coco = _generate(tmp_path, seed=3, n=20)
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    longest = []
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert 1 <= a["category_id"] <= len(CLASSES)
        longest.append(max(w, h))
    longest = np.array(longest)
    # Objects that vanish at 0.25x input, and objects that stay large.
    assert (longest < 16).mean() > 0.15 and longest.max() > 80


@pytest.mark.parametrize("split", [s.name for s in SPLITS])
def test_catalog_loads_bundled_split_with_all_boxes(split):
    dicts = DatasetCatalog.get(f"msad_synth_{split}")
    spec = next(s for s in SPLITS if s.name == split)
    assert len(dicts) == spec.num_images
    from msad.data.synthetic import split_paths

    coco = json.load(open(split_paths(split)[0]))
    want = collections.Counter(a["image_id"] for a in coco["annotations"])
    got = {d["image_id"]: len(d["annotations"]) for d in dicts}
    assert got == {im["id"]: want.get(im["id"], 0) for im in coco["images"]}
    assert sum(got.values()) == len(coco["annotations"]) > spec.num_images


def test_user_coco_dataset_from_config(tmp_path, cfg):
    _generate(tmp_path, seed=1, n=2)
    cfg.DATASETS.COCO_INSTANCES = [["user_set", str(tmp_path / "x.json"), str(tmp_path / "images")]]
    register_coco_from_config(cfg)
    assert len(DatasetCatalog.get("user_set")) == 2
    cfg.DATASETS.COCO_INSTANCES = [["other", str(tmp_path / "missing.json"), str(tmp_path)]]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        register_coco_from_config(cfg)


def test_detail_scenes_are_small_objects_in_pairs_told_apart_by_a_hole(tmp_path):
    from msad.data.synthetic import DETAIL

    coco = generate_split(str(tmp_path / "d.json"), str(tmp_path / "images"), 20, 4, scene=DETAIL)
    again = generate_split(str(tmp_path / "e.json"), str(tmp_path / "images2"), 20, 4, scene=DETAIL)
    assert coco == again
    assert [c["name"] for c in coco["categories"]] == ["disk", "ring", "square", "frame"]
    assert all(112 <= im["height"] <= 128 and 112 <= im["width"] <= 128 for im in coco["images"])
    longest = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert longest.max() <= 41 and np.median(longest) < 32  # every object is "small" for COCO
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4}
    import cv2

    from msad.data.synthetic import _shape_mask

    rng = np.random.default_rng(0)
    ring = _shape_mask(rng, "ring", 30, 64, 64)
    rng = np.random.default_rng(0)
    disk = _shape_mask(rng, "disk", 30, 64, 64)
    rng = np.random.default_rng(0)
    frame = _shape_mask(rng, "frame", 30, 64, 64)
    rng = np.random.default_rng(0)
    square = _shape_mask(rng, "square", 30, 64, 64)
    # The holed shapes are their solid pair with pixels missing inside.
    assert (frame & ~square).sum() == 0 and square.sum() - frame.sum() > 60
    assert ring.sum() < disk.sum() and cv2.connectedComponents((~ring).astype(np.uint8))[0] == 3
    assert DatasetCatalog.get("msad_detail_val")[0]["file_name"].endswith("000001.jpg")
