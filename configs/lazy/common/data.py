"""Data loaders of the paper (Sec. 4.1): SSD augmentation with a fixed square training input;
at test time the aspect ratio is kept (shorter side 600 for the ablations) without augmentation.

``voc0712`` / ``coco`` are ``dataloader`` configs using Detectron2's built-in dataset names.
"""
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)

from ap_loss_d2.data import BoxAwareDatasetMapper, build_ssd_augmentation
from ap_loss_d2.evaluation import get_evaluator


def _dataloader(train_names, test_name, train_size=512, test_size=600, test_max_size=1000):
    dataloader = OmegaConf.create()
    dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=train_names),
        # BoxAwareDatasetMapper hands the boxes to the min-IoU crop of the SSD augmentation.
        mapper=L(BoxAwareDatasetMapper)(
            is_train=True,
            augmentations=L(build_ssd_augmentation)(cfg_or_size=train_size, is_train=True),
            image_format="BGR",
        ),
        total_batch_size=16,  # 2 GPUs x 8 images
        num_workers=4,
    )
    dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=test_name, filter_empty=False),
        mapper=L(DatasetMapper)(
            is_train=False,
            augmentations=[L(T.ResizeShortestEdge)(short_edge_length=test_size, max_size=test_max_size)],
            image_format="${...train.mapper.image_format}",
        ),
        num_workers=4,
    )
    # COCO or Pascal VOC evaluator from the dataset's metadata (no compiled ops needed).
    dataloader.evaluator = L(get_evaluator)(dataset_name="${..test.dataset.names}")
    return dataloader


# Training without the VOC "difficult" objects, as the authors' loader (the *_nodifficult twins of
# ap_loss_d2.data.register_datasets()); the test set is evaluated with the official protocol.
voc0712 = _dataloader(
    ["voc_2007_trainval_nodifficult", "voc_2012_trainval_nodifficult"], "voc_2007_test"
)
coco = _dataloader(["coco_2017_train"], "coco_2017_val")
