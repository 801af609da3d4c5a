"""ap_loss_d2: AP-loss for Detectron2.

``from ap_loss_d2 import ap_loss, auc_loss`` needs only PyTorch and does not import Detectron2.
``import ap_loss_d2.modeling`` registers the models (``APLossRetinaNet``, ``APLossROIHeads``,
``APLossSSD`` and their parts) in Detectron2's registries, as Detectron2 projects do;
``ap_loss_d2.add_ap_loss_config`` (:mod:`ap_loss_d2.config`) adds the config keys only.
"""
from .losses import ap_loss, auc_loss

__version__ = "0.1.0"
__all__ = ["ap_loss", "auc_loss", "add_ap_loss_config"]


def __getattr__(name):
    if name == "add_ap_loss_config":
        from .config import add_ap_loss_config

        return add_ap_loss_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
