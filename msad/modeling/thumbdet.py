"""ThumbDet on FCOS: a learned 2x/4x thumbnail, its image-statistics loss, distillation boost.

The detector sees only the thumbnail: its one branch (``MODEL.FCOS.INPUT_FACTOR`` 2 or 4, levels
``MODEL.FCOS.IN_FEATURES`` of the thumbnail) reads what ``LearnedDownsampler`` makes of the raw
[0, 1] padded image, normalised; the head predicts at strides multiplied by the factor, so targets
and predictions stay in the original image's pixels.  Training runs two phases by iteration
(``ThumbDet.iteration_schedules``): first the image-statistics loss alone, then detection,
statistics and the distillation boost from a separate frozen full-resolution teacher: logit KD
and feature mimicry at spatially aligned levels (thumbnail P(l) with teacher P(l + log2 f)).
The bicubic-thumbnail baseline is not a ThumbDet: it is ``SingleScaleFCOS`` with
``MODEL.FCOS.INPUT_RESAMPLE bicubic``.
"""
import logging
from functools import partial

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config import check_choice
from .distill import DistilledDetector
from .fcos import AlignedFCOS, input_branch
from .resample import downsample

logger = logging.getLogger(__name__)

FACTORS = (2, 4)
MIMIC_MODES = ("aligned", "resize")
# A thumbnail channel whose standard deviation within an image is below this (on [0, 1] values:
# a quarter of one 8-bit grey level) while that image's own channel's is not has gone constant.
CONSTANT_CHANNEL_STD = 1e-3


def check_factor(factor):
    check_choice("ThumbDet: MODEL.FCOS.INPUT_FACTOR", factor, FACTORS)


