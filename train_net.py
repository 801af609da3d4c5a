#!/usr/bin/env python
"""Train / evaluate Detectron2 detectors with AP-loss: Detectron2's ``tools/train_net.py`` for yaml configs and
``tools/lazyconfig_train_net.py`` for LazyConfig ``.py`` configs, with ap_loss_d2's models, checks and checkpointer.

    python train_net.py --config-file <cfg.yaml | cfg.py> [--eval-only] [--resume] [--num-gpus N] [KEY VALUE | key=value ...]

:func:`main` returns the evaluation results (of ``--eval-only``, or of the evaluation that ends training).
"""
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format, verify_results
from detectron2.utils import comm

import ap_loss_d2.modeling  # noqa: F401  (registers the models)
from ap_loss_d2.data import register_datasets
from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, launch, setup_cfg
from ap_loss_d2.engine.defaults import check_run, check_startup

logger = logging.getLogger("detectron2")


def setup_lazy(args):
    """Load the LazyConfig, apply ``key=value`` overrides, run the start-up checks and ``default_setup``."""
    register_datasets()
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    loss = cfg.model.get("cls_loss", None)
    if loss is not None and "_target_" in loss:
        try:  # its constructor checks its options: fail before anything is built
            instantiate(loss)
        except ValueError as e:
            raise ValueError(f"model.cls_loss: {e}") from None
    train = cfg.dataloader.train
    check_startup({f"dataloader.{k}.dataset.names": cfg.dataloader[k].dataset.names for k in ("train", "test")},
                  ("dataloader.train.total_batch_size", train.total_batch_size, 0), ("train.output_dir", cfg.train.output_dir))
    check_run(args, cfg.train.output_dir, cfg.train.init_checkpoint, cfg.train.get("overwrite_output", False),
              ("train.output_dir", "train.init_checkpoint", "train.overwrite_output"))
    default_setup(cfg, args)
    return cfg


def create_lazy_ddp_model(cfg, model):
    """``create_ddp_model`` with ``cfg.train.ddp``; a CPU model takes no ``device_ids``."""
    return create_ddp_model(model, **{**({"device_ids": None} if cfg.train.device == "cpu" else {}), **cfg.train.ddp})


def do_test(cfg, model):
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
        print_csv_format(ret)
        return ret


def do_train(args, cfg):
    """Detectron2's LazyConfig training (``tools/lazyconfig_train_net.py``); the last evaluation's results."""
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_lazy_ddp_model(cfg, model)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: results.update(last=do_test(cfg, model)) or results["last"]),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # the checkpoint stores the iteration that finished: start at the next one
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results.get("last") or {}


def main(args):
    if args.config_file.endswith(".py"):
        cfg = setup_lazy(args)
        if not args.eval_only:
            return do_train(args, cfg)
        model = create_lazy_ddp_model(cfg, instantiate(cfg.model).to(cfg.train.device))
        SafeDetectionCheckpointer(model, cfg.train.output_dir).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model) or {}

    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()  # the results only with TEST.EXPECTED_RESULTS; DefaultTrainer keeps its last evaluation
    return res if res is not None else getattr(trainer, "_last_eval_results", None) or {}


def invoke_main(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
