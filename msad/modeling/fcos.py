"""The FCOS base of every msad detector: one forward, on the full-resolution grid for every input.

Detectron2's ``FCOS`` brings the target assignment (sizes of interest 4x-8x stride per level,
centre sampling), focal + GIoU + centerness losses and box decoding.  What this module adds:

* ``AlignedFCOS``: one ``forward`` for every msad detector, whose branches (msad/modeling/alignment.py)
  see the padded batch at their factors and read their levels in their own terms, while the head
  and the anchors live on one grid at the full-resolution strides, so targets and predictions
  are in the original image's pixels whatever the input scale.  Subclasses fill in named
  extension points: ``branch_input`` (ThumbDet's learned thumbnail), ``head_features`` (the
  teacher's fusion), ``detection_losses`` (the teacher's three branches) and ``extra_losses``
  (distillation, image statistics).
* ``ScaledFCOSHead``: a learnable scale per level on the box regression (official FCOS).
* Test-time filtering on the class probability alone, ranking by sqrt(class x centerness) (or
  by the product, as the official MSAD code: ``MODEL.FCOS.TOPK_RANKING``).
* ``SingleScaleFCOS``: the HR baseline, the low-resolution baseline and the bicubic-thumbnail
  baseline: one branch, at ``MODEL.FCOS.INPUT_FACTOR``.
"""
from typing import Dict, List, NamedTuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, ImageList
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss
from torch import nn

from ..config import check_choice
from .alignment import (Branch, INPUT_SCALES, check_levels, level_index, level_shift,
                        normalize_and_pad, padded_size, padding_multiple)
from .resample import check_resample, downsample


# What the per-level test-time top-k is taken on (MODEL.FCOS.TOPK_RANKING).
TOPK_RANKINGS = ("score", "product")
# How the box loss weighs the positive locations (MODEL.FCOS.BOX_LOSS_WEIGHTING).
BOX_LOSS_WEIGHTINGS = ("uniform", "centerness")
# MODEL.FCOS keys that are AlignedFCOS arguments of the same name in lower case, and the
# test-time ones Detectron2's FCOS names test_*.
FCOS_ARGUMENT_KEYS = ("INPUT_RESAMPLE", "SIZE_DIVISIBILITY", "INPUT_SCALE", "NUM_CLASSES",
                      "CENTER_SAMPLING_RADIUS", "FOCAL_LOSS_ALPHA", "FOCAL_LOSS_GAMMA",
                      "TOPK_RANKING", "BOX_LOSS_WEIGHTING")
FCOS_TEST_KEYS = {"test_score_thresh": "SCORE_THRESH_TEST",
                  "test_topk_candidates": "TOPK_CANDIDATES_TEST",
                  "test_nms_thresh": "NMS_THRESH_TEST"}


def sum_over_processes(value: float, device) -> float:
    """`value` summed over the processes of a distributed run (itself in a single process)."""
    if comm.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item()


class ScaledFCOSHead(FCOSHead):
    """Detectron2's FCOS head with one learnable scalar per level on the box regression."""

    def __init__(self, *, input_shape, conv_dims, **kwargs):
        super().__init__(input_shape=input_shape, conv_dims=conv_dims, **kwargs)
        self.scales = nn.Parameter(torch.ones(len(input_shape)))

    def forward(self, features):
        logits, bbox_reg, ctrness = super().forward(features)
        return logits, [r * self.scales[i] for i, r in enumerate(bbox_reg)], ctrness


def build_fcos_head(cfg, input_shapes):
    return ScaledFCOSHead(
        input_shape=input_shapes,
        conv_dims=[input_shapes[0].channels] * cfg.MODEL.FCOS.NUM_CONVS,
        num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
        norm=cfg.MODEL.FCOS.NORM,
        prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
    )


def input_branch(cfg) -> Branch:
    """The detector's own input, from MODEL.FCOS: its factor and the levels its head reads."""
    spec = cfg.MODEL.FCOS
    level_shift(spec.INPUT_FACTOR)  # a power of two
    for name in spec.IN_FEATURES:
        level_index(name)
    return Branch(spec.INPUT_FACTOR, tuple(spec.IN_FEATURES))


