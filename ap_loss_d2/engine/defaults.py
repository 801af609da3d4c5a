"""Training with yacs (``.yaml``) configs: config set-up with validation, and the Trainer."""
import logging
import weakref

from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import BOX_REG_NORMALIZERS, NUMERIC_KEYS, add_ap_loss_config, check_number
from ..data import AUGMENTATIONS, build_train_mapper
from ..data.checks import NamingReadErrors, hint_filter_empty
from ..evaluation import build_evaluator
from ..losses import STEPS
from ..losses.distributed import ranking_set_layout
from ..losses.registry import CLS_LOSSES, cls_loss_names, get_cls_loss
from ..modeling import APLossRetinaNet  # noqa: F401  (registers the models)
from .checkpoint import SafeDetectionCheckpointer
from .divergence import NonFiniteGuard
from .launch import create_ddp_model_for
from .validation import check_startup

__all__ = [
    "Trainer",
    "check_cls_loss_is_read",
    "cls_loss_reader",
    "get_ap_loss_cfg",
    "setup_cfg",
    "valid_cls_losses",
    "validate_cfg",
]


def get_ap_loss_cfg():
    """Detectron2's default config plus ap_loss_d2's keys (``add_ap_loss_config``)."""
    cfg = get_cfg()
    add_ap_loss_config(cfg)
    return cfg


def _registered(registry, name):
    try:
        return registry.get(name)
    except KeyError:
        return None


def cls_loss_reader(cfg):
    """``(head, model)`` for the model of ``cfg``: ``head`` is the registry head that reads
    ``MODEL.CLS_LOSS`` (``"retinanet"``, ``"roi_heads"``) or None, ``model`` the class that
    decides it (meta-architecture, or ROI heads of a ``GeneralizedRCNN``; None if unregistered,
    which ``build_model`` reports)."""
    arch = _registered(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE)
    if arch is not None and not getattr(arch, "cls_loss_head", None) and issubclass(arch, GeneralizedRCNN):
        arch = _registered(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME)
    return getattr(arch, "cls_loss_head", None), arch


def valid_cls_losses(cfg):
    """The values ``MODEL.CLS_LOSS.NAME`` may take for the model of ``cfg`` (from the registry).

    Returns None when the model does not read ``MODEL.CLS_LOSS`` (e.g. stock Detectron2 models)
    or its meta-architecture is not registered (``build_model`` reports that).
    """
    head, _ = cls_loss_reader(cfg)
    return None if head is None else cls_loss_names(head)


def check_cls_loss_is_read(cfg):
    """ValueError if ``MODEL.CLS_LOSS.NAME`` is set while the model of ``cfg`` does not read it
    (stock ``RetinaNet``, ``StandardROIHeads``...), unless it names that model's own loss
    (``"focal"`` for RetinaNet, ``"ce"`` for StandardROIHeads); the message names the class to
    use instead."""
    name = cfg.MODEL.CLS_LOSS.NAME
    head, model = cls_loss_reader(cfg)
    if not name or head is not None or model is None:
        return
    own = CLS_LOSSES.get(name)
    if own is not None and any(k.__name__ in own.stock for k in model.__mro__):
        return
    if cfg.MODEL.META_ARCHITECTURE == model.__name__:
        where = f"MODEL.META_ARCHITECTURE={model.__name__!r}"
        fix = "MODEL.META_ARCHITECTURE: APLossRetinaNet (RetinaNet) or a GeneralizedRCNN with MODEL.ROI_HEADS.NAME: APLossROIHeads"
        if issubclass(model, RetinaNet):
            fix = "MODEL.META_ARCHITECTURE: APLossRetinaNet"
    else:
        where = f"MODEL.ROI_HEADS.NAME={model.__name__!r}"
        fix = "MODEL.ROI_HEADS.NAME: APLossROIHeads"
    raise ValueError(
        f"MODEL.CLS_LOSS.NAME={name!r} would be ignored: {where} does not read MODEL.CLS_LOSS "
        f"(it trains its own loss). Use {fix}, or leave MODEL.CLS_LOSS.NAME unset"
    )


