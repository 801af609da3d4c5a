"""Detectron2's ``DefaultTrainer`` flow with ap_loss_d2's config, start-up checks and checkpointer."""
import difflib
import json
import os
import socket
import tempfile
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.utils import comm

from ..config import add_ap_loss_config
from ..data import build_train_mapper, check_dataset_dicts, register_datasets
from ..data.checks import NamingReadErrors, hint_filter_empty
from ..evaluation import build_evaluator
from ..losses.registry import build_cls_loss
from .checkpoint import SafeDetectionCheckpointer

__all__ = ["Trainer", "check_run", "check_startup", "get_ap_loss_cfg", "launch", "setup_cfg", "validate_cfg"]


def get_ap_loss_cfg():
    """Detectron2's ``get_cfg()`` plus ap_loss_d2's keys."""
    return add_ap_loss_config(get_cfg())


def _model_class(cfg):
    """(the class reading MODEL.CLS_LOSS: meta-architecture or RoI heads, its key), or (None, None)."""
    arch, key = cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE"
    model = META_ARCH_REGISTRY.get(arch) if arch in META_ARCH_REGISTRY else None
    if model is not None and issubclass(model, GeneralizedRCNN):
        name, key = cfg.MODEL.ROI_HEADS.NAME, "MODEL.ROI_HEADS.NAME"
        model = ROI_HEADS_REGISTRY.get(name) if name in ROI_HEADS_REGISTRY else None
    return model, key


def validate_cfg(cfg):
    """ValueError naming the key, before anything is built: a ``MODEL.CLS_LOSS.NAME`` the model would ignore
    (stock RetinaNet / StandardROIHeads, unless it names their own ``focal`` / ``ce``), the loss options (the loss
    is built once), a ``NUM_CLASSES`` below the training sets' class count."""
    name, (model, key) = cfg.MODEL.CLS_LOSS.NAME, _model_class(cfg)
    head = getattr(model, "cls_loss_head", None)
    if head:
        try:
            build_cls_loss(cfg, head)
        except ValueError as e:
            raise ValueError(f"MODEL.CLS_LOSS (NAME={name or 'ap'!r}): {e}") from None
    elif name and model is not None and not any(issubclass(model, m) and name == own for m, own in ((RetinaNet, "focal"), (StandardROIHeads, "ce"))):
        fix = "MODEL.ROI_HEADS.NAME: APLossROIHeads" if key.endswith("ROI_HEADS.NAME") else "MODEL.META_ARCHITECTURE: APLossRetinaNet or APLossSSD"
        raise ValueError(f"MODEL.CLS_LOSS.NAME={name!r} would be ignored: {key}={model.__name__!r} does not read MODEL.CLS_LOSS "
                         f"(it trains its own loss). Use {fix}, or leave MODEL.CLS_LOSS.NAME unset")
    classes = "ROI_HEADS" if key.endswith("ROI_HEADS.NAME") else "SSD" if "SSD" in cfg.MODEL.META_ARCHITECTURE else "RETINANET"
    for dataset in cfg.DATASETS.TRAIN:
        names = MetadataCatalog.get(dataset).get("thing_classes", None) if dataset in DatasetCatalog.list() else None
        if names and classes in cfg.MODEL and cfg.MODEL[classes].NUM_CLASSES < len(names):
            raise ValueError(f"MODEL.{classes}.NUM_CLASSES={cfg.MODEL[classes].NUM_CLASSES}, but the training set {dataset!r} "
                             f"has {len(names)} classes: set MODEL.{classes}.NUM_CLASSES {len(names)}")
    return cfg


def check_startup(datasets, batch, output_dir, world_size=None):
    """Start-up checks (ValueError naming the key): ``datasets`` {key: names} registered; ``batch`` (key, images per
    iteration, REFERENCE_WORLD_SIZE) an integer >= 1 dividing over the processes; ``output_dir`` (key, folder) writable."""
    registered, world = DatasetCatalog.list(), world_size or comm.get_world_size()
    for key, names in datasets.items():
        for name in [names] if isinstance(names, str) else names:
            if name not in registered:
                close = difflib.get_close_matches(str(name), registered, n=3)
                raise ValueError(f"{key} names the dataset {name!r}, which is not registered in Detectron2's DatasetCatalog"
                                 + (f"; did you mean {', '.join(map(repr, close))}?" if close else ".") + " Register it first "
                                 f"(detectron2.data.datasets.register_coco_instances / register_pascal_voc), or fix {key}.")
    (key, value, reference) = batch
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: the number of images per iteration (all processes) must be an integer >= 1")
    if value % world and reference in (0, world):
        raise ValueError(f"{key}={value} is not divisible by the number of processes, {world} (--num-gpus x --num-machines)")
    key, path = output_dir
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"{key}={path!r} is not writable ({e.strerror}: {e.filename or path}). Set {key} to a folder you "
                         "can write to.") from None


