"""Faster R-CNN R50-FPN on COCO with AP-loss in the second stage (paper, supplementary A4.3):
K sigmoid logits per RoI, every sampled RoI replicated per class and all RoIs x classes of the
batch ranked together; per-class sigmoid scores at test time. Everything else as
``faster_rcnn_R_50_FPN_1x_coco_ce.py`` (LazyConfig twin of the ``_ap.yaml`` config).
"""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import APLoss

from .faster_rcnn_R_50_FPN_1x_coco_ce import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# 8 images ranked together, as the RetinaNet configs.
model.roi_heads.box_predictor.cls_loss = L(APLoss)(
    delta=1.0, interpolate=True, step="linear", images_per_ranking_set=8
)
