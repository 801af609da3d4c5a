"""Faster R-CNN R50-FPN on Pascal VOC (07+12 trainval -> 07 test) with AP-loss in the second
stage: the "Faster+AP-Loss" columns of the paper's Table 14 (supplementary A4.3). Everything
else as ``faster_rcnn_R_50_FPN_18k_voc0712_ce.py``.
"""
from .faster_rcnn_R_50_FPN_18k_voc0712_ce import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.roi_heads.box_predictor.cls_loss = "ap"
model.roi_heads.box_predictor.delta = 1.0
model.roi_heads.box_predictor.interpolate = True
model.roi_heads.box_predictor.step = "linear"
model.roi_heads.box_predictor.images_per_ranking_set = 8  # as the RetinaNet configs
