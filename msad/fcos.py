"""FCOS on Detectron2's own FCOS pieces, on the full-resolution grid for every input scale.

Detectron2's ``FCOS`` brings the target assignment (sizes of interest 4x-8x stride per level,
centre sampling), focal + GIoU + centerness losses and box decoding.  What this module adds:

* ``AlignedFCOS``: images normalised and padded to a multiple of 256; branches that see the
  1/f image read the FPN levels aligned with the full-resolution ones, and all branches share
  one anchor grid at the full-resolution strides, so targets and predictions live in the
  original image's pixels whatever the input scale.
* ``ScaledFCOSHead``: a learnable scale per level on the box regression (official FCOS).
* Test-time filtering on the class probability alone, ranking by sqrt(class x centerness).
* ``SingleScaleFCOS``: the HR baseline and the low-resolution baseline.
"""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.engine import HookBase
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from .alignment import aligned_levels, check_alignment, downsample, normalize_and_pad
from .distill import unwrap


def sum_over_processes(value: float, device) -> float:
    """`value` summed over the processes of a distributed run (itself in a single process)."""
    if comm.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item()


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


class AlignedFCOS(FCOS):
    """FCOS whose branches see the padded batch at factors `factors` (1 = full resolution).

    The branch at factor f reads the backbone levels aligned with ``in_features`` (P(l - log2 f)
    for P(l)); the head and the anchors are those of ``in_features`` at full resolution.
    """

    def __init__(self, *, backbone, head, in_features: List[str], factors: List[int],
                 resample: str, size_divisibility: int, **fcos_kwargs):
        shapes = backbone.output_shape()
        levels = {f: aligned_levels(in_features, f, shapes) for f in factors}
        strides = {name: s.stride for name, s in shapes.items()}
        for f in factors:
            check_alignment(size_divisibility, f, strides, levels[f])
        used = {name for names in levels.values() for name in names}
        unused = sorted(set(shapes) - used)
        if unused:
            raise ValueError(
                f"the backbone computes levels {unused} that no branch uses, so their parameters "
                "would get no gradient (and DDP would need find_unused_parameters): adjust "
                "MODEL.FPN.IN_FEATURES / MODEL.FPN.NUM_TOP_LEVELS")
        super().__init__(backbone=backbone, head=head, head_in_features=levels[factors[0]],
                         **fcos_kwargs)
        self.in_features = list(in_features)
        self.levels: Dict[int, List[str]] = levels
        self.resample = resample
        self.size_divisibility = size_divisibility
        self._ema_steps: Dict[str, int] = {}
        # One anchor grid for every branch: the full-resolution strides.
        hr_strides = [strides[name] * factors[0] for name in levels[factors[0]]]
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in hr_strides], aspect_ratios=[1.0], strides=hr_strides)

    @classmethod
    def fcos_kwargs_from_config(cls, cfg, backbone, head_levels):
        """Arguments common to every FCOS of this project, from the config."""
        shapes = backbone.output_shape()
        return dict(
            backbone=backbone,
            head=build_fcos_head(cfg, [shapes[name] for name in head_levels]),
            in_features=cfg.MODEL.FCOS.IN_FEATURES,
            resample=cfg.MODEL.MSAD.LR_RESAMPLE,
            size_divisibility=cfg.MODEL.MSAD.SIZE_DIVISIBILITY,
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            center_sampling_radius=cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            focal_loss_alpha=cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA,
            focal_loss_gamma=cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA,
            test_score_thresh=cfg.MODEL.FCOS.SCORE_THRESH_TEST,
            test_topk_candidates=cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST,
            test_nms_thresh=cfg.MODEL.FCOS.NMS_THRESH_TEST,
            max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )

    def preprocess_image(self, batched_inputs):
        images = [self._move_to_current_device(x["image"]) for x in batched_inputs]
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def branch_features(self, padded: torch.Tensor, factor) -> List[torch.Tensor]:
        """Backbone levels of the 1/factor copy of the padded batch, aligned with in_features."""
        features = self.backbone(downsample(padded, factor, self.resample))
        return [features[name] for name in self.levels[factor]]

    def gt_instances(self, batched_inputs):
        if "instances" not in batched_inputs[0]:
            raise ValueError("training needs 'instances' in every input dict")
        return [x["instances"].to(self.device) for x in batched_inputs]

    def branch_losses(self, predictions, anchors, gt_labels, gt_boxes, prefix, weight=1.0):
        """FCOS losses of one branch, named loss_{prefix}_{cls,loc,ctr}."""
        logits, deltas, ctrness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        losses = self.losses(anchors, logits, gt_labels, deltas, gt_boxes, ctrness)
        return {k.replace("loss_fcos", f"loss_{prefix}"): v * weight for k, v in losses.items()}

    def _ema_update(self, name, value, initial_value, momentum=0.9):
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
        logits, deltas, ctrness = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            scores = []
            for cls_logits, ctr_logits in zip(logits, ctrness):
                prob = cls_logits[i].sigmoid()
                score = torch.sqrt(prob * ctr_logits[i].sigmoid())
                # Threshold on the class probability; zeroed scores are dropped by decoding.
                scores.append(torch.where(prob > self.test_score_thresh, score,
                                          torch.zeros_like(score)))
            pred = self._decode_multi_level_predictions(
                anchors, scores, [d[i] for d in deltas], 0.0, self.test_topk_candidates,
                image_size)
            keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes,
                               self.test_nms_thresh)
            results.append(pred[keep[: self.max_detections_per_image]])
        return results

    @staticmethod
    def postprocess(results, batched_inputs, image_sizes):
        """Every image's detections, rescaled to its own requested height/width."""
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed


@META_ARCH_REGISTRY.register()
class SingleScaleFCOS(AlignedFCOS):
    """One FCOS on the full image (INPUT_RESOLUTION "HR") or on its 1/LR_FACTOR copy ("LR")."""

    @configurable
    def __init__(self, *, input_factor: int, **kwargs):
        super().__init__(factors=[input_factor], **kwargs)
        self.input_factor = input_factor

    @classmethod
    def from_config(cls, cfg):
        resolution = cfg.MODEL.FCOS.INPUT_RESOLUTION
        if resolution not in ("HR", "LR"):
            raise ValueError(f"MODEL.FCOS.INPUT_RESOLUTION must be 'HR' or 'LR', got {resolution!r}")
        factor = 1 if resolution == "HR" else cfg.MODEL.MSAD.LR_FACTOR
        backbone = build_backbone(cfg)
        levels = aligned_levels(cfg.MODEL.FCOS.IN_FEATURES, factor, backbone.output_shape())
        return dict(input_factor=factor, **cls.fcos_kwargs_from_config(cfg, backbone, levels))

    def distillation_features(self, padded):
        """What this detector teaches with: its levels (aligned with in_features)."""
        return self.branch_features(padded, self.input_factor)

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        features = self.branch_features(images.tensor, self.input_factor)
        predictions = self.head(features)
        if self.training:
            return self.forward_training(images, features, predictions,
                                         self.gt_instances(batched_inputs))
        results = self.forward_inference(images, features, predictions)
        return self.postprocess(results, batched_inputs, images.image_sizes)
