"""ap_loss_d2: AP-loss for Detectron2.

``from ap_loss_d2 import ap_loss, auc_loss`` needs only PyTorch. When Detectron2 is installed,
importing the package also registers the models (``APLossRetinaNet`` in META_ARCH_REGISTRY and
the AP-loss ROI heads in ROI_HEADS_REGISTRY) through ``ap_loss_d2.modeling``, and the embedded
datasets (``synth_shapes_*``, generated on first use) through ``ap_loss_d2.data``.
"""
import importlib.util

from .losses import ap_loss, auc_loss

__version__ = "0.1.0"
__all__ = ["ap_loss", "auc_loss"]

if importlib.util.find_spec("detectron2") is not None:
    from . import data  # noqa: F401  (registers the embedded datasets, lazily)
    from . import modeling  # noqa: F401  (registers the models in Detectron2's registries)
    from .config import add_ap_loss_config  # noqa: F401

    __all__ += ["add_ap_loss_config", "data", "modeling"]