class Features(NamedTuple):
    """What the backbone side of one forward produced."""

    inputs: List[torch.Tensor]  # each branch's backbone input (normalised, padded)
    branch_levels: List[List[torch.Tensor]]  # each branch's levels
    head_in: List[torch.Tensor]  # the levels the head reads


class AlignedFCOS(FCOS):
    """FCOS on one or more branches of the padded batch, on the full-resolution anchor grid.

    Args:
        backbone, head: as Detectron2's ``FCOS`` (the head runs on ``branches[0].levels``).
        branches: the inputs the model sees (msad/modeling/alignment.py ``Branch``): factor and levels in
            the input's own terms.  The first one's levels are what the head reads, on the
            full-resolution grid of its ``full_resolution_levels``; the others align with it.
        input_resample: how a branch's 1/factor copy of the padded batch is made.
        size_divisibility: the padding multiple; 0 = what the branches' levels need.
        input_scale: "full": given full-resolution images; "low" (inference, one branch at
            factor f > 1): given images already 1/f of that, read as they are.
        **fcos_kwargs: Detectron2's ``FCOS`` arguments (classes, losses, test settings, pixel
            mean/std).
    """

    @configurable
    def __init__(self, *, backbone, head, branches: List[Branch], input_resample: str,
                 size_divisibility: int = 0, input_scale: str = "full", topk_ranking="score",
                 box_loss_weighting="uniform", **fcos_kwargs):
        shapes = backbone.output_shape()
        for branch in branches:
            check_levels(branch, shapes)
        strides = {name: s.stride for name, s in shapes.items()}
        divisibility = padding_multiple(size_divisibility, branches, strides)
        unused = sorted(set(shapes) - {name for b in branches for name in b.levels})
        if unused:
            raise ValueError(
                f"the backbone computes levels {unused} that no branch uses, so their parameters "
                "would get no gradient (and DDP would need find_unused_parameters): adjust "
                "MODEL.FPN.IN_FEATURES / MODEL.FPN.NUM_TOP_LEVELS")
        check_resample(input_resample)
        check_choice("MODEL.FCOS.TOPK_RANKING", topk_ranking, TOPK_RANKINGS)
        check_choice("MODEL.FCOS.BOX_LOSS_WEIGHTING", box_loss_weighting, BOX_LOSS_WEIGHTINGS)
        check_choice("MODEL.FCOS.INPUT_SCALE", input_scale, INPUT_SCALES)
        if input_scale == "low" and (len(branches) != 1 or branches[0].factor == 1):
            raise ValueError(
                "MODEL.FCOS.INPUT_SCALE 'low' gives the detector an image that is already "
                "1/MODEL.FCOS.INPUT_FACTOR of the full one: it needs one input with "
                f"INPUT_FACTOR > 1, and this model reads {len(branches)} input(s) at factors "
                f"{[b.factor for b in branches]}")
        super().__init__(backbone=backbone, head=head, head_in_features=list(branches[0].levels),
                         **fcos_kwargs)
        self.branches = [Branch(b.factor, tuple(b.levels)) for b in branches]
        self.full_resolution_levels = self.branches[0].full_resolution_levels
        self.input_resample, self.size_divisibility = input_resample, divisibility
        self.topk_ranking, self.box_loss_weighting = topk_ranking, box_loss_weighting
        # How much smaller than the full resolution the given images are: 1, or the factor of
        # the one branch when it is given low-resolution images.
        self.given_factor = self.branches[0].factor if input_scale == "low" else 1
        self._ema_steps: Dict[str, int] = {}
        # One anchor grid for every branch: the full-resolution strides.
        grid = self.branches[0].strides(strides)
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in grid], aspect_ratios=[1.0], strides=grid)

    @classmethod
    def from_config(cls, cfg):
        return cls.fcos_kwargs_from_config(cfg, build_backbone(cfg), [input_branch(cfg)])

    @classmethod
    def fcos_kwargs_from_config(cls, cfg, backbone, branches):
        """Arguments common to every FCOS of this project, from MODEL.FCOS."""
        shapes = backbone.output_shape()
        check_levels(branches[0], shapes)
        spec = cfg.MODEL.FCOS
        return dict(
            backbone=backbone,
            head=build_fcos_head(cfg, [shapes[name] for name in branches[0].levels]),
            branches=branches,
            **{key.lower(): spec.get(key) for key in FCOS_ARGUMENT_KEYS},
            **{argument: spec.get(key) for argument, key in FCOS_TEST_KEYS.items()},
            max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )

    # ---- the one forward ---------------------------------------------------------------------
    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        features = self.extract(images)
        predictions = self.head(features.head_in)
        if not self.training:
            results = self.forward_inference(images, features.head_in, predictions)
            return self.postprocess(results, batched_inputs, images.image_sizes)
        if self.given_factor > 1:
            raise RuntimeError("MODEL.FCOS.INPUT_SCALE 'low' is for inference: train with 'full'")
        losses = self.detection_losses(images, features, predictions,
                                       self.gt_instances(batched_inputs))
        losses.update(self.extra_losses(batched_inputs, images, features, predictions))
        self.record_diagnostics(features, losses)
        return losses

    def padding(self) -> int:
        """The multiple this model pads its given batch to now."""
        return self.size_divisibility // self.given_factor

    def preprocess_image(self, batched_inputs, size_divisibility=None):
        """Normalised batch, padded to `size_divisibility` (default: ``padding()``)."""
        images = [self._move_to_current_device(x["image"]) for x in batched_inputs]
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std,
                                 size_divisibility or self.padding())

    def extract(self, images: ImageList) -> Features:
        """Every branch's input and levels, and the levels the head reads."""
        inputs = [self.branch_input(images, branch) for branch in self.branches]
        levels = []
        for index, (x, branch) in enumerate(zip(inputs, self.branches)):
            features = self.branch_backbone(x, index)
            levels.append([features[name] for name in branch.levels])
        return Features(inputs, levels, self.head_features(levels))

    # ---- extension points --------------------------------------------------------------------
    def branch_input(self, images: ImageList, branch: Branch) -> torch.Tensor:
        """What the backbone of `branch` sees: the 1/factor copy of the padded batch (the given
        batch itself when it is already that small)."""
        return downsample(images.tensor, branch.factor // self.given_factor, self.input_resample)

    def branch_backbone(self, x: torch.Tensor, index: int) -> Dict[str, torch.Tensor]:
        """The backbone's levels for the input of branch `index`."""
        return self.backbone(x)

    def head_features(self, branch_levels: List[List[torch.Tensor]]) -> List[torch.Tensor]:
        """The levels the head reads, from every branch's levels: here the first branch's."""
        return branch_levels[0]

    def detection_losses(self, images, features: Features, predictions, gt_instances):
        """FCOS losses of the head's predictions."""
        return self.forward_training(images, features.head_in, predictions, gt_instances)

    def extra_losses(self, batched_inputs, images, features: Features, predictions):
        """Losses beyond detection (distillation, image statistics): none here."""
        return {}

    def record_diagnostics(self, features: Features, losses: Dict[str, torch.Tensor]):
        """Training diagnostics of one step, for the event storage (metrics.json): none here."""

    def weights_for_student(self) -> Dict[str, torch.Tensor]:
        """The tensors a student started from this model copies (MODEL.TEACHER.INIT_STUDENT)."""
        return self.state_dict()

    # ---- shared pieces -----------------------------------------------------------------------
    def branch_input_sizes(self, image_size):
        """(H, W) of every branch's backbone input for one given image of `image_size` at
        inference."""
        h, w = padded_size(image_size, self.padding())
        g = self.given_factor
        return [(h * g // b.factor, w * g // b.factor) for b in self.branches]

    def gt_instances(self, batched_inputs):
        if "instances" not in batched_inputs[0]:
            raise ValueError("training needs 'instances' in every input dict")
        return [x["instances"].to(self.device) for x in batched_inputs]

    def branch_losses(self, predictions, anchors, gt_labels, gt_boxes, prefix, weight=1.0):
        """FCOS losses of one branch, named loss_{prefix}_{cls,loc,ctr}."""
        logits, deltas, ctrness = self.per_location(predictions)
        losses = self.losses(anchors, logits, gt_labels, deltas, gt_boxes, ctrness)
        return {k.replace("loss_fcos", f"loss_{prefix}"): v * weight for k, v in losses.items()}

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes,
               pred_centerness):
        """Detectron2's FCOS losses; with ``box_loss_weighting`` "centerness", the official box
        loss instead: sum of centerness target x GIoU loss over the positives, divided by the sum
        of those targets (averaged over processes, as the official code does)."""
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes,
                                pred_centerness)
        if self.box_loss_weighting == "uniform":
            return losses
        labels = torch.stack(gt_labels)
        positive = (labels >= 0) & (labels != self.num_classes)
        weights = self.compute_ctrness_targets(anchors, gt_boxes)[positive]
        grid = Boxes.cat(anchors).tensor
        predicted = torch.stack([self.box2box_transform.apply_deltas(d, grid)
                                 for d in torch.cat(pred_anchor_deltas, dim=1)])
        giou = giou_loss(predicted[positive], torch.stack(gt_boxes)[positive], reduction="none")
        total = sum_over_processes(weights.sum().item(), self.device) / comm.get_world_size()
        losses["loss_fcos_loc"] = (giou * weights).sum() / max(total, 1e-6)
        return losses

    def per_location(self, predictions):
        """The head's (logits, box deltas, centerness) maps of each level, (N, K, H, W), as
        (N, H*W, K): one row per location, as Detectron2's losses and decoding take them."""
        return [[permute_to_N_HWA_K(x, k) for x in maps]
                for maps, k in zip(predictions, (self.num_classes, 4, 1))]

    def _ema_update(self, name, value, initial_value, momentum=0.9):
        # A private Detectron2 method (checked against Detectron2 0.7.2; tests/test_upstream.py
        # fails when it changes), overridden because no public hook sets the normaliser.
        # Detectron2 normalises losses by an EMA of the positive count, updated at each call of
        # `losses`.  Branches of one step (HR, LR, fused) see the same targets, so they share
        # one normaliser: the EMA moves once per training iteration.  Across processes the
        # count is summed and the normaliser divided by their number (Detectron2 keeps one EMA
        # per process from a start value that does not scale), so the loss and its gradient do
        # not depend on how the batch is split (up to Detectron2 counting at least 1 per process).
        step = get_event_storage().iter
        if self._ema_steps.get(name) != step:
            self._ema_steps[name] = step
            super()._ema_update(name, sum_over_processes(value, self.device), initial_value,
                                momentum)
        return getattr(self, name) / comm.get_world_size()

    def forward_inference(self, images, features, predictions):
        logits, deltas, ctrness = self.per_location(predictions)
        anchors = self.anchor_generator(features)
        results = []
        for i, (h, w) in enumerate(images.image_sizes):
            image_size = (h * self.given_factor, w * self.given_factor)  # full-resolution pixels
            ranks = []
            for cls_logits, ctr_logits in zip(logits, ctrness):
                prob = cls_logits[i].sigmoid()
                rank = prob * ctr_logits[i].sigmoid()
                if self.topk_ranking == "score":
                    rank = torch.sqrt(rank)
                # Threshold on the class probability; zeroed ranks are dropped by decoding.
                ranks.append(torch.where(prob > self.test_score_thresh, rank,
                                         torch.zeros_like(rank)))
            # Private (checked against Detectron2 0.7.2; tests/test_upstream.py fails when it
            # changes): Detectron2's per-level top-k and box decoding, reused.
            pred = self._decode_multi_level_predictions(
                anchors, ranks, [d[i] for d in deltas], 0.0, self.test_topk_candidates,
                image_size)
            if self.topk_ranking == "product":
                pred.scores = torch.sqrt(pred.scores)
            keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes,
                               self.test_nms_thresh)
            results.append(pred[keep[: self.max_detections_per_image]])
        return results

    @staticmethod
    def postprocess(results, batched_inputs, image_sizes):
        """Every image's detections, rescaled to its own requested height/width (default: the
        size it was given at)."""
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed


@META_ARCH_REGISTRY.register()
class SingleScaleFCOS(AlignedFCOS):
    """One FCOS on one input: the full image (``MODEL.FCOS.INPUT_FACTOR 1``, the HR baseline) or
    its 1/f copy made by ``MODEL.FCOS.INPUT_RESAMPLE`` (the LR baseline with nearest, the
    bicubic-thumbnail baseline with bicubic), predicting boxes in full-image pixels."""
