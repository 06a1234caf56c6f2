"""Pascal VOC and YOLO detection labels as COCO instances (what the trainers read).

Both return a COCO dict: ``images`` (file names relative to the image folder, sizes), ``annotations``
(``bbox`` [x, y, w, h] in pixels, ``iscrowd``) and ``categories`` (ids 1..K in the order of the
class names).  Images without labels are kept, with no annotation.  Errors name the file (and
line) they are about.

* VOC: one XML per image; corner coordinates are 1-based and inclusive, so a box
  (xmin, ymin, xmax, ymax) covers the pixels xmin-1 .. xmax-1: x = xmin - 1, w = xmax - xmin + 1.
  Objects flagged ``difficult`` become ``iscrowd`` 1, which Detectron2 leaves out of training and
  COCO evaluation ignores, as VOC's own evaluation does (``keep_difficult`` makes them ordinary).
* YOLO: one ``.txt`` per image, lines ``class cx cy w h`` with the centre and size normalised by
  the image's width and height; class indices are 0-based.
"""
import json
import os
import xml.etree.ElementTree as ET

from ..utils.io import write_atomically
from .input_checks import upright_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(image_dir):
    """The images of a folder and its sub-folders, as paths relative to it, sorted."""
    found = []
    for root, _, names in os.walk(image_dir):
        found += [os.path.relpath(os.path.join(root, n), image_dir) for n in names
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def image_size(path):
    """(width, height) of an image file after its EXIF rotation; the error names the file."""
    try:
        return upright_size(path)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def coco_dict(records, classes):
    """COCO instances from [(file name, width, height, [(class index, [x, y, w, h], iscrowd)])]."""
    images, annotations = [], []
    for image_id, (file_name, width, height, boxes) in enumerate(records, 1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for cls, (x, y, w, h), crowd in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cls + 1, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": int(crowd)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}


def _text(node, tag, where):
    found = node.find(tag)
    if found is None or found.text is None:
        raise ValueError(f"{where}: no <{tag}>")
    return found.text.strip()


def _voc_image(xml_path, root, image_dir):
    """The image an annotation is about: its <filename> (the extension is often wrong or
    missing), else an image of the XML's own name."""
    named = root.findtext("filename", "").strip()
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    candidates = [named] if named else []
    candidates += [os.path.splitext(c)[0] + ext for c in (named or stem, stem)
                   for ext in IMAGE_EXTENSIONS if c]
    for candidate in candidates:
        if os.path.isfile(os.path.join(image_dir, candidate)):
            return candidate
    raise FileNotFoundError(f"{xml_path}: no image {named or stem} (any of "
                            f"{IMAGE_EXTENSIONS}) in {image_dir}")


def found(folder, files, what):
    """`files` found in `folder`; none is an error naming the folder and `what` was looked for."""
    if not files:
        raise FileNotFoundError(f"{folder}: no {what}")
    return files


def voc_to_coco(annotation_dir, image_dir, classes=None, keep_difficult=False):
    """COCO instances of a folder of VOC XML files; `classes` (default: the names found,
    sorted) fixes the category order."""
    xml_files = found(annotation_dir, sorted(f for f in os.listdir(annotation_dir)
                                             if f.lower().endswith(".xml")), ".xml annotation file")
    parsed = []
    for name in xml_files:
        path = os.path.join(annotation_dir, name)
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{path} is not an XML file: {e}") from e
        file_name = _voc_image(path, root, image_dir)
        size = root.find("size")
        width, height = (int(float((size.findtext(k) if size is not None else None) or 0))
                         for k in ("width", "height"))
        if not width or not height:  # often 0 in hand-made files: the image knows
            width, height = image_size(os.path.join(image_dir, file_name))
        objects = []
        for obj in root.iter("object"):
            label = _text(obj, "name", path)
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"{path}: object {label!r} has no <bndbox>")
            x0, y0, x1, y1 = (float(_text(box, k, f"{path}: object {label!r}"))
                              for k in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.findtext("difficult", "0").strip() == "1"
            objects.append((label, [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
                            difficult and not keep_difficult))
        parsed.append((path, file_name, width, height, objects))
    names = list(classes) if classes else sorted({o[0] for *_, objs in parsed for o in objs})
    records = []
    for path, file_name, width, height, objects in parsed:
        boxes = []
        for label, box, crowd in objects:
            if label not in names:
                raise ValueError(f"{path}: class {label!r} is not one of {names}")
            boxes.append((names.index(label), box, crowd))
        records.append((file_name, width, height, boxes))
    return coco_dict(records, names)


def read_class_names(path):
    """Class names from a text file (one per line) or a YOLO data.yaml (``names:`` as a list or
    as {index: name})."""
    if path.endswith((".yaml", ".yml")):
        import yaml

        with open(path) as f:
            names = (yaml.safe_load(f) or {}).get("names")
        if isinstance(names, dict):
            names = [names[i] for i in sorted(names)]
        if not isinstance(names, list) or not names:
            raise ValueError(f"{path}: no 'names' list")
        return [str(n) for n in names]
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class name")
    return names


def yolo_to_coco(label_dir, image_dir, classes):
    """COCO instances of YOLO labels: every image of `image_dir`, with the boxes of
    `label_dir`/<same relative path>.txt (none if there is no such file)."""
    images = found(image_dir, image_files(image_dir), "image file")
    records = []
    for file_name in images:
        width, height = image_size(os.path.join(image_dir, file_name))
        label_path = os.path.join(label_dir, os.path.splitext(file_name)[0] + ".txt")
        boxes = []
        if os.path.isfile(label_path):
            with open(label_path) as f:
                lines = f.read().splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{label_path}:{number}"
                values = line.split()
                if len(values) != 5:
                    raise ValueError(f"{where}: expected 'class cx cy w h', got {line!r} "
                                     "(segmentation polygons are not detection labels)")
                try:
                    cls, cx, cy, w, h = int(values[0]), *map(float, values[1:])
                except ValueError:
                    raise ValueError(f"{where}: not numbers: {line!r}") from None
                if not 0 <= cls < len(classes):
                    raise ValueError(f"{where}: class {cls} is not an index of the "
                                     f"{len(classes)} names {classes}")
                if max(cx, cy, w, h) > 1.5:
                    raise ValueError(f"{where}: {line!r} is not normalised to [0, 1] by the "
                                     f"image size ({width}x{height})")
                boxes.append((cls, [(cx - w / 2) * width, (cy - h / 2) * height,
                                    w * width, h * height], False))
        records.append((file_name, width, height, boxes))
    return coco_dict(records, classes)


def label_format(labels):
    """'coco', 'voc' or 'yolo': a .json file, a folder of .xml files, a folder of .txt files."""
    if os.path.isfile(labels) and labels.lower().endswith(".json"):
        return "coco"
    if os.path.isdir(labels):
        for _, _, names in os.walk(labels):
            extensions = {os.path.splitext(n)[1].lower() for n in names}
            if ".xml" in extensions:
                return "voc"
            if ".txt" in extensions:
                return "yolo"
    raise ValueError(f"{labels}: neither a COCO .json file nor a folder of VOC .xml or YOLO .txt "
                     "labels")


def to_coco_file(labels, image_dir, output, classes=None):
    """The COCO JSON of `labels` (returned as it is when it is one; VOC and YOLO labels are
    converted and written to `output`).  `classes`: names in order, or a file of them."""
    kind = label_format(labels)
    if kind == "coco":
        return labels
    if isinstance(classes, str):
        classes = read_class_names(classes)
    if kind == "voc":
        coco = voc_to_coco(labels, image_dir, classes)
    elif not classes:
        raise ValueError(f"{labels}: YOLO labels need the class names (--classes or "
                         "--classes-file)")
    else:
        coco = yolo_to_coco(labels, image_dir, classes)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_atomically(output, "w", lambda f: json.dump(coco, f))
    return output
