"""The NaN/Inf stop shared by the yacs (``Trainer``) and LazyConfig (``do_train_lazy``) routes."""
import os

from ..losses import NonFiniteLogitsError
from .checkpoint import usable_checkpoints

__all__ = ["NonFiniteGuard", "divergence_message"]


def divergence_message(
    iteration: int, save_dir: str, cause, lr_key="SOLVER.BASE_LR", weights_option="MODEL.WEIGHTS {}"
) -> str:
    """The message that stops a diverged run: the iteration, and the checkpoints with finite
    weights (:func:`~.checkpoint.usable_checkpoints`, the newest five) with their largest
    |weight|, so that one saved before the weights grew can be chosen."""
    found = usable_checkpoints(save_dir) if save_dir else []
    if not found:
        advice = f"no checkpoint with finite weights was saved yet: start again with a lower {lr_key}"
    else:
        listed = ", ".join(f"{os.path.basename(p)} ({m:.3g})" for _, p, m in found[-5:])
        advice = (
            f"checkpoints in {save_dir} with finite weights, by iteration (largest |weight|): "
            f"{listed}. --resume continues from the newest with its own learning-rate schedule; "
            f"to go on with a lower {lr_key}, start a new run from one saved before the weights "
            f"grew, e.g. {weights_option.format(found[0][1])}"
        )
    return (
        f"Training stopped at iteration {iteration}: NaN or Inf in the model's outputs or losses. "
        f"Nothing was saved for this iteration; {advice}.\nCause: {cause}"
    )


class NonFiniteGuard:
    """Mixin for a Detectron2 trainer (before the trainer class in the bases) with a
    ``checkpointer`` attribute: NaN or Inf in the model's outputs or losses stops training with
    a ``FloatingPointError`` naming the iteration, the checkpoints with finite weights
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
