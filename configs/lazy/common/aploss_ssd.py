"""SSD512 with VGG-16 and AP-loss (paper Sec. 4.1.1), as a LazyConfig ``model``; the same values
as configs/SSD/Base-SSD512.yaml. The classification loss is a module: swap
``model.cls_loss`` for ``L(FocalLoss)(alpha=0.25, gamma=1.0)``, ``L(AUCLoss)()``,
``L(CEOHEMLoss)()``.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform

from ap_loss_d2.config import SSD512_PRIORS
from ap_loss_d2.losses.cls_losses import APLoss
from ap_loss_d2.modeling import APLossSSD, SSDPriorGenerator, VGG16SSD
from ap_loss_d2.modeling.ssd import SSDHead
from ap_loss_d2.modeling.vgg import OUTPUT_NAMES

model = L(APLossSSD)(
    backbone=L(VGG16SSD)(out_features=list(OUTPUT_NAMES), width=1.0, norm="", l2norm_scale=20.0),
    # channels of conv4_3, conv7, conv8_2 .. conv12_2 at width 1; priors per cell of each level
    head=L(SSDHead)(
        input_shape=[ShapeSpec(channels=c) for c in (512, 1024, 512, 256, 256, 256, 256)],
        num_classes="${..num_classes}",
        num_anchors=[4, 6, 6, 6, 6, 4, 4],
        prior_prob=0.01,
    ),
    head_in_features=list(OUTPUT_NAMES),
    # SSD512's priors: 24,564 at 512x512, not clipped (Caffe SSD512)
    anchor_generator=L(SSDPriorGenerator)(
        min_sizes=list(SSD512_PRIORS["min_sizes"]),
        max_sizes=list(SSD512_PRIORS["max_sizes"]),
        steps=list(SSD512_PRIORS["steps"]),
        aspect_ratios=[list(r) for r in SSD512_PRIORS["aspect_ratios"]],
        offset=0.5,
        clip_size=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),  # variances 0.1, 0.2
    # interpolated AP-loss, linear step of width 1 (Eq. 21), 8 images ranked together
    cls_loss=L(APLoss)(delta=1.0, interpolate=True, step="linear", images_per_ranking_set=8),
    num_classes=20,
    iou_threshold=0.5,
    smooth_l1_beta=1.0,
    box_reg_weight=1.0,
    test_score_thresh=0.01,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,  # the paper's per-class NMS (SSD's own: 0.45)
    max_detections_per_image=200,
    fixed_size=512,  # images (and boxes) resized to 512x512 in training and at test
    # torchvision's ImageNet normalisation, which the converted VGG-16 weights expect
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
