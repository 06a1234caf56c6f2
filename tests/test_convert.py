"""VOC and YOLO labels to COCO (msad.data.label_formats, tools/convert_dataset.py), on hand-made files."""
import json

import numpy as np
import pytest
from PIL import Image

from helpers import tool
from msad.data.label_formats import voc_to_coco, yolo_to_coco

convert_dataset = tool("convert_dataset")

VOC_XML = """<annotation>
  <filename>{filename}</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
  <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def write_image(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


@pytest.fixture
def voc(tmp_path):
    """A VOC layout: 000001 (a cat, a difficult dog; <size> says 0, as hand-made files often
    do), 000002 (no object; its <filename> has the wrong extension)."""
    root = tmp_path / "VOC"
    write_image(root / "JPEGImages" / "000001.jpg", 40, 30)
    write_image(root / "JPEGImages" / "000002.jpg", 50, 20)
    objects = [VOC_OBJECT.format(name="cat", difficult=0, x0=1, y0=1, x1=10, y1=20),
               VOC_OBJECT.format(name="dog", difficult=1, x0=5, y0=6, x1=40, y1=30)]
    (root / "Annotations").mkdir()
    (root / "Annotations" / "000001.xml").write_text(VOC_XML.format(
        filename="000001.jpg", width=0, height=0, objects="\n".join(objects)))
    (root / "Annotations" / "000002.xml").write_text(VOC_XML.format(
        filename="000002.png", width=50, height=20, objects=""))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    return root


def test_voc_boxes_are_what_detectron2s_own_voc_loader_reads(voc):
    """1-based inclusive corners: (1, 1, 10, 20) covers pixels 0-9 x 0-19, a 10 x 20 box."""
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    from detectron2.structures import BoxMode

    coco = voc_to_coco(str(voc / "Annotations"), str(voc / "JPEGImages"))
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        ("000001.jpg", 40, 30), ("000002.jpg", 50, 20)]
    cat, dog = coco["annotations"]
    assert cat["bbox"] == [0, 0, 10, 20] and cat["category_id"] == 1 and cat["iscrowd"] == 0
    assert dog["iscrowd"] == 1  # difficult: ignored in training and evaluation, as VOC does
    theirs = load_voc_instances(str(voc), "train", ["cat", "dog"])
    for ours, their in zip(coco["annotations"], theirs[0]["annotations"]):
        xyxy = BoxMode.convert(ours["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        assert xyxy == pytest.approx(their["bbox"]) and ours["category_id"] - 1 == their["category_id"]


def test_voc_options_and_errors(voc):
    coco = voc_to_coco(str(voc / "Annotations"), str(voc / "JPEGImages"), ["dog", "cat", "bird"],
                       keep_difficult=True)
    assert [c["name"] for c in coco["categories"]] == ["dog", "cat", "bird"]
    assert [(a["category_id"], a["iscrowd"]) for a in coco["annotations"]] == [(2, 0), (1, 0)]
    with pytest.raises(ValueError, match=r"000001.xml: class 'dog' is not one of \['cat'\]"):
        voc_to_coco(str(voc / "Annotations"), str(voc / "JPEGImages"), ["cat"])
    (voc / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.xml: no image 000002.png"):
        voc_to_coco(str(voc / "Annotations"), str(voc / "JPEGImages"))


@pytest.fixture
def yolo(tmp_path):
    """A YOLO layout: a.jpg (two boxes), b.jpg (an empty label file), sub/c.png (no label
    file), and data.yaml naming the classes as {index: name}."""
    root = tmp_path / "yolo"
    write_image(root / "images" / "a.jpg", 40, 30)
    write_image(root / "images" / "b.jpg", 64, 64)
    write_image(root / "images" / "sub" / "c.png", 20, 10)
    (root / "labels" / "sub").mkdir(parents=True)
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.125 0.2 0.25 0.4\n\n")
    (root / "labels" / "b.txt").write_text("")
    (root / "data.yaml").write_text("names:\n  0: person\n  1: car\n")
    return root


def test_yolo_boxes_are_the_normalised_centres_times_the_image_size(yolo):
    coco = yolo_to_coco(str(yolo / "labels"), str(yolo / "images"), ["person", "car"])
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        ("a.jpg", 40, 30), ("b.jpg", 64, 64), ("sub/c.png", 20, 10)]
    person, car = coco["annotations"]
    assert person["bbox"] == pytest.approx([10, 7.5, 20, 15]) and person["category_id"] == 1
    assert car["bbox"] == pytest.approx([0, 0, 10, 12]) and car["category_id"] == 2
    assert {a["image_id"] for a in coco["annotations"]} == {1}  # b and c: no boxes, still images


@pytest.mark.parametrize("line, message", [
    ("2 0.5 0.5 0.1 0.1", r"a.txt:1: class 2 is not an index of the 2 names"),
    ("0 0.5 0.5 0.1", r"a.txt:1: expected 'class cx cy w h'"),
    ("0 20 15 10 10", r"a.txt:1: .* is not normalised to \[0, 1\]"),
])
def test_yolo_errors_name_the_file_and_line(yolo, line, message):
    (yolo / "labels" / "a.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        yolo_to_coco(str(yolo / "labels"), str(yolo / "images"), ["person", "car"])


def test_the_tool_writes_a_json_the_trainers_read_and_never_overwrites_one(yolo, capsys):
    from msad.data.coco import load_coco_checked

    out = yolo / "train.json"
    args = ["yolo", "--labels", str(yolo / "labels"), "--images", str(yolo / "images"),
            "--classes-file", str(yolo / "data.yaml"), "--output", str(out)]
    convert_dataset.main(args)
    assert "3 images (2 without labels), 2 boxes" in capsys.readouterr().out
    records = load_coco_checked(str(out), str(yolo / "images"), "yolo_test")
    assert [len(r["annotations"]) for r in records] == [2, 0, 0]
    assert records[2]["file_name"] == str(yolo / "images" / "sub" / "c.png")
    before = out.read_text()
    with pytest.raises(SystemExit, match=f"--output {out} exists"):
        convert_dataset.main(args)
    assert out.read_text() == before and json.loads(before)["categories"][1]["name"] == "car"
