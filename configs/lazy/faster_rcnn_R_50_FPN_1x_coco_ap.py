"""Faster R-CNN R50-FPN on COCO with AP-loss in the second stage (paper, supplementary A4.3):
K sigmoid logits per RoI, every sampled RoI replicated per class and all RoIs x classes of the
batch ranked together; per-class sigmoid scores at test time. Everything else as
``faster_rcnn_R_50_FPN_1x_coco_ce.py`` (LazyConfig twin of the ``_ap.yaml`` config).
"""
from .faster_rcnn_R_50_FPN_1x_coco_ce import (  # noqa: F401
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
