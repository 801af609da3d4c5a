"""The NaN/Inf stop shared by the yacs (``Trainer``) and LazyConfig (``do_train_lazy``) routes."""
from ..losses import NonFiniteLogitsError
from .checkpoint import divergence_message

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Mixin for a Detectron2 trainer (before the trainer class in the bases) with a
    ``checkpointer`` attribute: NaN or Inf in the model's outputs or losses stops training with
    a ``FloatingPointError`` naming the iteration, the newest checkpoint with healthy weights
    (:func:`~ap_loss_d2.engine.checkpoint.divergence_message`) and how to go on.

    ``lr_key``: how the config names the learning rate, for the message.
    """

    lr_key = "SOLVER.BASE_LR"

    def run_step(self):
        try:
            super().run_step()
        except (NonFiniteLogitsError, FloatingPointError) as e:
            checkpointer = getattr(self, "checkpointer", None)
            save_dir = getattr(checkpointer, "save_dir", "") if checkpointer is not None else ""
            raise FloatingPointError(divergence_message(self.iter, save_dir, e, self.lr_key)) from e
