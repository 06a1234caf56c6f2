"""``add_msad_config``: every configuration key this project adds to Detectron2's; ``load_config``
reads a config file with them.

Defaults are the papers' values (MSAD, CVPR 2021; official code's configs) unless a comment
says otherwise.
"""
import functools
import os

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

# The official code's WIDTH_MULT_LIST, in the order of the BatchNorm sets of its checkpoints and
# of the slimmable ImageNet file.
OFFICIAL_WIDTH_LIST = (0.25, 0.5, 0.75, 1.0)
# The project folder: the bundled configs (configs/) and training scripts are named relative to it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_msad_config(cfg):
    _C = cfg

    # ---- Data ---------------------------------------------------------------------------
    # Extra COCO-format datasets to register before training, each [name, json_file, image_root];
    # then name them in DATASETS.TRAIN / DATASETS.TEST.
    _C.DATASETS.COCO_INSTANCES = []
    # A training image that is missing, truncated, not an image or of another size than its
    # record: "raise" stops the run naming the file; "skip" leaves it out and counts it in the
    # log (msad.data.input_checks).  Evaluation always stops, since skipping changes the metrics.
    _C.DATALOADER.BAD_IMAGES = "raise"

    # ---- Slimmable ResNet + FPN backbone (msad/modeling/backbone.py, msad/checkpoint/slimmable.py) ---------
    _C.MODEL.SLIMMABLE = CN()
    # Width multiplier of the ResNet: stem int(64w), res2 int(256w), bottleneck int(64w).
    _C.MODEL.SLIMMABLE.WIDTH = 1.0
    # Widths the slimmable ImageNet checkpoint was trained with; the position of WIDTH in this
    # list selects its BatchNorm statistics (the file does not store the list).
    _C.MODEL.SLIMMABLE.WIDTH_LIST = list(OFFICIAL_WIDTH_LIST)
    # Path of a slimmable-network ImageNet checkpoint (s_resnet50_0.25_0.5_0.75_1.0.pt) to
    # initialise the ResNet from, sliced to WIDTH; "" = none.  MODEL.WEIGHTS, if set, is loaded
    # afterwards by the checkpointer and wins.  A relative path not found from the current
    # directory is taken relative to the config file that names it, as _BASE_ is.
    _C.MODEL.SLIMMABLE.PRETRAINED = ""

    # Levels FPN adds above P5 from res5: 2 = P6, P7; 1 = P6 only, for detectors whose
    # coarsest level is P6 (a P7 they never use would leave parameters without gradients).
    _C.MODEL.FPN.NUM_TOP_LEVELS = 2

    # ---- torchvision backbones + FPN (msad/modeling/torchvision_backbone.py) -----------------------
    # With MODEL.BACKBONE.NAME "build_torchvision_fpn_backbone" (MODEL.BACKBONE.FREEZE_AT and
    # MODEL.FPN as for the slimmable one; torchvision's files expect INPUT.FORMAT "RGB" and
    # torchvision's PIXEL_MEAN/PIXEL_STD, as configs/MSAD/Base-FCOS.yaml sets).
    _C.MODEL.TORCHVISION = CN()
    # The architecture, named as torchvision names it: "resnet18", "resnet34", "resnet50",
    # "resnet101" (width 1.0) or "mobilenet_v2".
    _C.MODEL.TORCHVISION.ARCH = "resnet50"
    # Norm of its BatchNorm layers: "FrozenBN" (Detectron2's default for an ImageNet start),
    # "BN", "SyncBN", ... (the MSAD teacher's BRANCH_BN needs one that learns statistics).
    _C.MODEL.TORCHVISION.NORM = "FrozenBN"
    # torchvision's ImageNet file of ARCH, as torchvision writes it (resnet50-0676ba61.pth,
    # mobilenet_v2-b0353104.pth, ...), to initialise the backbone from; "" = random start.
    # Relative paths as MODEL.SLIMMABLE.PRETRAINED.  MODEL.WEIGHTS, if set, is loaded afterwards.
    _C.MODEL.TORCHVISION.PRETRAINED = ""

    # ---- FCOS: the detector's input scale and levels, head and losses (msad/modeling/fcos.py) --------
    # Read by every msad detector (msad/modeling/alignment.py has the rules).
    _C.MODEL.FCOS = CN()
    _C.MODEL.FCOS.NUM_CLASSES = 80  # COCO
    # The detector sees the padded image at 1/INPUT_FACTOR (a power of two): 1 = the full image
    # (HR FCOS, MSAD teacher), 2 = the half-size image (LR FCOS, MSAD student), 2 or 4 =
    # ThumbDet's thumbnail.  Boxes are predicted in full-image pixels whatever the factor.
    _C.MODEL.FCOS.INPUT_FACTOR = 1
    # How a 1/f copy of the padded, normalised batch is made (for INPUT_FACTOR > 1 and for the
    # MSAD teacher's LR branch): "nearest" (MSAD: every f-th pixel, as a decimated image),
    # "area" (the mean of each f x f block, closest to what a sensor with f x larger pixels
    # records), or "bilinear"/"bicubic" (antialiased; bicubic at INPUT_FACTOR 4 is ThumbDet's
    # bicubic-thumbnail baseline).  ThumbDet learns its own.
    _C.MODEL.FCOS.INPUT_RESAMPLE = "nearest"
    # What the detector is given at test time: "full" (the full-resolution image; it makes its
    # 1/INPUT_FACTOR copy itself) or "low" (an image that is already 1/INPUT_FACTOR of the
    # training resolution, e.g. from a smaller camera: read as it is, no resampling, padded to
    # what its levels need, boxes returned in its own pixels; INPUT.MIN/MAX_SIZE_TEST are
    # divided by INPUT_FACTOR to match).  "low" needs one branch with INPUT_FACTOR > 1 made by
    # resampling (not ThumbDet's learned thumbnail, not the teacher); it is for inference only.
    _C.MODEL.FCOS.INPUT_SCALE = "full"
    # Levels the head reads, named in the terms of that input: P(l) of the 1/f input lies on the
    # full image's P(l + log2 f) grid (p2-p6 of the half-size image = full-image strides 8-128).
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Batches are padded to a multiple of this.  0 = what the levels need for exact alignment:
    # the coarsest stride read, in full-image pixels (128 for P3-P7 at full resolution or P2-P6
    # at half, 256 for P2-P6 of a 4x thumbnail); a value must be a multiple of that.  The
    # official MSAD code padded to 256.
    _C.MODEL.FCOS.SIZE_DIVISIBILITY = 0
    _C.MODEL.FCOS.NUM_CONVS = 4  # convs in each of the classification and box towers
    _C.MODEL.FCOS.NORM = "GN"  # norm of the tower convs
    _C.MODEL.FCOS.PRIOR_PROB = 0.01  # initial foreground probability of the classifier
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25  # focal loss weight of the positives
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0  # focal loss focusing exponent
    # Locations within RADIUS x stride of a box centre (and inside the box) are positives.
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Test: keep locations whose class probability exceeds this (not multiplied by centerness);
    # they are then ranked by sqrt(class probability x centerness).
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.05
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000  # per level, before NMS
    # What those per-level top candidates are chosen by: "score" (sqrt(class x centerness), the
    # score reported) or "product" (class x centerness, as the official MSAD code: the same
    # order, except that in float32 the square root can tie two products at the cut).
    _C.MODEL.FCOS.TOPK_RANKING = "score"
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6  # IoU of the per-class NMS
    # How the GIoU box loss weighs the positive locations: "uniform" (Detectron2: their sum over
    # the loss normaliser) or "centerness" (the official FCOS/MSAD code: each weighted by its
    # centerness target, over the sum of those targets).
    _C.MODEL.FCOS.BOX_LOSS_WEIGHTING = "uniform"
    # (Detections per image after NMS: Detectron2's TEST.DETECTIONS_PER_IMAGE, 100.)

    # ---- MSAD teacher (msad/modeling/teacher.py) -------------------------------------------------
    _C.MODEL.MSAD = CN()
    # The teacher's second branch sees 1/LR_FACTOR of its input (MODEL.FCOS.INPUT_RESAMPLE) and
    # reads the levels aligned with MODEL.FCOS.IN_FEATURES: its P(l) pairs with the input's
    # P(l + log2 LR_FACTOR).
    _C.MODEL.MSAD.LR_FACTOR = 2
    # Teacher loss = HR loss + LR loss + JOINT_WEIGHT x loss on the fused features.
    _C.MODEL.MSAD.JOINT_WEIGHT = 0.4
    # Hidden width of the crossing-level fusion's Linear(2C -> hidden) -> ReLU -> Linear(-> 2).
    _C.MODEL.MSAD.FUSION_HIDDEN_DIM = 32
    # The fusion's learning rate, as a factor of SOLVER.BASE_LR (the official code: 1).  Its
    # softmax can saturate on one branch early in training and then gets no gradient back.
    _C.MODEL.MSAD.FUSION_LR_FACTOR = 1.0
    # What the teacher predicts from at inference: "fused" (MSAD), or a diagnostic: "hr" or
    # "lr", one branch alone through the shared head (per-branch AP with --eval-only).
    _C.MODEL.MSAD.TEST_BRANCH = "fused"
    # One set of BatchNorm running statistics per branch in the teacher's backbone (affine
    # weights shared): the HR and LR passes no longer blend their statistics into one.  A
    # student started from such a teacher takes its LR branch's statistics.  Needs BatchNorm
    # that keeps running statistics (MODEL.RESNETS.NORM "BN" or "SyncBN").  It changes no
    # training step: only the statistics inference (and an eval-mode student's teacher) uses.
    _C.MODEL.MSAD.BRANCH_BN = False

    # ---- MSAD student (msad/modeling/student.py) --------------------------------------------------
    # Distillation loss = KD_ALPHA x T^2 x warm-up x sum over aligned levels of
    # mean |student / T - teacher fused / T|, with T = KD_TEMPERATURE.
    _C.MODEL.MSAD.KD_ALPHA = 0.2
    _C.MODEL.MSAD.KD_TEMPERATURE = 3.0  # T: both feature maps are divided by it
    # The distillation weight ramps linearly from 0 to 1 over this many iterations.
    _C.MODEL.MSAD.KD_WARMUP_ITERS = 500
    # How both feature maps are prepared before the L1: "none" (MSAD) or "channel" (each
    # level's channels standardised over the batch and locations, so that the L1 pulls towards
    # the teacher's pattern rather than its scale; an option tested by tools/compare_methods.py).
    _C.MODEL.MSAD.KD_NORMALIZE = "none"
    # Which of the levels the student shares with the teacher are distilled, named on the
    # full-resolution grid (p3-p7 for the student on the half-size image's P2-P6); [] = all.
    _C.MODEL.MSAD.KD_LEVELS = []
    # Every this many iterations (0 = never; at the iterations Detectron2's metrics writer writes,
    # every 20 by default), the student logs the norms of the distillation and
    # detection losses' gradients at its FPN outputs (grad_norm/distill, grad_norm/detection)
    # and the distillation's share of their sum (grad_share/distill) in metrics.json: one more
    # backward pass through the head on those iterations.
    _C.MODEL.MSAD.GRAD_SHARE_PERIOD = 20

    # ---- The teacher of every distilled detector: MSAD student, ThumbDet (msad/modeling/distill.py) --
    _C.MODEL.TEACHER = CN()
    # Checkpoint of the frozen teacher, relative to the current directory like MODEL.WEIGHTS.
    # Needed to train; never loaded by --eval-only.
    _C.MODEL.TEACHER.WEIGHTS = ""  # a checkpoint written by train_net_T.py
    # The teacher's config.  The teacher is rebuilt as it was trained: from the config.yaml its
    # training wrote beside WEIGHTS (Detectron2 writes it into OUTPUT_DIR), overrides included,
    # which load_config puts here.  A config file named here is used only for weights without
    # one beside them (converted checkpoints, benchmarks), or when given on the command line.
    # A relative path not found from the current directory is taken relative to the config
    # file that names it, as _BASE_ is.
    _C.MODEL.TEACHER.CONFIG_FILE = ""
    # A fresh run (not --resume, not --eval-only) copies the teacher's backbone and head into
    # the student first, as the official MSAD recipe does; MODEL.WEIGHTS, if set, is loaded after.
    _C.MODEL.TEACHER.INIT_STUDENT = True
    # The frozen teacher's BatchNorm while it teaches: "eval" (its running statistics) or
    # "train" (the statistics of the batch it is given, as the official MSAD code runs its
    # teacher; its running statistics then move, its weights do not).
    _C.MODEL.TEACHER.BN_MODE = "eval"

    # ---- ThumbDet (msad/modeling/thumbdet.py): the thumbnail is 1/MODEL.FCOS.INPUT_FACTOR (2 or 4) of
    # the image, its head reads MODEL.FCOS.IN_FEATURES of it, its teacher is MODEL.TEACHER ----
    _C.MODEL.THUMBDET = CN()
    _C.MODEL.THUMBDET.HIDDEN_CHANNELS = 12  # channels between the down-sampler's two convs
    # Image-statistics loss: STATS_WEIGHT x (MSE of per-channel means + STATS_VAR_WEIGHT x MSE
    # of per-channel variances) between the [0, 1] image and its thumbnail.  The learned
    # down-sampler keeps each channel's mean by construction, so mostly the variances train.
    _C.MODEL.THUMBDET.STATS_WEIGHT = 1.0
    _C.MODEL.THUMBDET.STATS_VAR_WEIGHT = 0.1  # the variances' share of that loss
    # The first WARMUP_ITERS iterations train the statistics loss alone (official: 5 of 110
    # epochs; 5 COCO epochs at batch 16 are about 36,650 iterations).
    _C.MODEL.THUMBDET.WARMUP_ITERS = 36650
    # Logit KD: per-class sigmoid KL at aligned locations, temperature T, x T^2 when
    # KD_T_SQUARED (the official code omits T^2: set False to reproduce it).
    _C.MODEL.THUMBDET.KD_WEIGHT = 1.0
    _C.MODEL.THUMBDET.KD_TEMPERATURE = 1.0  # T (official: 1)
    _C.MODEL.THUMBDET.KD_T_SQUARED = True  # multiply the KD loss by T^2
    # Feature mimicry: MSE between student and teacher FPN features.  "aligned": at spatially
    # aligned levels; "resize" (official): level by level, student resized bilinearly.
    _C.MODEL.THUMBDET.MIMIC_WEIGHT = 1.0
    _C.MODEL.THUMBDET.MIMIC_MODE = "aligned"  # or "resize", the official variant
    return cfg


