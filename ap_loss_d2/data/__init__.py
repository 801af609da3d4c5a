"""Data for ap_loss_d2: the embedded synthetic shapes dataset, Pascal VOC without "difficult"
objects, SSD-style augmentation, checks of loaded dataset dicts. Importing this package
registers nothing; :func:`register_datasets` does."""
from .checks import NamingReadErrors, check_dataset_dicts, hint_filter_empty
from .mapper import AUGMENTATIONS, BoxAwareDatasetMapper, build_train_mapper
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
from .transforms import (
    CenterKeepingCropTransform,
    ExpandTransform,
    MinIoURandomCrop,
    PhotometricDistort,
    PhotometricTransform,
    RandomExpand,
    build_ssd_augmentation,
)
from .voc import BUILTIN_VOC_DATASETS, NODIFFICULT_SUFFIX, drop_difficult, register_voc_nodifficult

__all__ = [
    "AUGMENTATIONS", "BUILTIN_VOC_DATASETS", "BoxAwareDatasetMapper", "CLASSES", "CenterKeepingCropTransform",
    "DATASET_NAMES", "DEFAULT_SPEC", "ExpandTransform", "MinIoURandomCrop", "NODIFFICULT_SUFFIX",
    "NamingReadErrors", "PhotometricDistort", "PhotometricTransform", "RandomExpand", "SyntheticShapesSpec",
    "build_ssd_augmentation", "build_train_mapper", "check_dataset_dicts", "dataset_root", "drop_difficult",
    "ensure_synthetic_dataset", "generate_synthetic_dataset", "hint_filter_empty", "load_synthetic_coco",
    "load_synthetic_voc", "load_validated_coco_json", "load_validated_voc_instances",
    "register_datasets", "register_synthetic_shapes", "register_voc_nodifficult",
]


def register_datasets():
    """Register the project's datasets in Detectron2's catalogs: the embedded ``synth_shapes_*``
    sets (default spec; cache root read now, see :mod:`.synthetic`) and ``<name>_nodifficult``
    for each of Detectron2's built-in Pascal VOC sets (:data:`BUILTIN_VOC_DATASETS`). Adds
    entries only, never removes or replaces one; a second call changes nothing. Returns the
    names."""
    import detectron2.data  # noqa: F401  (Detectron2 registers its built-in datasets on import)

    names = register_synthetic_shapes()
    return names + [register_voc_nodifficult(name) for name in BUILTIN_VOC_DATASETS]
