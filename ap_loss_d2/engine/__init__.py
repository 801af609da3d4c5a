"""Training entry points: yacs (``Trainer``, ``setup_cfg``) and LazyConfig (``do_train_lazy``,
``do_test_lazy``). ``train_net.py`` at the repository root wires them to the command line."""
from .checkpoint import SafeDetectionCheckpointer
from .defaults import Trainer, get_ap_loss_cfg, setup_cfg, validate_cfg
from .launch import create_ddp_model_for, launch
from .divergence import NonFiniteGuard
from .lazy import (
    build_lazy_model,
    do_test_lazy,
    do_train_lazy,
    setup_lazy_cfg,
    verify_lazy_results,
)

__all__ = [
    "NonFiniteGuard",
    "SafeDetectionCheckpointer",
    "Trainer",
    "build_lazy_model",
    "create_ddp_model_for",
    "do_test_lazy",
    "do_train_lazy",
    "get_ap_loss_cfg",
    "launch",
    "setup_cfg",
    "setup_lazy_cfg",
    "validate_cfg",
    "verify_lazy_results",
]
