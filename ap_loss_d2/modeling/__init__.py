"""Detectron2 models with AP-loss. Importing this module registers them:

* ``APLossRetinaNet`` in ``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE: APLossRetinaNet``);
* ``APLossROIHeads`` in ``ROI_HEADS_REGISTRY`` (``MODEL.ROI_HEADS.NAME: APLossROIHeads``);
* the classification losses in ``CLS_LOSS_REGISTRY`` (:mod:`ap_loss_d2.losses.registry`).
"""
from ..losses.cls_losses import (
    APApproxLoss,
    APHingeLoss,
    APLoss,
    APOHEMLoss,
    APRandomLoss,
    AUCLoss,
    CEOHEMLoss,
    DRLoss,
    FocalLoss,
    GHMCLoss,
    SoftmaxCELoss,
)
from ..losses.registry import CLS_LOSS_REGISTRY, ClsLoss, build_cls_loss
from .retinanet import APLossRetinaNet
from .roi_heads import APLossFastRCNNOutputLayers, APLossROIHeads

__all__ = [
    "APLossRetinaNet",
    "APLossROIHeads",
    "APLossFastRCNNOutputLayers",
    "CLS_LOSS_REGISTRY",
    "ClsLoss",
    "build_cls_loss",
    "APLoss",
    "AUCLoss",
    "APOHEMLoss",
    "APRandomLoss",
    "FocalLoss",
    "CEOHEMLoss",
    "APApproxLoss",
    "APHingeLoss",
    "GHMCLoss",
    "DRLoss",
    "SoftmaxCELoss",
]
