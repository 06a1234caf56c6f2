"""Datasets: the bundled synthetic scenes, COCO-format files, VOC and YOLO labels converted,
and the checks every record and image passes before training."""
