"""Classification losses as functions of tensors: ``ap_loss`` and ``auc_loss`` need only
PyTorch. The loss modules that Detectron2 heads build from ``MODEL.CLS_LOSS`` are in
:mod:`ap_loss_d2.losses.registry` (imports Detectron2)."""
from .ranking import KERNELS, STEPS, NonFiniteLogitsError, ap_loss, auc_loss, check_ranking_options

__all__ = ["ap_loss", "auc_loss", "check_ranking_options", "NonFiniteLogitsError", "STEPS", "KERNELS"]