# Paths in config files that, when not found from the current directory, are relative to the
# file that names them (as _BASE_ is), so that configs work from a Detectron2 checkout's root
# with this project in projects/.  MODEL.WEIGHTS, MODEL.TEACHER.WEIGHTS and OUTPUT_DIR stay
# relative to the current directory, as Detectron2's are.
CONFIG_RELATIVE_PATHS = ("MODEL.TEACHER.CONFIG_FILE", "MODEL.SLIMMABLE.PRETRAINED",
                         "MODEL.TORCHVISION.PRETRAINED")
# The key naming the ImageNet file each backbone starts from.
IMAGENET_START_KEYS = {"build_slimmable_resnet_fpn_backbone": "MODEL.SLIMMABLE.PRETRAINED",
                       "build_torchvision_fpn_backbone": "MODEL.TORCHVISION.PRETRAINED"}
# Overrides that build a model without reading an ImageNet file, for a model whose trained
# weights follow (a frozen teacher, a predictor) or whose cost alone is measured.
NO_IMAGENET_START = [item for key in IMAGENET_START_KEYS.values() for item in (key, "")]
# What Detectron2's default_setup writes into OUTPUT_DIR: the full config of a run.
TRAINING_CONFIG = "config.yaml"


def check_choice(key, value, choices):
    """`value` of the setting `key` (a config key, an option), refused unless one of
    `choices`."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {value!r}")
    return value


def load_config(config_file, opts=(), what="--config-file"):
    """Detectron2's config plus ours, merged from `config_file` and `opts` overrides; paths
    resolved (CONFIG_RELATIVE_PATHS)."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{what}: no such file {config_file}")
    cfg = get_cfg()
    add_msad_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    overridden = set(list(opts)[0::2])
    for key in CONFIG_RELATIVE_PATHS:
        if key not in overridden:
            _resolve_relative_to_config(cfg, key, config_file)
    return cfg


