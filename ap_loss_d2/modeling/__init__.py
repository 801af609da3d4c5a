"""Detectron2 models with AP-loss. Importing this module registers them:

* ``APLossRetinaNet`` in ``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE: APLossRetinaNet``);
* ``APLossROIHeads`` in ``ROI_HEADS_REGISTRY`` (``MODEL.ROI_HEADS.NAME: APLossROIHeads``);
* ``APLossSSD`` in ``META_ARCH_REGISTRY``, its VGG-16 backbone ``build_vgg16_ssd_backbone`` in
  ``BACKBONE_REGISTRY`` and its priors ``SSDPriorGenerator`` in ``ANCHOR_GENERATOR_REGISTRY``;
* the classification losses in ``CLS_LOSS_REGISTRY`` (their classes are in
  :mod:`ap_loss_d2.losses.cls_losses`, the registry in :mod:`ap_loss_d2.losses.registry`).
"""
from .retinanet import APLossRetinaNet
from .roi_heads import APLossFastRCNNOutputLayers, APLossROIHeads
from .priors import SSDPriorGenerator
from .ssd import APLossSSD
from .vgg import VGG16SSD, build_vgg16_ssd_backbone

__all__ = [
    "APLossRetinaNet",
    "APLossROIHeads",
    "APLossFastRCNNOutputLayers",
    "APLossSSD",
    "SSDPriorGenerator",
    "VGG16SSD",
    "build_vgg16_ssd_backbone",
]
