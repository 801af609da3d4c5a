"""ap_loss_d2's config keys (yaml configs): ``MODEL.CLS_LOSS.*`` (the loss) and
``AP_LOSS_INPUT.*`` (the paper's SSD-style training input), both added by
:func:`add_ap_loss_config`. Nothing is added inside Detectron2's own namespaces.

LazyConfig ``.py`` configs pass the same values as constructor arguments of the models and of
the SSD mapper.
"""
from detectron2.config import CfgNode as CN

from . import modeling  # noqa: F401  (registers the models the keys configure)
from .ssd_config import add_ssd_config

__all__ = ["add_ap_loss_config"]


def add_ap_loss_config(cfg):
    """Add ap_loss_d2's keys to a Detectron2 config (in place, idempotent; returns ``cfg``)."""
    if "CLS_LOSS" in cfg.MODEL:
        return cfg
    cfg.MODEL.CLS_LOSS = CN()
    # Classification loss: a `name` of CLS_LOSS_REGISTRY (`python -m ap_loss_d2.losses` lists
    # them with their heads), e.g. "ap", "auc", "focal", "ce_ohem" (RetinaNet, SSD), "ce"
    # (Faster R-CNN). Read by APLossRetinaNet, APLossROIHeads and APLossSSD; "" = "ap".
    cfg.MODEL.CLS_LOSS.NAME = ""
    # Width delta of the piecewise step function (Eq. 21); also bounds the non-trivial negatives.
    cfg.MODEL.CLS_LOSS.DELTA = 1.0
    # Use interpolated AP (Sec. 3.4.3, Algorithm 1); AP-loss only.
    cfg.MODEL.CLS_LOSS.INTERPOLATE = True
    # Step function replacing Heaviside: "linear" (Eq. 21), "heaviside" (Eq. 4), "sigmoid" (Eq. 54).
    cfg.MODEL.CLS_LOSS.STEP = "linear"
    # Slope parameter k of the sigmoid step (Eq. 54), used when STEP == "sigmoid".
    cfg.MODEL.CLS_LOSS.SIGMOID_K = 0.5
    # Temperature k of the sigmoid S(x / k) smoothing AP for "ap_approx" (Fig. 8 alternative);
    # the paper's smoothed AP (supplementary Eq. 32-33) uses the plain sigmoid, k = 1.
    cfg.MODEL.CLS_LOSS.APPROX_SIGMOID_K = 1.0
    # Weight of the classification loss in the total loss.
    cfg.MODEL.CLS_LOSS.WEIGHT = 1.0
    # Also log cls_loss/time (and, on CUDA, cls_loss/num_pos and num_neg_nontrivial): each
    # needs a host synchronisation per iteration, so it is off by default.
    cfg.MODEL.CLS_LOSS.DIAGNOSTICS = False
    # Weight of the box-regression loss; 0 turns it off as in the paper's Fig. 8 study.
    cfg.MODEL.CLS_LOSS.BOX_REG_WEIGHT = 1.0
    # Normaliser of RetinaNet's box-regression loss (every MODEL.CLS_LOSS.NAME, focal included):
    # "ema" = Detectron2's (sum over positive anchors and 4 coordinates / EMA of the positive
    # count); "batch_mean" = the authors' code (sum / (4 x positive anchors of this process's
    # batch), i.e. the mean over positive anchors and coordinates).
    cfg.MODEL.CLS_LOSS.BOX_REG_NORMALIZER = "ema"
    # Background anchors kept per positive anchor of an image (SSD-style), by "ce_ohem" (the
    # paper's CE+OHEM baseline uses 3:1) and by "ap_ohem" / "ap_random" (Table 8's negative
    # selection; each kept anchor brings all its K class entries).
    cfg.MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO = 3.0
    # Rank the scores of all processes' images together (exact, across GPUs and machines):
    # one ranking set = the whole global batch. Excludes IMAGES_PER_RANKING_SET.
    cfg.MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES = False
    # Images ranked together by "ap"/"auc" (the paper: 8), on any GPU count: sets of consecutive
    # images of a process, or of consecutive processes ranked together exactly. Must divide, or
    # be a multiple of, SOLVER.IMS_PER_BATCH / processes. 0 = each process ranks its own images.
    cfg.MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET = 0

    cfg.AP_LOSS_INPUT = CN()
    # Training augmentation: "default" = Detectron2's DatasetMapper from INPUT.* (resize shortest
    # edge, flip, optional crop); "ssd" = SSD's pipeline as in the paper (photometric distortion,
    # zoom-out, min-IoU random crop, resize to FIXED_SIZE x FIXED_SIZE, horizontal flip).
    cfg.AP_LOSS_INPUT.AUGMENTATION = "default"
    # Side of the square training input of the "ssd" augmentation (the paper uses 512).
    cfg.AP_LOSS_INPUT.FIXED_SIZE = 512
    # Largest zoom-out (canvas / image side) of the "ssd" augmentation's expand step (SSD: 4).
    cfg.AP_LOSS_INPUT.EXPAND_MAX_RATIO = 4.0
    add_ssd_config(cfg)  # MODEL.SSD.* (APLossSSD)

    # --- engine: output folder (train_net.py; LazyConfig: train.overwrite_output)
    cfg.AP_LOSS_OUTPUT = CN()
    # A new run (neither --resume nor --eval-only) refuses an OUTPUT_DIR holding another run's
    # checkpoints; True overwrites them on purpose.
    cfg.AP_LOSS_OUTPUT.OVERWRITE = False
    return cfg
