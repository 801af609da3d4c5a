"""Faster R-CNN R50-FPN on Pascal VOC (07+12 trainval -> 07 test) with stock softmax cross
entropy in the second stage: the "Faster" columns of the paper's Table 14 (supplementary A4.3).

LazyConfig twin of ``configs/FasterRCNN/faster_rcnn_R_50_FPN_18k_voc0712_ce.yaml``: the COCO
config with VOC data, 20 classes and Detectron2's VOC schedule (18k iterations at 16 images per
batch, LR x0.1 at 12k and 16k, 100 warm-up iterations).
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from .faster_rcnn_R_50_FPN_1x_coco_ce import dataloader, model, optimizer, train

model.roi_heads.num_classes = 20
dataloader.train.dataset.names = ("voc_2007_trainval", "voc_2012_trainval")
dataloader.test.dataset.names = "voc_2007_test"

train.max_iter = 18000
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[12000, 16000],
        num_updates="${train.max_iter}",
    ),
    warmup_length=100 / 18000,
    warmup_method="linear",
    warmup_factor=0.001,
)
