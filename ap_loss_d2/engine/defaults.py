"""Training with yacs (``.yaml``) configs: config set-up with validation, and the Trainer."""
import logging
import weakref

from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import modeling  # noqa: F401  (registers the models)
from ..config import add_ap_loss_config
from ..data import AUGMENTATIONS, build_train_mapper, register_datasets
from ..data.checks import NamingReadErrors, hint_filter_empty
from ..evaluation import build_evaluator
from ..losses.registry import build_cls_loss
from .checkpoint import SafeDetectionCheckpointer
from .divergence import NonFiniteGuard
from .launch import create_ddp_model_for
from .validation import check_startup

__all__ = ["Trainer", "check_cls_loss_is_read", "get_ap_loss_cfg", "setup_cfg", "validate_cfg"]

# The loss a stock Detectron2 model trains: MODEL.CLS_LOSS.NAME may name it with that model.
_STOCK_LOSSES = ((RetinaNet, "focal"), (StandardROIHeads, "ce"))


def get_ap_loss_cfg():
    """Detectron2's default config plus ap_loss_d2's keys (``add_ap_loss_config``)."""
    cfg = get_cfg()
    add_ap_loss_config(cfg)
    return cfg


def _registered(registry, name):
    return registry.get(name) if name in registry else None


def check_cls_loss_is_read(cfg):
    """ValueError if ``MODEL.CLS_LOSS.NAME`` is set while the model of ``cfg`` does not read it
    (stock ``RetinaNet``, ``StandardROIHeads``...), unless it names that model's own loss
    (``"focal"`` for RetinaNet, ``"ce"`` for StandardROIHeads); the message names the class to
    use instead. Returns the head that reads it (the model's ``cls_loss_head``), or None."""
    name = cfg.MODEL.CLS_LOSS.NAME
    model = _registered(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE)
    if model is not None and issubclass(model, GeneralizedRCNN):
        model = _registered(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME)
    head = getattr(model, "cls_loss_head", None)
    if not name or model is None or head:
        return head
    if any(issubclass(model, stock) and name == own for stock, own in _STOCK_LOSSES):
        return None
    if issubclass(model, RetinaNet):
        where, fix = f"MODEL.META_ARCHITECTURE={model.__name__!r}", "MODEL.META_ARCHITECTURE: APLossRetinaNet"
    elif cfg.MODEL.META_ARCHITECTURE == model.__name__:
        where = f"MODEL.META_ARCHITECTURE={model.__name__!r}"
        fix = "MODEL.META_ARCHITECTURE: APLossRetinaNet or APLossSSD, or a GeneralizedRCNN with MODEL.ROI_HEADS.NAME: APLossROIHeads"
    else:
        where, fix = f"MODEL.ROI_HEADS.NAME={model.__name__!r}", "MODEL.ROI_HEADS.NAME: APLossROIHeads"
    raise ValueError(
        f"MODEL.CLS_LOSS.NAME={name!r} would be ignored: {where} does not read MODEL.CLS_LOSS "
        f"(it trains its own loss). Use {fix}, or leave MODEL.CLS_LOSS.NAME unset"
    )


def validate_cfg(cfg):
    """Fail fast, before anything is written or built (ValueError naming the key): a
    ``MODEL.CLS_LOSS.NAME`` the model would ignore; the loss of ``MODEL.CLS_LOSS``, built once
    here so that its constructor checks its options; ``AP_LOSS_INPUT``."""
    head = check_cls_loss_is_read(cfg)
    if head is not None:
        try:
            build_cls_loss(cfg, head)
        except ValueError as e:
            raise ValueError(f"MODEL.CLS_LOSS (NAME={cfg.MODEL.CLS_LOSS.NAME or 'ap'!r}): {e}") from None
    aug = cfg.AP_LOSS_INPUT.AUGMENTATION
    if aug not in AUGMENTATIONS:
        raise ValueError(f"AP_LOSS_INPUT.AUGMENTATION={aug!r}; valid values: {', '.join(AUGMENTATIONS)}")
    if not cfg.AP_LOSS_INPUT.FIXED_SIZE > 0:
        raise ValueError(f"AP_LOSS_INPUT.FIXED_SIZE={cfg.AP_LOSS_INPUT.FIXED_SIZE!r} must be > 0")
    return cfg


def setup_cfg(args):
    """Build, validate and freeze the config of ``args`` (``config_file``, ``opts``), then run
    Detectron2's ``default_setup`` (logging, output dir, config dump, seed)."""
    register_datasets()
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
