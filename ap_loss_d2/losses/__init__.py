"""Classification losses as pure functions of tensors (no Detectron2 needed)."""
from .ranking import STEPS, NonFiniteLogitsError, ap_loss, auc_loss

__all__ = ["ap_loss", "auc_loss", "NonFiniteLogitsError", "STEPS"]
