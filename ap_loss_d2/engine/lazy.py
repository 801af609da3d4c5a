"""Training with LazyConfig (``.py``) configs, in the style of Detectron2's
``tools/lazyconfig_train_net.py``.

A config provides ``model``, ``optimizer``, ``lr_multiplier``, ``dataloader.{train,test,evaluator}``
and ``train`` (Detectron2's ``configs/common/train.py`` keys: ``output_dir``, ``init_checkpoint``,
``max_iter``, ``amp.enabled``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``,
``device``).
"""
import inspect
import logging

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format, verify_results
from detectron2.utils import comm

from ..data import register_datasets
from .checkpoint import SafeDetectionCheckpointer
from .divergence import NonFiniteGuard
from .launch import create_ddp_model_for
from .validation import check_startup_lazy

__all__ = [
    "build_lazy_model",
    "do_test_lazy",
    "do_train_lazy",
    "check_lazy_cls_loss",
    "setup_lazy_cfg",
    "verify_lazy_results",
]

logger = logging.getLogger("detectron2")


def check_lazy_cls_loss(cfg):
    """Fail fast, before anything is written or built: instantiate the loss nodes of
    ``cfg.model`` (``model.cls_loss``, ``model.roi_heads.box_predictor.cls_loss``) once, so that
    their constructors check their options (ValueError naming the node)."""
    model = cfg.get("model", None)
    nodes = {"model.cls_loss": model.get("cls_loss", None) if hasattr(model, "get") else None}
    roi_heads = model.get("roi_heads", None) if hasattr(model, "get") else None
    predictor = roi_heads.get("box_predictor", None) if hasattr(roi_heads, "get") else None
    nodes["model.roi_heads.box_predictor.cls_loss"] = predictor.get("cls_loss", None) if hasattr(predictor, "get") else None
    for key, node in nodes.items():
        if hasattr(node, "get") and "_target_" in node:
            try:
                instantiate(node)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None


def setup_lazy_cfg(args):
    """Load ``args.config_file``, apply ``args.opts`` (``key=value``), check datasets and paths,
    ``default_setup``. The model's arguments are checked by their constructors."""
    register_datasets()
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_lazy_cls_loss(cfg)
    check_startup_lazy(cfg)  # datasets, output paths, batch size: before anything is built
    default_setup(cfg, args)
    return cfg


def build_lazy_model(cfg):
    """Instantiate ``cfg.model`` on ``cfg.train.device``."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    return model


def do_test_lazy(cfg, model):
    """Run ``cfg.dataloader.evaluator`` on ``cfg.dataloader.test``; None without an evaluator."""
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret
    return None


class _GuardedSimpleTrainer(NonFiniteGuard, SimpleTrainer):
    lr_key = "optimizer.lr"
    weights_option = "train.init_checkpoint={}"


class _GuardedAMPTrainer(NonFiniteGuard, AMPTrainer):
    lr_key = "optimizer.lr"
    weights_option = "train.init_checkpoint={}"


def verify_lazy_results(cfg, results):
    """Detectron2's ``verify_results`` for LazyConfig: ``train.expected_results`` (optional) is
    a list of ``[task, metric, value, tolerance]`` as yacs' ``TEST.EXPECTED_RESULTS``; a
    mismatch exits with an error after logging it. True without expectations."""
    expected = cfg.train.get("expected_results", None) if "train" in cfg else None
    if not expected or results is None:
        return True
    node = CfgNode({"TEST": {"EXPECTED_RESULTS": [list(x) for x in expected]}})
    return verify_results(node, results)


def _build_trainer(cfg, model, data_loader, optimizer):
    if not cfg.train.amp.enabled:
        return _GuardedSimpleTrainer(model, data_loader, optimizer)
    kwargs = {}
    precision = cfg.train.amp.get("precision", None)
    if precision is not None and "precision" in inspect.signature(AMPTrainer.__init__).parameters:
        import torch

        kwargs["precision"] = getattr(torch, precision) if isinstance(precision, str) else precision
    return _GuardedAMPTrainer(model, data_loader, optimizer, **kwargs)


def do_train_lazy(cfg, args):
    """Train ``cfg`` (resuming from ``cfg.train.output_dir`` when ``args.resume``).

    Returns the results of the last evaluation (None if no evaluator ran).
    """
    model = build_lazy_model(cfg)
    logger.info("Model:\n{}".format(model))

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model_for(model, **cfg.train.ddp)  # CPU processes too
    trainer = _build_trainer(cfg, model, train_loader, optim)
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.checkpointer = checkpointer  # named by NonFiniteGuard's message

    results = {}

    def test_and_keep():
        ret = do_test_lazy(cfg, model)
        results["last"] = ret
        return ret

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, test_and_keep),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint stores the iteration that just finished: start at the next one.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)
    if comm.is_main_process():
        verify_lazy_results(cfg, results.get("last"))
    return results.get("last")
