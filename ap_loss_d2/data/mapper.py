"""The training ``DatasetMapper`` chosen by ``AP_LOSS_INPUT.AUGMENTATION``: Detectron2's own
for "default", a :class:`BoxAwareDatasetMapper` with :func:`build_ssd_augmentation` for "ssd".
The test mapper is Detectron2's (the paper tests at shorter side 600, ``INPUT.MIN_SIZE_TEST``).
"""
import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .transforms import build_ssd_augmentation

__all__ = ["AUGMENTATIONS", "BoxAwareDatasetMapper", "annotation_boxes", "build_train_mapper"]

#: Valid values of ``AP_LOSS_INPUT.AUGMENTATION``.
AUGMENTATIONS = ("default", "ssd")


def annotation_boxes(dataset_dict, include_crowd: bool = False) -> np.ndarray:
    """The record's annotation boxes as an (N, 4) float64 XYXY_ABS array (crowd boxes left out
    unless ``include_crowd``); (0, 4) without annotations."""
    annos = [a for a in dataset_dict.get("annotations", []) if include_crowd or a.get("iscrowd", 0) == 0]
    if not annos:
        return np.zeros((0, 4), dtype=np.float64)
    return np.array(
        [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
        dtype=np.float64,
    )


class BoxAwareDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` whose augmentations also receive the ground-truth boxes
    (``T.AugInput(image, boxes=...)``, XYXY_ABS, crowd boxes only with ``include_crowd``), e.g.
    for :class:`MinIoURandomCrop`; everything else is the parent's, through its helpers.
    Constructed like ``DatasetMapper``."""

    include_crowd = False

    def aug_input(self, dataset_dict, image, sem_seg):
        """The ``AugInput`` of one record: image, boxes and semantic segmentation."""
        boxes = annotation_boxes(dataset_dict, self.include_crowd) if "annotations" in dataset_dict else None
        return T.AugInput(image, boxes=boxes, sem_seg=sem_seg)

    def __call__(self, dataset_dict):
        return self.map_with_transforms(dataset_dict)[0]

    def map_with_transforms(self, dataset_dict):
        """``(mapped dict, the TransformList applied)`` of one record."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = self.aug_input(dataset_dict, image, sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
        elif "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict, transforms


def build_train_mapper(cfg) -> DatasetMapper:
    """Training mapper selected by ``cfg.AP_LOSS_INPUT.AUGMENTATION``."""
    name = cfg.AP_LOSS_INPUT.AUGMENTATION
    if name not in AUGMENTATIONS:
        raise ValueError(f"AP_LOSS_INPUT.AUGMENTATION={name!r}; valid values: {', '.join(AUGMENTATIONS)}")
    if name == "default":
        return DatasetMapper(cfg, is_train=True)
    return BoxAwareDatasetMapper(cfg, is_train=True, augmentations=build_ssd_augmentation(cfg, is_train=True))
