"""Classification losses as pure functions of tensors (no Detectron2 needed), and their registry
(:mod:`.registry`: the names ``MODEL.CLS_LOSS.NAME`` may take)."""
from .ranking import STEPS, NonFiniteLogitsError, ap_loss, auc_loss
from .registry import CLS_LOSSES, ClsLoss, cls_loss_names, get_cls_loss, register_cls_loss
from . import baselines  # noqa: F401  (registers "ghm" and "dr", Table 13)

__all__ = [
    "ap_loss",
    "auc_loss",
    "NonFiniteLogitsError",
    "STEPS",
    "CLS_LOSSES",
    "ClsLoss",
    "cls_loss_names",
    "get_cls_loss",
    "register_cls_loss",
]