def thumbnail_side(side, factor):
    """ceil(side / factor), for ints and for sizes that tracing keeps as tensors."""
    return -(-side // factor)


class LearnedDownsampler(nn.Module):
    """A [0, 1] RGB batch to its 1/factor thumbnails: antialiased bicubic resize + a learned
    correction with zero mean over each image.

    The correction is the paper's two convolutions (no bias), 4x: Conv3x3/2 (3 -> hidden) ->
    ReLU -> Conv3x3/2 (hidden -> 3); 2x: Conv5x5/1 -> ReLU -> Conv5x5/2.  Paddings are k // 2
    (the official 2x used 1, which loses pixels), so an H x W input gives exactly
    ceil(H / factor) x ceil(W / factor).  Two departures from the paper, both so that the
    thumbnail stays an image:

    * No output ReLU, a residual instead.  A ReLU passes no gradient where its input is
      negative, so one large step (the detection and distillation losses switching on) could
      push a channel below zero everywhere and leave the thumbnail black for good, as it did on
      the quickstart.  Here every output pixel and channel keeps the identity path's gradient
      whatever the weights; with every hidden unit dead the thumbnail is the bicubic one.  The
      last convolution starts at zero, so training starts from the bicubic thumbnail.
    * The correction's mean over each image's own thumbnail pixels is removed (and it is zero
      on the padding), so a channel's mean stays the bicubic thumbnail's, i.e. the image's.
      The statistics loss asks for that, but FCOS with batch-statistics BatchNorm hardly sees a
      uniform shift of a channel, and that loss alone let a mean drift by 0.27 in the first 20
      detection iterations of a short test run; the variances are still left to it.
    """

    def __init__(self, factor, hidden_channels=12):
        super().__init__()
        check_factor(factor)
        kernel, strides = (3, (2, 2)) if factor == 4 else (5, (1, 2))
        self.factor = factor
        self.conv1 = nn.Conv2d(3, hidden_channels, kernel, strides[0], kernel // 2, bias=False)
        self.conv2 = nn.Conv2d(hidden_channels, 3, kernel, strides[1], kernel // 2, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x, image_sizes=None):
        """Thumbnails of the NCHW batch `x` whose images fill `image_sizes` (default: all of x)."""
        correction = self.conv2(F.relu(self.conv1(x)))
        resized = downsample(x, self.factor, "bicubic", size=correction.shape[-2:])
        # Each image's own thumbnail pixels, from sizes that stay tensors when traced (so an
        # exported model computes them for the image it is given, not the one it was traced on).
        rows = torch.arange(correction.shape[-2], device=x.device)
        cols = torch.arange(correction.shape[-1], device=x.device)
        mask = torch.stack([
            ((rows[:, None] < thumbnail_side(h, self.factor))
             & (cols[None, :] < thumbnail_side(w, self.factor)))
            for h, w in (image_sizes or [x.shape[-2:]] * len(x))])[:, None].to(x.dtype)
        mean = ((correction * mask).sum(dim=(2, 3), keepdim=True)
                / mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0))
        return resized + (correction - mean) * mask


def channel_statistics(images):
    """Mean and variance of each channel of each CHW image of a list: two N x C tensors."""
    flat = [x.flatten(1) for x in images]
    return (torch.stack([f.mean(dim=1) for f in flat]),
            torch.stack([f.var(dim=1, unbiased=False) for f in flat]))


def image_statistics_loss(source, thumb, var_weight=0.1):
    """MSE of per-channel means + var_weight x MSE of per-channel variances (both on [0, 1]).

    `source` and `thumb` are lists of CHW images (each image's own, unpadded region).
    """
    (mean_s, var_s), (mean_t, var_t) = channel_statistics(source), channel_statistics(thumb)
    return F.mse_loss(mean_t, mean_s) + var_weight * F.mse_loss(var_t, var_s)


def sigmoid_kd(student_logits, teacher_logits, temperature=1.0, t_squared=True):
    """Per-class Bernoulli KL(teacher || student) of sigmoid(logits / T), mean over locations.

    Zero when the logits agree, positive otherwise; its gradient is that of the soft binary
    cross-entropy.  x T^2 keeps gradients comparable across temperatures (the official code
    omits it: ``t_squared=False``).
    """
    t = temperature
    target = torch.sigmoid(teacher_logits / t)
    loss = (F.binary_cross_entropy_with_logits(student_logits / t, target)
            - F.binary_cross_entropy_with_logits(teacher_logits / t, target))
    return loss * t * t if t_squared else loss


def feature_mimic(student, teacher, mode="aligned"):
    """Mean over level pairs of MSE(student, teacher).

    "aligned": the pairs are spatially aligned levels of equal size.  "resize" (official): each
    student level is bilinearly resized to its partner's size first.
    """
    check_choice("MODEL.THUMBDET.MIMIC_MODE", mode, MIMIC_MODES)
    losses = []
    for s, t in zip(student, teacher):
        if mode == "resize":
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        losses.append(F.mse_loss(s, t))
    return sum(losses) / len(losses)


def detection_phase(iteration, warmup_iters):
    """0 while only the statistics loss trains (the first warmup_iters iterations), then 1."""
    return 0.0 if iteration < warmup_iters else 1.0


@META_ARCH_REGISTRY.register()
class ThumbDet(DistilledDetector, AlignedFCOS):
    """Args:
        downsampler: the ``LearnedDownsampler`` that makes the thumbnail.
        stats_weight, stats_var_weight: weight of the image-statistics loss, and its variances'
            share.
        warmup_iters: iterations that train the statistics loss alone.
        kd_weight, kd_temperature, kd_t_squared: logit KD (``sigmoid_kd``).
        mimic_weight, mimic_mode: feature mimicry (``feature_mimic``).
        **kwargs: ``AlignedFCOS``'s, with one branch at the down-sampler's factor.
    """

    teacher_required = False  # without one it trains without the distillation boost

    @configurable
    def __init__(self, *, downsampler, stats_weight, stats_var_weight, warmup_iters, kd_weight,
                 kd_temperature, kd_t_squared, mimic_weight, mimic_mode, **kwargs):
        super().__init__(**kwargs)
        if self.given_factor > 1:
            raise ValueError("ThumbDet makes its thumbnail from the full-resolution image with "
                             "its learned down-sampler, so it cannot be given a low-resolution "
                             "one: MODEL.FCOS.INPUT_SCALE must be 'full'")
        if self.branches[0].factor != downsampler.factor:
            raise ValueError(f"the down-sampler makes 1/{downsampler.factor} thumbnails, the "
                             f"detector reads a 1/{self.branches[0].factor} input")
        self.downsampler = downsampler
        self.stats_weight, self.stats_var_weight = stats_weight, stats_var_weight
        self.warmup_iters = warmup_iters
        self.kd_weight, self.kd_temperature, self.kd_t_squared = kd_weight, kd_temperature, kd_t_squared
        self.mimic_weight, self.mimic_mode = mimic_weight, mimic_mode
        self.detection_phase = 1.0  # set before each step, see iteration_schedules()
        self.constant_thumbnail_channels = []  # as of the last training step

    @classmethod
    def from_config(cls, cfg):
        spec = cfg.MODEL.THUMBDET
        factor = input_branch(cfg).factor  # LearnedDownsampler checks it is 2 or 4
        check_choice("MODEL.THUMBDET.MIMIC_MODE", spec.MIMIC_MODE, MIMIC_MODES)
        return dict(
            super().from_config(cfg),
            downsampler=LearnedDownsampler(factor, spec.HIDDEN_CHANNELS),
            stats_weight=spec.STATS_WEIGHT, stats_var_weight=spec.STATS_VAR_WEIGHT,
            warmup_iters=spec.WARMUP_ITERS, kd_weight=spec.KD_WEIGHT,
            kd_temperature=spec.KD_TEMPERATURE, kd_t_squared=spec.KD_T_SQUARED,
            mimic_weight=spec.MIMIC_WEIGHT, mimic_mode=spec.MIMIC_MODE)

    @property
    def factor(self):
        return self.branches[0].factor

    def iteration_schedules(self):
        return {"detection_phase": partial(detection_phase, warmup_iters=self.warmup_iters)}

    def check_teacher(self, teacher):
        super().check_teacher(teacher)  # aligned levels, FPN channels
        if teacher.num_classes != self.num_classes:
            raise ValueError(f"teacher has {teacher.num_classes} classes, the student "
                             f"{self.num_classes} (MODEL.FCOS.NUM_CLASSES)")

    def unit_range(self, normalized):
        """Normalised tensor back to [0, 1] (the padding becomes the mean colour)."""
        return (normalized * self.pixel_std + self.pixel_mean) / 255.0

    def thumbnail(self, images):
        """The [0, 1] thumbnails of a padded, normalised ImageList."""
        return self.downsampler(self.unit_range(images.tensor), images.image_sizes)

    def preprocess_image(self, batched_inputs, size_divisibility=None):
        for x in batched_inputs:
            h, w = x["image"].shape[-2:]
            if min(h, w) < self.factor:
                raise ValueError(f"a {h}x{w} image is smaller than MODEL.FCOS.INPUT_FACTOR="
                                 f"{self.factor} allows")
        return super().preprocess_image(batched_inputs, size_divisibility)

    def branch_input(self, images, branch):
        return (self.thumbnail(images) * 255.0 - self.pixel_mean) / self.pixel_std

    def detection_losses(self, images, features, predictions, gt_instances):
        phase = self.detection_phase
        return {k: v * phase for k, v in super().detection_losses(
            images, features, predictions, gt_instances).items()}

    def extra_losses(self, batched_inputs, images, features, predictions):
        f = self.factor
        unit, thumb = self.unit_range(images.tensor), self.unit_range(features.inputs[0])
        sizes = images.image_sizes
        source = [unit[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        thumbs = [thumb[i, :, :thumbnail_side(h, f), :thumbnail_side(w, f)]
                  for i, (h, w) in enumerate(sizes)]
        losses = {"loss_image_stats": self.stats_weight * image_statistics_loss(
            source, thumbs, self.stats_var_weight)}
        self.watch_thumbnail(source, thumbs)
        if self.teacher is not None:
            losses.update(self.distillation_losses(batched_inputs, features.head_in, predictions,
                                                   self.detection_phase))
        return losses

    def watch_thumbnail(self, source, thumbs):
        """Log the smallest channel spread of the thumbnails; warn when a channel goes constant
        in an image whose own channel is not (each image on its own: the correction keeps each
        image's mean, so a dead channel is flat within an image, not across the batch).  Under
        DDP each process watches its own images; metrics.json records the first process's."""
        with torch.no_grad():
            std = torch.stack([channel_statistics(images)[1] for images in (source, thumbs)])
            source_std, thumb_std = std.sqrt().tolist()  # one device sync per step
        storage = get_event_storage()
        storage.put_scalar("thumbnail_min_channel_std", min(map(min, thumb_std)),
                           smoothing_hint=False)
        constant = sorted({c for s_image, t_image in zip(source_std, thumb_std)
                           for c, (s, t) in enumerate(zip(s_image, t_image))
                           if t < CONSTANT_CHANNEL_STD <= s})
        if constant and constant != self.constant_thumbnail_channels:
            logger.warning(
                "ThumbDet: learned thumbnail channel(s) %s constant at iteration %d in an image "
                "whose own channel is not: the down-sampler's output has died there",
                constant, storage.iter)
        self.constant_thumbnail_channels = constant

    def distillation_losses(self, batched_inputs, features, predictions, phase):
        zero = features[0].sum() * 0.0
        if phase == 0:  # warm-up: no teacher pass needed for losses that are switched off
            return {"loss_kd": zero, "loss_mimic": zero}
        t_features, t_predictions = self.teacher_outputs(batched_inputs, with_head=True)
        pairs = self.teacher_pairs(self.teacher)
        kd = sum(sigmoid_kd(predictions[0][i], t_predictions[0][j], self.kd_temperature,
                            self.kd_t_squared) for i, j in pairs) / len(pairs)
        if self.mimic_mode == "aligned":
            mimic = feature_mimic([features[i] for i, _ in pairs],
                                  [t_features[j] for _, j in pairs], "aligned")
        else:  # official: level by level in order, student resized to the teacher's size
            mimic = feature_mimic(features, t_features, "resize")
        return {"loss_kd": self.kd_weight * phase * kd,
                "loss_mimic": self.mimic_weight * phase * mimic}
