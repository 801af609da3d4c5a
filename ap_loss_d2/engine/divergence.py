"""The NaN/Inf stop shared by the yacs (``Trainer``) and LazyConfig (``do_train_lazy``) routes."""
from ..losses import NonFiniteLogitsError
from .checkpoint import newest_usable_checkpoint

__all__ = ["NonFiniteGuard", "divergence_message"]


def divergence_message(iteration: int, save_dir: str, cause, lr_key="SOLVER.BASE_LR", weights_option="MODEL.WEIGHTS {}") -> str:
    """The message that stops a diverged run: the iteration, and the checkpoint ``--resume``
    would start from (:func:`~.checkpoint.newest_usable_checkpoint`: readable, finite weights)."""
    good = newest_usable_checkpoint(save_dir) if save_dir else None
    if good is None:
        advice = f"no checkpoint with finite weights was saved yet: start again, e.g. with a lower {lr_key}"
    else:
        advice = (
            f"the newest checkpoint with finite weights is {good}. --resume continues from it with "
            f"its own learning-rate schedule; to go on with a lower {lr_key}, start a new run from "
            f"its weights ({weights_option.format(good)})"
        )
    return (
        f"Training stopped at iteration {iteration}: NaN or Inf in the model's outputs or losses. "
        f"Nothing was saved for this iteration; {advice}.\nCause: {cause}"
    )


class NonFiniteGuard:
    """Mixin for a Detectron2 trainer (before the trainer class in the bases) with a
    ``checkpointer`` attribute: NaN or Inf in the model's outputs or losses stops training with
    a ``FloatingPointError`` naming the iteration, the newest checkpoint with finite weights
    (:func:`divergence_message`) and how to go on.

    ``lr_key`` / ``weights_option``: how the config names the learning rate and sets the initial
    weights, for the message.
    """

    lr_key = "SOLVER.BASE_LR"
    weights_option = "MODEL.WEIGHTS {}"

    def run_step(self):
        try:
            super().run_step()
        except (NonFiniteLogitsError, FloatingPointError) as e:
            checkpointer = getattr(self, "checkpointer", None)
            save_dir = getattr(checkpointer, "save_dir", "") if checkpointer is not None else ""
            raise FloatingPointError(
                divergence_message(self.iter, save_dir, e, self.lr_key, self.weights_option)
            ) from e
