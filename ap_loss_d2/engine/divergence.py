"""The NaN/Inf stop shared by the yacs (``Trainer``) and LazyConfig (``do_train_lazy``) routes."""
from ..losses import NonFiniteLogitsError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Mixin for a Detectron2 trainer (before the trainer class in the bases) with a
    ``checkpointer`` attribute: NaN or Inf in the model's outputs or losses stops training with
    a ``FloatingPointError`` naming the iteration, the last good checkpoint and how to go on.

    ``lr_key``: how the config names the learning rate, for the message.
    """

    lr_key = "SOLVER.BASE_LR"

    def run_step(self):
        try:
            super().run_step()
        except (NonFiniteLogitsError, FloatingPointError) as e:
            checkpointer = getattr(self, "checkpointer", None)
            last = (checkpointer.get_checkpoint_file() if checkpointer is not None else "") or "none saved yet"
            raise FloatingPointError(
                f"Training stopped at iteration {self.iter}: NaN or Inf in the model's outputs or "
                f"losses. Nothing was saved for this iteration; the last good checkpoint is "
                f"{last} (continue with --resume, e.g. with a lower {self.lr_key}).\nCause: {e}"
            ) from e
