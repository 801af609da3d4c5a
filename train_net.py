#!/usr/bin/env python
"""Train / evaluate Detectron2 detectors with AP-loss: Detectron2's ``tools/train_net.py`` for yaml configs and
``tools/lazyconfig_train_net.py`` for LazyConfig ``.py`` configs, with ap_loss_d2's models, checks and checkpointer.

    python train_net.py --config-file <cfg.yaml | cfg.py> [--eval-only] [--resume] [--num-gpus N] \
        [KEY VALUE | key=value ...]

:func:`main` returns the evaluation results (of ``--eval-only``, or of the evaluation that ends training).
"""
import difflib
import logging
import os
import tempfile

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers, hooks
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format, verify_results
from detectron2.utils import comm

import ap_loss_d2.modeling  # noqa: F401  (registers the models)
from ap_loss_d2.data import register_datasets
from ap_loss_d2.engine import SafeDetectionCheckpointer, Trainer, get_ap_loss_cfg, launch, validate_cfg

logger = logging.getLogger("detectron2")


def check_datasets(names_by_key):
    """Each dataset of ``{key: names}`` is registered (ValueError naming the key, close matches and the fix)."""
    registered = DatasetCatalog.list()
    for key, names in names_by_key.items():
        for name in [n for n in ([names] if isinstance(names, str) else names) if n not in registered]:
            close = difflib.get_close_matches(str(name), registered, n=3)
            raise ValueError(f"{key} names the dataset {name!r}, which is not registered in Detectron2's DatasetCatalog"
                             + (f"; did you mean {', '.join(map(repr, close))}?" if close else ".") + " Register it "
                             "first (detectron2.data.datasets.register_coco_instances / register_pascal_voc), or fix "
                             f"{key}.")


def check_batch(key, value, world_size=None, reference=0):
    """``value`` images per iteration: an integer >= 1 splitting over the processes (unless Detectron2 rescales it)."""
    world = world_size or comm.get_world_size()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: the number of images per iteration (all processes) must be an integer >= 1")
    if value % world and reference in (0, world):
        raise ValueError(f"{key}={value} is not divisible by the number of processes, {world} "
                         "(--num-gpus x --num-machines)")


def check_output(args, output_dir, weights, overwrite, keys):
    """``output_dir`` is writable; --eval-only has weights; a new run (neither --resume nor --eval-only) does not
    overwrite another run's checkpoints. ``keys``: the config's names of (output folder, weights, overwrite switch)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as e:
        raise ValueError(f"{keys[0]}={output_dir!r} is not writable ({e.strerror}: {e.filename or output_dir}). Set "
                         f"{keys[0]} to a folder you can write to.") from None
    if args.eval_only and not weights and not args.resume:
        raise ValueError(f"--eval-only with {keys[1]} empty would evaluate an untrained model: give {keys[1]} "
                         "path/to/model_final.pth (or --resume to evaluate the last checkpoint of the output folder).")
    found = sorted(f for f in os.listdir(output_dir) if f == "last_checkpoint" or f.endswith(".pth"))
    if found and not (args.resume or args.eval_only or overwrite):
        raise ValueError(f"{keys[0]}={output_dir!r} holds another run's checkpoints ({', '.join(found[:4])}), which "
                         f"a new run would overwrite: continue that run with --resume, choose a new {keys[0]}, or set "
                         f"{keys[2]} True to overwrite them on purpose.")


def check_start(cfg, world_size=None):
    """Start-up checks of a yacs config: datasets, NUM_CLASSES against the training sets' classes, batch, processes."""
    check_datasets({"DATASETS.TRAIN": cfg.DATASETS.TRAIN, "DATASETS.TEST": cfg.DATASETS.TEST})
    arch = cfg.MODEL.META_ARCHITECTURE
    head = "ROI_HEADS" if "RCNN" in arch else "RETINANET" if "RetinaNet" in arch else "SSD" if "SSD" in arch else None
    for dataset in cfg.DATASETS.TRAIN if head else ():
        classes = len(MetadataCatalog.get(dataset).get("thing_classes", None) or ())
        if cfg.MODEL[head].NUM_CLASSES < classes:
            raise ValueError(f"MODEL.{head}.NUM_CLASSES={cfg.MODEL[head].NUM_CLASSES}, but the training set "
                             f"{dataset!r} has {classes} classes: set MODEL.{head}.NUM_CLASSES {classes}")
    check_batch("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, world_size, cfg.SOLVER.REFERENCE_WORLD_SIZE)
    if (world_size or comm.get_world_size()) > 1 and cfg.MODEL.DEVICE == "cpu":
        raise ValueError("MODEL.DEVICE cpu in several processes: Detectron2's DefaultTrainer gives "
                         "DistributedDataParallel device_ids, which CPU models reject. Train a yaml config on CPU in "
                         "one process, or a LazyConfig (its CPU processes are wrapped without device_ids: "
                         "docs/multi_gpu.md).")


def setup(args):
    """The engine's ``setup_cfg`` with the start-up checks of this run before ``default_setup`` writes anything."""
    register_datasets()
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_start(validate_cfg(cfg))
    check_output(args, cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS, cfg.AP_LOSS_OUTPUT.OVERWRITE,
                 ("OUTPUT_DIR", "MODEL.WEIGHTS", "AP_LOSS_OUTPUT.OVERWRITE"))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def check_lazy_cls_loss(cfg):
    """Build the loss nodes (``model.cls_loss``, ``model.roi_heads.box_predictor.cls_loss``) once, so that their
    constructors check their options before anything else is built (ValueError naming the node)."""
    for key in ("model.cls_loss", "model.roi_heads.box_predictor.cls_loss"):
        node = cfg
        for part in key.split("."):
            node = node.get(part, None) if hasattr(node, "get") else None
        if hasattr(node, "get") and "_target_" in node:
            try:
                instantiate(node)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{key}: {e}") from None


def setup_lazy(args):
    """Load the LazyConfig, apply ``key=value`` overrides, run the start-up checks and ``default_setup``."""
    register_datasets()
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    check_lazy_cls_loss(cfg)
    check_datasets({f"dataloader.{k}.dataset.names": cfg.dataloader[k].dataset.names for k in ("train", "test")})
    check_batch("dataloader.train.total_batch_size", cfg.dataloader.train.total_batch_size)
    check_output(args, cfg.train.output_dir, cfg.train.init_checkpoint, cfg.train.get("overwrite_output", False),
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
        checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir)
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model) or {}

    cfg = setup(args)
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