def check_run(args, output_dir, weights, overwrite, keys):
    """--eval-only needs weights; a new run (neither --resume nor --eval-only) must not overwrite another run's
    checkpoints. ``keys``: how the config names (the output folder, the weights, the overwrite switch)."""
    if args.eval_only and not weights and not args.resume:
        raise ValueError(f"--eval-only with {keys[1]} empty would evaluate an untrained model: give {keys[1]} "
                         "path/to/model_final.pth (or --resume to evaluate the last checkpoint of the output folder).")
    if args.resume or args.eval_only or overwrite or not os.path.isdir(output_dir):
        return
    found = sorted(f for f in os.listdir(output_dir) if f == "last_checkpoint" or f.endswith(".pth"))
    if found:
        raise ValueError(f"{keys[0]}={output_dir!r} holds another run's checkpoints ({', '.join(found[:4])}), which a new "
                         f"run would overwrite: continue that run with --resume, choose a new {keys[0]}, or set "
                         f"{keys[2]} True to overwrite them on purpose.")


def setup_cfg(args):
    """Merge ``args.config_file`` and ``args.opts``, validate, freeze, ``default_setup``; the config."""
    register_datasets()
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    validate_cfg(cfg)
    if comm.get_world_size() > 1 and cfg.MODEL.DEVICE == "cpu":
        raise ValueError("MODEL.DEVICE cpu in several processes: Detectron2's DefaultTrainer gives DistributedDataParallel "
                         "device_ids, which CPU models reject. Train a yaml config on CPU in one process, or use a "
                         "LazyConfig (train_net.py trains it in several CPU processes with Gloo).")
    check_startup({"DATASETS.TRAIN": cfg.DATASETS.TRAIN, "DATASETS.TEST": cfg.DATASETS.TEST},
                  ("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE), ("OUTPUT_DIR", cfg.OUTPUT_DIR))
    check_run(args, cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS, cfg.AP_LOSS_OUTPUT.OVERWRITE,
              ("OUTPUT_DIR", "MODEL.WEIGHTS", "AP_LOSS_OUTPUT.OVERWRITE"))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def checked_dicts(name):
    """``DatasetCatalog.get(name)`` through ``check_dataset_dicts``; a truncated annotation file is named."""
    try:
        return check_dataset_dicts(DatasetCatalog.get(name), name)
    except json.JSONDecodeError as e:
        source = MetadataCatalog.get(name).get("json_file", "its annotation file")
        raise ValueError(f"dataset {name!r}: {source} is not valid JSON ({e}); the file is truncated or corrupt. "
                         "Restore it (download or copy it again).") from e


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with ap_loss_d2's evaluators, training mapper (``AP_LOSS_INPUT``), dataset
    checks and :class:`SafeDetectionCheckpointer`."""

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this once its stock checkpointer exists; the hooks use this one
        self.checkpointer = SafeDetectionCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        for name in cfg.DATASETS.TRAIN:  # checked here, loaded again by Detectron2's loader
            checked_dicts(name)
        with hint_filter_empty():
            return build_detection_train_loader(cfg, mapper=NamingReadErrors(build_train_mapper(cfg)))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = NamingReadErrors(DatasetMapper(cfg, False))
        return build_detection_test_loader(checked_dicts(dataset_name), mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(), timeout=DEFAULT_TIMEOUT):
    """Detectron2's ``launch``. Shim for Detectron2 v0.6, whose ``launch`` needs CUDA for more than one process: without
    CUDA it starts the processes with Gloo. Detectron2's main branch after v0.6 (the one with
    ``comm.create_local_process_group``) does so itself; a Detectron2 release after v0.6 makes this unnecessary."""
    world = num_machines * num_gpus_per_machine
    if world <= 1 or torch.cuda.is_available() or hasattr(comm, "create_local_process_group"):
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
    if dist_url == "auto":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dist_url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    mp.spawn(_cpu_worker, nprocs=num_gpus_per_machine, daemon=False,
             args=(main_func, world, num_gpus_per_machine, machine_rank, dist_url, args, timeout))


def _cpu_worker(local_rank, main_func, world, per_machine, machine_rank, dist_url, args, timeout):
    dist.init_process_group("gloo", init_method=dist_url, world_size=world, rank=machine_rank * per_machine + local_rank, timeout=timeout)
    comm.synchronize()
    main_func(*args)
