"""Data for ap_loss_d2: the embedded synthetic shapes dataset and SSD-style augmentation.

Importing this package registers (lazily, nothing is generated until first use) the Detectron2
datasets ``synth_shapes_train``, ``synth_shapes_val`` (COCO format) and ``synth_shapes_voc_train``,
``synth_shapes_voc_val`` (Pascal VOC format) of the default :class:`SyntheticShapesSpec`, and a
``<name>_nodifficult`` twin of every Pascal VOC dataset registered then (e.g.
``voc_2007_trainval_nodifficult``: the training data of the authors' loader, see
:mod:`ap_loss_d2.data.voc`); see
:mod:`ap_loss_d2.data.synthetic` for the cache location and :mod:`ap_loss_d2.data.mapper` for the
``AP_LOSS_INPUT`` config keys.
"""
from .checks import check_dataset_dicts
from .mapper import (
    AUGMENTATIONS,
    BoxAwareDatasetMapper,
    build_train_mapper,
)
from .synthetic import (
    CLASSES,
    DATASET_NAMES,
    DEFAULT_SPEC,
    SyntheticShapesSpec,
    dataset_root,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    load_synthetic_coco,
    load_synthetic_voc,
    load_validated_coco_json,
    load_validated_voc_instances,
    register_synthetic_shapes,
)
from .voc import (
    NODIFFICULT_SUFFIX,
    drop_difficult,
    register_all_voc_nodifficult,
    register_voc_nodifficult,
    voc_difficult_flags,
)
from .transforms import (
    CenterKeepingCropTransform,
    ExpandTransform,
    MinIoURandomCrop,
    PhotometricDistort,
    PhotometricTransform,
    RandomExpand,
    build_ssd_augmentation,
)

__all__ = [
    "AUGMENTATIONS",
    "BoxAwareDatasetMapper",
    "CLASSES",
    "CenterKeepingCropTransform",
    "DATASET_NAMES",
    "DEFAULT_SPEC",
    "ExpandTransform",
    "MinIoURandomCrop",
    "NODIFFICULT_SUFFIX",
    "PhotometricDistort",
    "PhotometricTransform",
    "RandomExpand",
    "SyntheticShapesSpec",
    "build_ssd_augmentation",
    "build_train_mapper",
    "check_dataset_dicts",
    "drop_difficult",
    "dataset_root",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "load_synthetic_coco",
    "load_synthetic_voc",
    "load_validated_coco_json",
    "load_validated_voc_instances",
    "register_all_voc_nodifficult",
    "register_datasets",
    "register_synthetic_shapes",
    "register_voc_nodifficult",
    "voc_difficult_flags",
]


def register_datasets():
    """Register the embedded ``synth_shapes_*`` sets and the ``_nodifficult`` twins of the registered VOC sets
    (idempotent)."""
    register_synthetic_shapes()
    register_all_voc_nodifficult()


register_datasets()
