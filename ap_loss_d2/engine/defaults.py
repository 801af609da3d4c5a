"""Detectron2's ``DefaultTrainer`` flow with ap_loss_d2's config, evaluators, data checks and checkpointer."""
import json
import weakref

import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup, launch as d2_launch
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, GeneralizedRCNN, RetinaNet, StandardROIHeads
from detectron2.utils import comm

from .. import modeling  # noqa: F401  (registers the models)
from ..config import add_ap_loss_config
from ..data import NamingReadErrors, build_train_mapper, check_dataset_dicts, hint_filter_empty, register_datasets
from ..evaluation import build_evaluator
from ..losses.registry import build_cls_loss
from .checkpoint import SafeDetectionCheckpointer


def get_ap_loss_cfg():
    """Detectron2's ``get_cfg()`` plus ap_loss_d2's keys."""
    return add_ap_loss_config(get_cfg())


def validate_cfg(cfg):
    """ValueError naming the key, before anything is built: an ignored ``MODEL.CLS_LOSS.NAME``, bad loss options."""
    name, key = cfg.MODEL.CLS_LOSS.NAME, "MODEL.META_ARCHITECTURE"
    model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if issubclass(model, GeneralizedRCNN):
        key, model = "MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    own = "focal" if issubclass(model, RetinaNet) else "ce" if issubclass(model, StandardROIHeads) else None
    if getattr(model, "cls_loss_head", None):
        try:
            build_cls_loss(cfg, model.cls_loss_head)
        except ValueError as e:
            raise ValueError(f"MODEL.CLS_LOSS (NAME={name or 'ap'!r}): {e}") from None
    elif name and name != own:  # a stock model trains its own loss
        fix = "ROI_HEADS.NAME: APLossROIHeads" if "ROI" in key else "META_ARCHITECTURE: APLossRetinaNet or APLossSSD"
        raise ValueError(f"MODEL.CLS_LOSS.NAME={name!r} would be ignored: {key}={model.__name__!r} trains its own loss."
                         f" Use MODEL.{fix}, or leave MODEL.CLS_LOSS.NAME unset")
    build_train_mapper(cfg)  # checks AP_LOSS_INPUT
    return cfg


def setup_cfg(args):
    """Merge ``args.config_file`` and ``args.opts``, validate, freeze, ``default_setup``."""
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
        path = MetadataCatalog.get(name).get("json_file", "its annotation file")
        raise ValueError(f"dataset {name!r}: {path} is not valid JSON ({e}); the file is truncated, restore it") from e


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with ap_loss_d2's evaluators, training mapper, dataset checks and checkpointer."""

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this after making its stock checkpointer: the hooks get this one
        self.checkpointer = SafeDetectionCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        return super().build_hooks()

    build_evaluator = staticmethod(build_evaluator)

    @classmethod
    def build_train_loader(cls, cfg):
        for name in cfg.DATASETS.TRAIN:  # checked here, loaded again by Detectron2's loader
            _checked_dicts(name)
        with hint_filter_empty():
            return build_detection_train_loader(cfg, mapper=NamingReadErrors(build_train_mapper(cfg)))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper, workers = NamingReadErrors(DatasetMapper(cfg, False)), cfg.DATALOADER.NUM_WORKERS
        return build_detection_test_loader(_checked_dicts(dataset_name), mapper=mapper, num_workers=workers)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(), **kwargs):
    """Detectron2's ``launch``; CPU processes start with Gloo on v0.6 (a shim: releases after v0.6 do it themselves)."""
    runs_cpu_processes = hasattr(comm, "create_local_process_group")
    if num_machines * num_gpus_per_machine <= 1 or torch.cuda.is_available() or runs_cpu_processes:
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, **kwargs)
    world, first = num_machines * num_gpus_per_machine, machine_rank * num_gpus_per_machine
    torch.multiprocessing.spawn(_gloo_worker, (main_func, world, first, dist_url, args, kwargs), num_gpus_per_machine)


def _gloo_worker(local, main_func, world, first, dist_url, args, kwargs):
    torch.distributed.init_process_group("gloo", init_method=dist_url, world_size=world, rank=first + local, **kwargs)
    main_func(*args)
