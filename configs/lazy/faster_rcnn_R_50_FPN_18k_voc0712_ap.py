"""Faster R-CNN R50-FPN on Pascal VOC (07+12 trainval -> 07 test) with AP-loss in the second
stage: the "Faster+AP-Loss" columns of the paper's Table 14 (supplementary A4.3). Everything
else as ``faster_rcnn_R_50_FPN_18k_voc0712_ce.py``.
"""
from detectron2.config import LazyCall as L

from ap_loss_d2.losses.cls_losses import APLoss

from .faster_rcnn_R_50_FPN_18k_voc0712_ce import (  # noqa: F401
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
