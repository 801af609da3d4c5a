"""Training and evaluation with Detectron2's ``DefaultTrainer`` and ap_loss_d2's models; ``train_net.py`` at the
repository root is the command line (yaml and LazyConfig)."""
from .checkpoint import SafeDetectionCheckpointer
from .defaults import Trainer, get_ap_loss_cfg, launch, setup_cfg, validate_cfg

__all__ = ["SafeDetectionCheckpointer", "Trainer", "get_ap_loss_cfg", "launch", "setup_cfg", "validate_cfg"]
