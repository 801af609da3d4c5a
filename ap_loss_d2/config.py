"""ap_loss_d2's yaml config keys, added by :func:`add_ap_loss_config`; nothing inside Detectron2's
own namespaces. A LazyConfig passes the same values as constructor arguments. The keys and the
models that read them: docs/configs.md."""
from detectron2.config import CfgNode as CN

__all__ = ["SSD512_PRIORS", "add_ap_loss_config"]

#: SSD512's priors on VOC (Liu et al.): per level min / max size (7 % .. 105 % of 512), step and
#: aspect ratios a >= 1 (each adds a and 1/a): the MODEL.SSD.PRIOR_* defaults and the lazy SSD's.
SSD512_PRIORS = {
    "min_sizes": (35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
    "max_sizes": (76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
    "steps": (8, 16, 32, 64, 128, 256, 512),
    "aspect_ratios": ((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
}

# Keys moved to the namespace of the model that reads them: a config naming the old key fails.
_RENAMED = {
    "MODEL.CLS_LOSS.BOX_REG_WEIGHT": (
        "MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT",
        "APLossSSD reads MODEL.SSD.BOX_REG_WEIGHT.",
    ),
    "MODEL.CLS_LOSS.BOX_REG_NORMALIZER": "MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER",
    "MODEL.SSD.TEST_FIXED_SIZE": ("MODEL.SSD.FIXED_SIZE", "It applies in training as at inference."),
}


def add_ap_loss_config(cfg):
    """Add ap_loss_d2's keys to a Detectron2 config (in place, idempotent; returns ``cfg``)."""
    if "CLS_LOSS" in cfg.MODEL:
        return cfg
    # The classification loss, read by APLossRetinaNet, APLossROIHeads and APLossSSD.
    c = cfg.MODEL.CLS_LOSS = CN()
    # A name of CLS_LOSS_REGISTRY (`python -m ap_loss_d2.losses` lists them); "" = "ap".
    c.NAME = ""
    # Width delta of the piecewise step function (Eq. 21).
    c.DELTA = 1.0
    # Interpolated AP (Sec. 3.4.3); AP-loss only.
    c.INTERPOLATE = True
    # Step function: "linear" (Eq. 21), "heaviside" (Eq. 4), "sigmoid" (Eq. 54).
    c.STEP = "linear"
    # Slope k of the sigmoid step (Eq. 54), with STEP "sigmoid".
    c.SIGMOID_K = 0.5
    # Ranking kernel of "ap"/"auc": "grid" (host reads), "sync_free" (none), "auto" (docs/losses.md).
    c.KERNEL = "auto"
    # Temperature k of the smoothed AP of "ap_approx" (Fig. 8; the paper: 1).
    c.APPROX_SIGMOID_K = 1.0
    # Weight of the classification loss.
    c.WEIGHT = 1.0
    # Also log cls_loss/time (a host synchronisation per iteration).
    c.DIAGNOSTICS = False
    # Background anchors kept per positive anchor by "ce_ohem", "ap_ohem", "ap_random".
    c.OHEM_NEG_POS_RATIO = 3.0
    # Rank all processes' images together (one ranking set = the global batch).
    c.RANK_ACROSS_PROCESSES = False
    # Images ranked together on any GPU count (the paper: 8); 0 = each process its own.
    c.IMAGES_PER_RANKING_SET = 0

    # APLossRetinaNet's own options (Detectron2's RetinaNet keys stay under MODEL.RETINANET).
    r = cfg.MODEL.AP_LOSS_RETINANET = CN()
    # Weight of the box-regression loss; 0 turns it off (Fig. 8 study).
    r.BOX_REG_WEIGHT = 1.0
    # Box-loss normaliser: "ema" (Detectron2's) or "batch_mean" (authors' code).
    r.BOX_REG_NORMALIZER = "ema"

    # APLossSSD, its VGG-16 backbone and its priors (SSDPriorGenerator); SSD512 on VOC.
    s = cfg.MODEL.SSD = CN()
    # Foreground classes K.
    s.NUM_CLASSES = 20
    # Backbone outputs the head predicts from (conv4_3, conv7, conv8_2 .. conv12_2).
    s.IN_FEATURES = ["conv4_3", "conv7", "conv8_2", "conv9_2", "conv10_2", "conv11_2", "conv12_2"]
    # Width multiplier of every VGG / extra layer (1.0 = VGG-16).
    s.VGG_WIDTH = 1.0
    # Norm after each VGG convolution: "" (VGG-16, the ImageNet weights) or e.g. "BN".
    s.VGG_NORM = ""
    # Initial scale of the L2 normalisation of conv4_3.
    s.L2NORM_SCALE = 20.0
    # Priors per level, in pixels of the square input (see SSD512_PRIORS).
    s.PRIOR_MIN_SIZES = list(SSD512_PRIORS["min_sizes"])
    s.PRIOR_MAX_SIZES = list(SSD512_PRIORS["max_sizes"])
    s.PRIOR_STEPS = list(SSD512_PRIORS["steps"])
    s.PRIOR_ASPECT_RATIOS = [list(a) for a in SSD512_PRIORS["aspect_ratios"]]
    # Clip the priors to the AP_LOSS_INPUT.FIXED_SIZE square (Caffe SSD512: no).
    s.PRIOR_CLIP = False
    # Priors with IoU >= this with a ground truth are positive (plus each one's best prior).
    s.IOU_THRESHOLD = 0.5
    # Box2BoxTransform weights: 1 / SSD's variances (0.1, 0.1, 0.2, 0.2); each > 0.
    s.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # Smooth-L1 beta of the box loss.
    s.SMOOTH_L1_BETA = 1.0
    # Weight of the box-regression loss; 0 turns it off.
    s.BOX_REG_WEIGHT = 1.0
    # Focal loss of MODEL.CLS_LOSS.NAME "focal" (the paper's SSD setting: gamma 1, alpha 0.25).
    s.FOCAL_LOSS_ALPHA = 0.25
    s.FOCAL_LOSS_GAMMA = 1.0
    # Initial foreground probability of the class convolutions' bias, in [0, 1); 0 = zero bias.
    s.CLS_PRIOR_PROB = 0.01
    # Inference: candidates score above this.
    s.SCORE_THRESH_TEST = 0.01
    # Inference: best candidates kept per level before NMS.
    s.TOPK_CANDIDATES_TEST = 1000
    # Inference: IoU of the per-class NMS (the paper's 0.5; SSD's own is 0.45).
    s.NMS_THRESH_TEST = 0.5
    # Training and inference: the model resizes each image (and its boxes) to this square unless
    # it already is; 0 = as the mapper gives it (Detectron2 pads the batch).
    s.FIXED_SIZE = 512

    # The paper's SSD-style training input (ap_loss_d2.data.build_train_mapper).
    i = cfg.AP_LOSS_INPUT = CN()
    # "default" (Detectron2's DatasetMapper from INPUT.*) or "ssd" (photometric distortion,
    # zoom-out, min-IoU crop, resize to FIXED_SIZE x FIXED_SIZE, flip).
    i.AUGMENTATION = "default"
    # Side of the square training input of the "ssd" augmentation.
    i.FIXED_SIZE = 512
    # Largest zoom-out ratio of the "ssd" augmentation.
    i.EXPAND_MAX_RATIO = 4.0

    # Output folder (train_net.py; LazyConfig: train.overwrite_output).
    cfg.AP_LOSS_OUTPUT = CN()
    # A new run (neither --resume nor --eval-only) refuses an OUTPUT_DIR holding another run's
    # checkpoints; True overwrites them on purpose.
    cfg.AP_LOSS_OUTPUT.OVERWRITE = False

    for old, new in _RENAMED.items():
        cfg.register_renamed_key(old, *(new if isinstance(new, tuple) else (new,)))
    return cfg
