"""Detectron2 models with AP-loss. Importing this module registers them:

* ``APLossRetinaNet`` in ``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE: APLossRetinaNet``);
* ``APLossROIHeads`` in ``ROI_HEADS_REGISTRY`` (``MODEL.ROI_HEADS.NAME: APLossROIHeads``).
"""
from ..losses.registry import ranking_targets
from .retinanet import APLossRetinaNet
from .roi_heads import APLossFastRCNNOutputLayers, APLossROIHeads

__all__ = ["APLossRetinaNet", "APLossROIHeads", "APLossFastRCNNOutputLayers", "ranking_targets"]
