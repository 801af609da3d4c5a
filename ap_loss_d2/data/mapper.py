"""The training ``DatasetMapper`` built from the ``AP_LOSS_INPUT`` keys (added by
:func:`ap_loss_d2.config.add_ap_loss_config`)::

    AP_LOSS_INPUT.AUGMENTATION      "default" | "ssd"
    AP_LOSS_INPUT.FIXED_SIZE        512
    AP_LOSS_INPUT.EXPAND_MAX_RATIO  4.0

``build_train_mapper(cfg)`` returns Detectron2's ``DatasetMapper(cfg, is_train=True)`` for
"default", and for "ssd" a :class:`BoxAwareDatasetMapper` (a ``DatasetMapper`` subclass) built
with ``augmentations=build_ssd_augmentation(cfg, True)``. Pass it to
``build_detection_train_loader(cfg, mapper=...)``. At test time the paper keeps the aspect ratio
(shorter side 600, i.e. Detectron2's ``INPUT.MIN_SIZE_TEST``), so the default test mapper fits.
"""
from typing import Optional

import numpy as np
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .transforms import build_ssd_augmentation

__all__ = [
    "AUGMENTATIONS",
    "BoxAwareDatasetMapper",
    "build_train_mapper",
]

#: Valid values of ``AP_LOSS_INPUT.AUGMENTATION``.
AUGMENTATIONS = ("default", "ssd")


class _BoxFeedingAugmentationList(T.AugmentationList):
    """AugmentationList that puts ``self.boxes`` into ``AugInput.boxes`` before running."""

    def __init__(self, augs):
        super().__init__(augs)
        self.boxes: Optional[np.ndarray] = None

    def __call__(self, aug_input):
        if self.boxes is not None and getattr(aug_input, "boxes", None) is None:
            aug_input.boxes = self.boxes.copy()
        return super().__call__(aug_input)


class BoxAwareDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` whose augmentations also receive the ground-truth boxes.

    Detectron2's mapper builds ``AugInput(image, sem_seg=...)`` without boxes, but box-dependent
    augmentations (``MinIoURandomCrop.get_transform(image, boxes)``) need them. This subclass
    hands the non-crowd annotation boxes (XYXY_ABS) of the current record to the augmentation
    list; everything else (image reading, annotation transform with clipping,
    ``filter_empty_instances``, masks, keypoints, proposals) is the parent's. Construct it like
    ``DatasetMapper``: ``BoxAwareDatasetMapper(cfg, is_train=True, augmentations=[...])``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        augs = self.augmentations
        self.augmentations = _BoxFeedingAugmentationList(list(getattr(augs, "augs", [augs])))

    @staticmethod
    def _boxes_of(dataset_dict) -> Optional[np.ndarray]:
        if "annotations" not in dataset_dict:
            return None
        annos = [a for a in dataset_dict["annotations"] if a.get("iscrowd", 0) == 0]
        if not annos:
            return np.zeros((0, 4), dtype=np.float32)
        return np.array(
            [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
            dtype=np.float32,
        )

    def __call__(self, dataset_dict):
        self.augmentations.boxes = self._boxes_of(dataset_dict)
        try:
            return super().__call__(dataset_dict)
        finally:
            self.augmentations.boxes = None


def build_train_mapper(cfg) -> DatasetMapper:
    """Training mapper selected by ``cfg.AP_LOSS_INPUT.AUGMENTATION`` ("default" if the namespace
    is absent). Always an instance of ``detectron2.data.DatasetMapper``."""
    extra = cfg.get("AP_LOSS_INPUT", None)
    name = extra.AUGMENTATION if extra is not None else "default"
    if name == "default":
        return DatasetMapper(cfg, is_train=True)
    if name == "ssd":
        augs = build_ssd_augmentation(cfg, is_train=True)
        return BoxAwareDatasetMapper(cfg, is_train=True, augmentations=augs)
    raise ValueError(f"AP_LOSS_INPUT.AUGMENTATION={name!r}; expected one of {AUGMENTATIONS}")
