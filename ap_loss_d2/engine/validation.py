"""Start-up checks of a merged config, run before a model is built or an iteration is run.

:func:`check_startup` (yacs) and :func:`check_startup_lazy` (LazyConfig) raise ``ValueError``
naming the key, the bad value and the fix for:

* dataset names (``DATASETS.TRAIN`` / ``DATASETS.TEST``; ``dataloader.train.dataset.names`` /
  ``dataloader.test.dataset.names``) that are not registered in Detectron2's ``DatasetCatalog``
  (otherwise an unknown test set is only reported after the whole training run);
* an output folder (``OUTPUT_DIR`` / ``train.output_dir``) that cannot be created or written,
  and the dataset cache root (``$AP_LOSS_D2_DATASETS`` / ``$DETECTRON2_DATASETS``) when an
  embedded ``synth_shapes_*`` set still has to be generated there;
* a batch (``SOLVER.IMS_PER_BATCH`` / ``dataloader.train.total_batch_size``) below 1 or not
  divisible by the number of processes.

They also install the dataset checks of :mod:`ap_loss_d2.data.checks` on the configured
datasets (a warning with counts for zero-area boxes and images without annotations, an error
naming the record for negative box sizes).
"""
import difflib
import os
import tempfile

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm


__all__ = ["check_batch_size", "check_dataset_names", "check_startup", "check_startup_lazy", "check_writable"]


def _names(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def check_dataset_names(key: str, names) -> None:
    """Every name in ``names`` must be registered in ``DatasetCatalog`` (ValueError naming
    ``key``, the name, close matches and how to register one)."""
    registered = DatasetCatalog.list()
    for name in _names(names):
        if name in registered:
            continue
        close = difflib.get_close_matches(str(name), registered, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"{key} names the dataset {name!r}, which is not registered in Detectron2's "
            f"DatasetCatalog ({len(registered)} names are, e.g. synth_shapes_train, "
            f"synth_shapes_val, coco_2017_val, voc_2007_test). {hint}Register it first "
            "(detectron2.data.datasets.register_coco_instances / register_pascal_voc), or "
            f"fix {key}."
        )


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(key: str, path: str, fix: str) -> None:
    """``path`` (a folder, created later if missing) must be creatable and writable: probe it by
    creating and removing a temporary file in the folder or its nearest existing ancestor."""
    if not path:
        return
    existing = _nearest_existing(os.path.expanduser(str(path)))
    if not os.path.isdir(existing):
        raise ValueError(
            f"{key}={str(path)!r} cannot be created: {existing} exists and is not a folder. {fix}"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(
            f"{key}={str(path)!r} is not writable: cannot create files in {existing} "
            f"({e.strerror or e}). {fix}"
        ) from None


def check_batch_size(key: str, value, world_size: int, reference_world_size: int = 0) -> None:
    """``value`` images per iteration: an integer >= 1 that splits evenly over ``world_size``
    processes (unless Detectron2 rescales it from ``reference_world_size``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{key}={value!r}: the number of images per iteration (all processes together) must "
            f"be an integer >= 1, e.g. {key} {max(2, world_size)}"
        )
    if reference_world_size and reference_world_size != world_size:
        return  # DefaultTrainer.auto_scale_workers rescales it to the world size
    if value % world_size:
        raise ValueError(
            f"{key}={value} is not divisible by the number of processes, {world_size} "
            f"(--num-gpus x --num-machines): each process must get the same number of images. "
            f"Use a multiple of {world_size}, e.g. {key} {world_size * max(1, value // world_size)}"
        )


_ROOT_FIX = (
    "Point $AP_LOSS_D2_DATASETS (or $DETECTRON2_DATASETS) at a writable folder, or generate the "
    "embedded dataset once where it is writable (ap_loss_d2.data.ensure_synthetic_dataset)."
)


def _check_embedded_roots(names) -> None:
    """For embedded synthetic sets not generated yet, the cache root must be writable."""
    for name in names:
        meta = MetadataCatalog.get(name)
        root = meta.get("dataset_root", None)
        if meta.get("synthetic_spec", None) is None or root is None:
            continue
        if os.path.isfile(os.path.join(root, "manifest.json")):
            continue  # generated already: only read
        check_writable(
            f"dataset root of {name!r} (from $AP_LOSS_D2_DATASETS / $DETECTRON2_DATASETS)",
            os.path.dirname(root),
            _ROOT_FIX,
        )


def check_startup(cfg, world_size=None) -> None:
    """Start-up checks of a merged yacs config (see the module doc)."""
    world = comm.get_world_size() if world_size is None else world_size
    check_dataset_names("DATASETS.TRAIN", cfg.DATASETS.TRAIN)
    check_dataset_names("DATASETS.TEST", cfg.DATASETS.TEST)
    check_batch_size(
        "SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, world, cfg.SOLVER.get("REFERENCE_WORLD_SIZE", 0)
    )
    check_writable("OUTPUT_DIR", cfg.OUTPUT_DIR, "Set OUTPUT_DIR to a folder you can write to.")
    names = _names(cfg.DATASETS.TRAIN) + _names(cfg.DATASETS.TEST)
    _check_embedded_roots(names)


def _lazy_dataset_names(loader):
    dataset = loader.get("dataset", None) if hasattr(loader, "get") else None
    if dataset is None:
        return None
    if hasattr(dataset, "get") and "names" in dataset:
        return _names(dataset.get("names"))
    return None  # a dataset given some other way: not checked here


def check_startup_lazy(cfg, world_size=None) -> None:
    """Start-up checks of a LazyConfig (see the module doc)."""
    world = comm.get_world_size() if world_size is None else world_size
    dataloader = cfg.get("dataloader", None)
    names = []
    for split in ("train", "test"):
        loader = dataloader.get(split, None) if dataloader is not None else None
        found = _lazy_dataset_names(loader) if loader is not None else None
        if found is not None:
            check_dataset_names(f"dataloader.{split}.dataset.names", found)
            names += found
    train = dataloader.get("train", None) if dataloader is not None else None
    if train is not None and "total_batch_size" in train:
        check_batch_size("dataloader.train.total_batch_size", train.total_batch_size, world)
    output_dir = cfg.get("train", {}).get("output_dir", None)
    check_writable("train.output_dir", output_dir, "Set train.output_dir to a folder you can write to.")
    _check_embedded_roots(names)
