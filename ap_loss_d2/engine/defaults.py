"""Detectron2's ``DefaultTrainer`` flow with ap_loss_d2's config, evaluators, data checks and checkpointer."""
import json
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import launch as d2_launch
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.utils import comm

from .. import modeling  # noqa: F401  (registers the models)
from ..config import add_ap_loss_config
from ..data import build_train_mapper, check_dataset_dicts, register_datasets
from ..data.checks import NamingReadErrors, hint_filter_empty
from ..evaluation import build_evaluator
from ..losses.registry import build_cls_loss
from .checkpoint import SafeDetectionCheckpointer

__all__ = ["Trainer", "get_ap_loss_cfg", "launch", "setup_cfg", "validate_cfg"]


_OWN_LOSS = ((RetinaNet, "focal"), (StandardROIHeads, "ce"))  # the loss a stock model trains


def get_ap_loss_cfg():
    """Detectron2's ``get_cfg()`` plus ap_loss_d2's keys."""
    return add_ap_loss_config(get_cfg())


def validate_cfg(cfg):
    """ValueError naming the key, before anything is built: a ``MODEL.CLS_LOSS.NAME`` the model would ignore (stock
    RetinaNet / StandardROIHeads, unless it names their own ``focal`` / ``ce``); the loss options (built once)."""
    name, key = cfg.MODEL.CLS_LOSS.NAME, "MODEL.META_ARCHITECTURE"
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if issubclass(model, GeneralizedRCNN):
        key, model = "MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    if getattr(model, "cls_loss_head", None):
        try:
            build_cls_loss(cfg, model.cls_loss_head)
        except ValueError as e:
            raise ValueError(f"MODEL.CLS_LOSS (NAME={name or 'ap'!r}): {e}") from None
    elif name and not any(issubclass(model, m) and name == own for m, own in _OWN_LOSS):
        fix = "ROI_HEADS.NAME: APLossROIHeads" if "ROI" in key else "META_ARCHITECTURE: APLossRetinaNet or APLossSSD"
        raise ValueError(f"MODEL.CLS_LOSS.NAME={name!r} would be ignored: {key}={model.__name__!r} does not read "
                         f"MODEL.CLS_LOSS (it trains its own loss). Use MODEL.{fix}, or leave MODEL.CLS_LOSS.NAME "
                         "unset")
    build_train_mapper(cfg)  # checks AP_LOSS_INPUT
    return cfg


def setup_cfg(args):
    """Merge ``args.config_file`` and ``args.opts``, validate, freeze, ``default_setup`` (train_net.py's ``setup``
    also checks the run before ``default_setup`` writes to its output folder)."""
    register_datasets()
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    validate_cfg(cfg).freeze()
    default_setup(cfg, args)
    return cfg


def _checked_dicts(name):
    try:
        return check_dataset_dicts(DatasetCatalog.get(name), name)
    except json.JSONDecodeError as e:
        source = MetadataCatalog.get(name).get("json_file", "its annotation file")
        raise ValueError(f"dataset {name!r}: {source} is not valid JSON ({e}); the file is truncated or corrupt. "
                         "Restore it (download or copy it again).") from e


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with ap_loss_d2's evaluators, training mapper (``AP_LOSS_INPUT``), dataset
    checks (``check_dataset_dicts``; image files named when they fail to decode) and the safe checkpointer."""

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this after making its stock checkpointer: the hooks get this one
        self.checkpointer = SafeDetectionCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        for name in cfg.DATASETS.TRAIN:  # checked here, loaded again by Detectron2's loader
            _checked_dicts(name)
        with hint_filter_empty():
            return build_detection_train_loader(cfg, mapper=NamingReadErrors(build_train_mapper(cfg)))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = NamingReadErrors(DatasetMapper(cfg, False))
        dicts = _checked_dicts(dataset_name)
        return build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(), **kwargs):
    """Detectron2's ``launch``, and a shim for Detectron2 v0.6, whose ``launch`` needs CUDA for more than one process:
    without CUDA the processes are started with Gloo. Detectron2's main branch after v0.6 (which has
    ``comm.create_local_process_group``) does that itself; a Detectron2 release after v0.6 makes the shim
    unnecessary."""
    runs_cpu_processes = hasattr(comm, "create_local_process_group")
    if num_machines * num_gpus_per_machine <= 1 or torch.cuda.is_available() or runs_cpu_processes:
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, **kwargs)
    mp.spawn(_gloo_worker, nprocs=num_gpus_per_machine,
             args=(main_func, num_machines, num_gpus_per_machine, machine_rank, dist_url, args, kwargs))


def _gloo_worker(local_rank, main_func, num_machines, per_machine, machine_rank, dist_url, args, kwargs):
    rank, world = machine_rank * per_machine + local_rank, num_machines * per_machine
    dist.init_process_group("gloo", init_method=dist_url, world_size=world, rank=rank, **kwargs)  # kwargs: timeout
    main_func(*args)