def _file_setting(config_file, key):
    """The file of `config_file`'s _BASE_ chain whose own text sets `key` (the most derived one),
    or None."""
    with open(config_file) as f:
        data = yaml.safe_load(f) or {}
    node = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        return config_file
    bases = data.get("_BASE_") or []
    for base in reversed(bases if isinstance(bases, list) else [bases]):  # later bases win
        base = os.path.expanduser(base)
        found = _file_setting(base if os.path.isabs(base) else
                              os.path.join(os.path.dirname(config_file), base), key)
        if found:
            return found
    return None


def _resolve_relative_to_config(cfg, key, config_file):
    *parents, name = key.split(".")
    node = functools.reduce(getattr, parents, cfg)
    path = getattr(node, name)
    if not path or os.path.isabs(path) or os.path.exists(path):
        return
    setter = _file_setting(config_file, key)
    if setter:  # (if it is missing there too, errors name it where the config file means it)
        setattr(node, name, os.path.normpath(os.path.join(os.path.dirname(setter), path)))


def inference_sizes(cfg, given_factor=None):
    """(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST) for the images the detector is given: divided
    by how much smaller than the full resolution they already are, so that the same scene
    reaches the backbone with the same pixels.  That factor is the model's ``given_factor``;
    without a model at hand (Detectron2 builds the test loader from the config alone), the
    config's: MODEL.FCOS.INPUT_FACTOR for INPUT_SCALE low, else 1."""
    if given_factor is None:
        given_factor = cfg.MODEL.FCOS.INPUT_FACTOR if cfg.MODEL.FCOS.INPUT_SCALE == "low" else 1
    return round(cfg.INPUT.MIN_SIZE_TEST / given_factor), cfg.INPUT.MAX_SIZE_TEST / given_factor
