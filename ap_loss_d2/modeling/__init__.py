"""Detectron2 models with AP-loss. Importing this module registers them:

* ``APLossRetinaNet`` in ``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE: APLossRetinaNet``).
"""
from .labels import ranking_targets
from .retinanet import APLossRetinaNet

__all__ = ["APLossRetinaNet", "ranking_targets"]