def validate_ranking_set(images_per_set, rank_across_processes, total_images, world_size, keys, batch=None):
    """Check the ranking-set settings against the batch and the process count (ValueError).

    ``keys``: the names of (images per set, rank across processes, total batch) in messages;
    ``batch``: how to describe the total batch (default ``"<total batch key>=<total_images>"``).
    A ``total_images`` of None (unknown) or one that does not split over the processes
    (Detectron2 itself rejects that) skips the size check.
    """
    set_key, across_key, batch_key = keys
    if isinstance(images_per_set, bool) or not isinstance(images_per_set, int) or images_per_set < 0:
        raise ValueError(
            f"{set_key}={images_per_set!r} must be an integer >= 0 (images ranked together; "
            f"0 = each process ranks its own images)"
        )
    if rank_across_processes and images_per_set:
        raise ValueError(
            f"{across_key}=True (one ranking set = the whole global batch) and "
            f"{set_key}={images_per_set} both choose the ranking set; set only one of them "
            f"({set_key}=0 to rank the global batch, or {across_key}=False)"
        )
    if not images_per_set or total_images is None or total_images % world_size:
        return
    try:
        ranking_set_layout(images_per_set, total_images // world_size, world_size)
    except ValueError as e:
        batch = batch or f"{batch_key}={total_images}"
        raise ValueError(f"{set_key}={images_per_set} with {batch} on {world_size} process(es): {e}") from e


def validate_cfg(cfg, world_size=None):
    """Check ap_loss_d2's keys of a merged config; raise ValueError naming the valid values.

    Unknown keys are already rejected by yacs when merging (``KeyError: Non-existent config
    key``); this catches bad values before anything is built. ``world_size``: processes that
    will train (default: the current ``torch.distributed`` world), for the ranking set.
    """
    c = cfg.MODEL.CLS_LOSS
    check_cls_loss_is_read(cfg)
    head, model = cls_loss_reader(cfg)
    entry = None
    if head is not None:
        try:
            entry = get_cls_loss(c.NAME or "ap", head)
        except ValueError:
            raise ValueError(
                f"MODEL.CLS_LOSS.NAME={c.NAME!r} is not valid for {model.__name__} "
                f"(MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}); valid names: "
                f"{', '.join(cls_loss_names(head))}"
            ) from None
    if c.STEP not in STEPS:
        raise ValueError(f"MODEL.CLS_LOSS.STEP={c.STEP!r}; valid steps: {', '.join(STEPS)}")
    for key, _, allow_zero in NUMERIC_KEYS:
        check_number(f"MODEL.CLS_LOSS.{key}", c[key], allow_zero)
    if c.BOX_REG_NORMALIZER not in BOX_REG_NORMALIZERS:
        raise ValueError(
            f"MODEL.CLS_LOSS.BOX_REG_NORMALIZER={c.BOX_REG_NORMALIZER!r}; valid values: "
            f"{', '.join(BOX_REG_NORMALIZERS)}"
        )
    if entry is not None and entry.ranks:
        world = comm.get_world_size() if world_size is None else world_size
        total = cfg.SOLVER.IMS_PER_BATCH
        batch = None
        reference = cfg.SOLVER.get("REFERENCE_WORLD_SIZE", 0)
        if reference and reference != world:
            # DefaultTrainer.auto_scale_workers: the images per process stay those of the reference
            total = int(round(total * world / reference))
            batch = (
                f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} (scaled to {total} by "
                f"SOLVER.REFERENCE_WORLD_SIZE={reference})"
            )
        validate_ranking_set(
            c.IMAGES_PER_RANKING_SET,
            c.RANK_ACROSS_PROCESSES,
            total,
            world,
            (
                "MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET",
                "MODEL.CLS_LOSS.RANK_ACROSS_PROCESSES",
                "SOLVER.IMS_PER_BATCH",
            ),
            batch,
        )
    aug = cfg.AP_LOSS_INPUT.AUGMENTATION
    if aug not in AUGMENTATIONS:
        raise ValueError(f"AP_LOSS_INPUT.AUGMENTATION={aug!r}; valid values: {', '.join(AUGMENTATIONS)}")
    if not cfg.AP_LOSS_INPUT.FIXED_SIZE > 0:
        raise ValueError(f"AP_LOSS_INPUT.FIXED_SIZE={cfg.AP_LOSS_INPUT.FIXED_SIZE!r} must be > 0")
    return cfg


def setup_cfg(args):
    """Build, validate and freeze the config of ``args`` (``config_file``, ``opts``), then run
    Detectron2's ``default_setup`` (logging, output dir, config dump, seed)."""
    cfg = get_ap_loss_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    validate_cfg(cfg)
    check_startup(cfg)  # datasets, output paths, batch size: before anything is built
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


class Trainer(NonFiniteGuard, DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with ap_loss_d2's evaluator selection, training mapper
    (SSD augmentation when ``AP_LOSS_INPUT.AUGMENTATION == "ssd"``) and checkpointer
    (:class:`SafeDetectionCheckpointer`: atomic saves, weights-only loading); NaN/Inf stops with
    :class:`~.divergence.NonFiniteGuard`'s message. Trains in several CPU processes too: the model
    is wrapped by :meth:`wrap_model` (``DistributedDataParallel`` without ``device_ids`` on CPU)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with the model wrapped by wrap_model and the checkpointer
        # SafeDetectionCheckpointer
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.wrap_model(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def wrap_model(cls, model):
        """``DistributedDataParallel`` for several processes (as ``DefaultTrainer``), without
        ``device_ids`` for a model on CPU."""
        return create_ddp_model_for(model, broadcast_buffers=False)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        # build_train_mapper: Detectron2's DatasetMapper(cfg, True) unless AUGMENTATION is "ssd";
        # NamingReadErrors names the file of an image that fails to decode
        with hint_filter_empty():
            return build_detection_train_loader(cfg, mapper=NamingReadErrors(build_train_mapper(cfg)))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = NamingReadErrors(DatasetMapper(cfg, False))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
