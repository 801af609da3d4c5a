"""SSD (Liu et al., ECCV 2016) whose classification loss comes from the loss registry (head
``"ssd"``, ``MODEL.CLS_LOSS.NAME``), as the paper's SSD experiments (Sec. 4.1.1, Table 2, Fig. 6b).

``MODEL.META_ARCHITECTURE: APLossSSD`` with ``MODEL.BACKBONE.NAME: build_vgg16_ssd_backbone``
and ``MODEL.ANCHOR_GENERATOR.NAME: SSDPriorGenerator``; keys under ``MODEL.SSD`` (see
:func:`ap_loss_d2.config.add_ap_loss_config`).
"""
import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from fvcore.nn import smooth_l1_loss
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from ..losses.cls_losses import FocalLoss
from ..losses.registry import check_head, check_number, get_cls_loss_class

__all__ = ["APLossSSD", "SSDHead", "check_prior_layout", "ssd_match"]


def _check_fraction(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]")
    return float(value)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes (MODEL.SSD.NUM_CLASSES)={num_classes!r}: set it to the dataset's number of "
            "classes (an integer >= 1)"
        )
    return num_classes


def _feature_cells(backbone: nn.Module, in_features: Sequence[str], channels: int, size: int) -> List[int]:
    """Rows of each of ``in_features`` for a ``size`` x ``size`` input: a shape-only run of
    ``backbone`` on the meta device (no computation, the module's tensors untouched)."""
    tensors = dict(backbone.named_parameters())
    tensors.update(backbone.named_buffers())
    meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    x = torch.empty(1, channels, size, size, device="meta")
    with torch.no_grad():
        out = torch.func.functional_call(backbone, meta, (x,))
    return [int(out[f].shape[-2]) for f in in_features]


def check_prior_layout(backbone, in_features, anchor_generator, channels: int, size: int, key: str) -> None:
    """ValueError naming ``key`` unless the priors' steps tile a ``size`` x ``size`` input exactly:
    on every level, step x cells = size (the prior sizes and steps are pixels of that input)."""
    steps = [float(s) for s in anchor_generator.strides]
    try:
        cells = _feature_cells(backbone, in_features, channels, size)
    except RuntimeError as e:
        raise ValueError(
            f"{key}={size}: a {size}x{size} input is too small for the backbone outputs "
            f"MODEL.SSD.IN_FEATURES {list(in_features)} ({e}); use a larger input or fewer features"
        ) from None
    if not all(math.isclose(t * c, size, rel_tol=1e-6) for t, c in zip(steps, cells)):
        raise ValueError(
            f"{key}={size}: MODEL.SSD.PRIOR_STEPS {[f'{t:g}' for t in steps]} do not tile a {size}x{size} "
            f"input, whose feature maps have {cells} cells (step x cells must equal {size} on every "
            "level). Use the input size the priors were made for (SSD512's: 512), or set PRIOR_STEPS "
            f"to {[round(size / c, 4) for c in cells]} and PRIOR_MIN_SIZES / PRIOR_MAX_SIZES for a "
            f"{size}x{size} input."
        )


def ssd_match(iou: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """SSD's matching of priors to ground truth.

    Args:
        iou: ``(G, R)`` IoU of G ground-truth boxes with R priors.
        threshold: priors with IoU >= this with some ground truth are positive.

    Returns:
        ``(R,)`` int64: the matched ground truth of each prior, -1 for background. Each ground
        truth's best prior is matched to it whatever its IoU (when two ground truths share their
        best prior, the later one keeps it); every other prior goes to its best ground truth if
        that IoU is >= ``threshold``. No prior is ignored.
    """
    num_gt, num_priors = iou.shape
    if num_gt == 0:
        return torch.full((num_priors,), -1, dtype=torch.int64, device=iou.device)
    best_iou, matched = iou.max(dim=0)
    matched = torch.where(best_iou >= threshold, matched, torch.full_like(matched, -1))
    best_prior = iou.argmax(dim=1)  # (G,)
    for g in range(num_gt):
        matched[best_prior[g]] = g
    return matched


class SSDHead(nn.Module):
    """Per-level 3x3 class and box convolutions of SSD.

    ``forward(features)``: per level ``(N, C_l, H_l, W_l)`` -> ``(logits, deltas)``, per level
    ``(N, A_l * K, H_l, W_l)`` and ``(N, A_l * 4, H_l, W_l)``.
    """

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes: int, num_anchors: List[int], prior_prob: float = 0.01):
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        if isinstance(prior_prob, bool) or not isinstance(prior_prob, (int, float)) or not 0 <= prior_prob < 1:
            raise ValueError(
                f"prior_prob (MODEL.SSD.CLS_PRIOR_PROB)={prior_prob!r} must be a number in [0, 1): the "
                "initial foreground probability (e.g. 0.01; 0 = zero bias)"
            )
        if len(num_anchors) != len(input_shape):
            raise ValueError(
                f"SSDHead: {len(input_shape)} feature levels but priors for {len(num_anchors)}; "
                "give MODEL.SSD.PRIOR_* one entry per MODEL.SSD.IN_FEATURES"
            )
        self.num_classes = num_classes
        self.cls_convs = nn.ModuleList(
            nn.Conv2d(s.channels, a * num_classes, 3, padding=1) for s, a in zip(input_shape, num_anchors)
        )
        self.box_convs = nn.ModuleList(nn.Conv2d(s.channels, a * 4, 3, padding=1) for s, a in zip(input_shape, num_anchors))
        bias = -math.log((1 - prior_prob) / prior_prob) if prior_prob > 0 else 0.0
        for conv in [*self.cls_convs, *self.box_convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        for conv in self.cls_convs:
            nn.init.constant_(conv.bias, bias)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SSD.NUM_CLASSES,
            "num_anchors": build_anchor_generator(cfg, input_shape).num_cell_anchors,
            "prior_prob": cfg.MODEL.SSD.CLS_PRIOR_PROB,
        }

    def forward(self, features: List[torch.Tensor]):
        logits = [conv(x) for conv, x in zip(self.cls_convs, features)]
        deltas = [conv(x) for conv, x in zip(self.box_convs, features)]
        return logits, deltas


@META_ARCH_REGISTRY.register()
class APLossSSD(DenseDetector):
    """SSD with its classification loss taken from the loss registry.

    Training: priors matched to ground truth by :func:`ssd_match`; ``loss_cls`` is
    ``cls_loss((N, R, K) logits, (N, R) labels, normalizer=positives)`` (labels: class of the
    matched ground truth, ``K`` for background), ``loss_box_reg`` the smooth-L1 of the box
    deltas of the positives, summed over positives and coordinates and divided by the
    positives of the batch (SSD's multibox loss), times ``box_reg_weight``.

    Inference: ``cls_loss.scores`` per prior and class (sigmoid, or the softmax of
    ``"ce_ohem"``), candidates above ``test_score_thresh`` (best ``test_topk_candidates`` per
    level), per-class NMS, best ``max_detections_per_image`` as Detectron2 ``Instances``.
    """

    #: The registry head this model reads ``MODEL.CLS_LOSS`` for (see engine validation).
    cls_loss_head = "ssd"

    @configurable
    def __init__(
        self,
        *,
        backbone,
        head: SSDHead,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        cls_loss: nn.Module,
        num_classes: int,
        iou_threshold: float = 0.5,
        smooth_l1_beta: float = 1.0,
        box_reg_weight: float = 1.0,
        test_score_thresh: float = 0.01,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 200,
        fixed_size: int = 0,
        pixel_mean,
        pixel_std,
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone, head, head_in_features, anchor_generator: the VGG-16 backbone, the
                :class:`SSDHead`, the backbone outputs it reads and the prior generator.
            box2box_transform: box coding (SSD: weights (10, 10, 5, 5)).
            cls_loss: a classification loss module registered for the ``"ssd"`` head.
            num_classes: foreground classes K.
            iou_threshold: IoU from which a prior is positive (:func:`ssd_match`).
            smooth_l1_beta: beta of the smooth-L1 box loss.
            box_reg_weight: weight of the box loss.
            test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image:
                inference (see the class doc).
            fixed_size: in training and at inference, resize every image (and its boxes) to
                this square (SSD512: 512), as torchvision's SSD; 0 keeps each image's size
                (:meth:`resize_inputs`).
            pixel_mean, pixel_std, input_format: image normalisation, as Detectron2's models.
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.cls_loss = check_head(cls_loss, self.cls_loss_head)
        self.num_classes = _check_num_classes(num_classes)
        weights = box2box_transform.weights
        if len(weights) != 4 or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(
                f"box2box_transform weights (MODEL.SSD.BBOX_REG_WEIGHTS)={tuple(weights)} must be 4 finite "
                "numbers > 0 (the box deltas are multiplied by them; SSD: (10, 10, 5, 5))"
            )
        self.iou_threshold = _check_fraction("iou_threshold (MODEL.SSD.IOU_THRESHOLD)", iou_threshold)
        self.smooth_l1_beta = check_number("smooth_l1_beta (MODEL.SSD.SMOOTH_L1_BETA)", smooth_l1_beta, allow_zero=True)
        self.box_reg_weight = check_number("box_reg_weight (MODEL.SSD.BOX_REG_WEIGHT)", box_reg_weight, allow_zero=True)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = _check_fraction("test_nms_thresh (MODEL.SSD.NMS_THRESH_TEST)", test_nms_thresh)
        self.max_detections_per_image = max_detections_per_image
        if isinstance(fixed_size, bool) or not isinstance(fixed_size, int) or fixed_size < 0:
            raise ValueError(f"fixed_size (MODEL.SSD.FIXED_SIZE)={fixed_size!r} must be an integer >= 0")
        if fixed_size:
            check_prior_layout(
                backbone, head_in_features, anchor_generator, len(pixel_mean), fixed_size,
                "fixed_size (MODEL.SSD.FIXED_SIZE)",
            )
        self.fixed_size = fixed_size
        # the backbone's smallest input side (VGG16SSD knows it; other backbones: unchecked)
        self.min_input_size = getattr(backbone, "min_input_size", 1)
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        s = cfg.MODEL.SSD
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in s.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SSD.IN_FEATURES names {missing}, which the backbone does not output "
                f"({', '.join(shapes)})"
            )
        feature_shapes = [shapes[f] for f in s.IN_FEATURES]
        anchor_generator = build_anchor_generator(cfg, feature_shapes)
        if cfg.AP_LOSS_INPUT.AUGMENTATION == "ssd":
            check_prior_layout(
                backbone, s.IN_FEATURES, anchor_generator, len(cfg.MODEL.PIXEL_MEAN),
                cfg.AP_LOSS_INPUT.FIXED_SIZE, "AP_LOSS_INPUT.FIXED_SIZE",
            )
        loss_class = get_cls_loss_class(cfg.MODEL.CLS_LOSS.NAME or "ap", cls.cls_loss_head)
        focal = {"alpha": s.FOCAL_LOSS_ALPHA, "gamma": s.FOCAL_LOSS_GAMMA} if issubclass(loss_class, FocalLoss) else {}
        return {
            "backbone": backbone,
            "head": SSDHead(cfg, feature_shapes),
            "head_in_features": list(s.IN_FEATURES),
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=s.BBOX_REG_WEIGHTS),
            "cls_loss": loss_class(cfg, **focal),
            "num_classes": s.NUM_CLASSES,
            "iou_threshold": s.IOU_THRESHOLD,
            "smooth_l1_beta": s.SMOOTH_L1_BETA,
            "box_reg_weight": s.BOX_REG_WEIGHT,
            "test_score_thresh": s.SCORE_THRESH_TEST,
            "test_topk_candidates": s.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": s.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "fixed_size": s.FIXED_SIZE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def forward(self, batched_inputs):
        """Detectron2's dense-detector forward on :meth:`resize_inputs`: in training as at
        inference; detections come back in each input's ``height`` x ``width`` (default: the size
        of its image)."""
        return super().forward(self.resize_inputs(batched_inputs))

    def resize_inputs(self, batched_inputs):
        """The inputs as the network sees them. With ``fixed_size``, each image not already that
        square is resized to it (bilinear, as torchvision's ``GeneralizedRCNNTransform(fixed_size=...)``),
        its ``gt_boxes`` scaled by the same factors, and its ``height`` / ``width`` default to its
        own size; the input dicts are not modified. A batch smaller than the backbone accepts is
        an error naming the key to set."""
        s, out = self.fixed_size, []
        for x in batched_inputs:
            h, w = x["image"].shape[-2:]
            if not s or (h, w) == (s, s):
                out.append(x)
                continue
            image = F.interpolate(x["image"].to(self.device)[None].float(), size=(s, s), mode="bilinear", align_corners=False)
            y = {**x, "image": image[0], "height": x.get("height", h), "width": x.get("width", w)}
            if "instances" in x:
                boxes = x["instances"].gt_boxes.clone()
                boxes.scale(s / w, s / h)
                y["instances"] = Instances((s, s), gt_boxes=boxes, gt_classes=x["instances"].gt_classes)
            out.append(y)
        need = self.min_input_size
        side = min(max(x["image"].shape[-2] for x in out), max(x["image"].shape[-1] for x in out))
        if side < need:
            raise ValueError(
                f"APLossSSD got a batch of {side} px on its shorter side (MODEL.SSD.FIXED_SIZE {s}); its "
                f"backbone needs at least {need} px to reach {self.head_in_features[-1]}: set "
                f"MODEL.SSD.FIXED_SIZE to {need} or more (e.g. 512; 0 = no resizing), or use fewer MODEL.SSD.IN_FEATURES"
            )
        return out

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances):
        """Per image ``(R,)`` labels (class, or K for background) and ``(R, 4)`` matched
        ground-truth boxes (the prior itself for background, unused)."""
        anchors = Boxes.cat(anchors)
        gt_labels, matched_boxes = [], []
        for gt in gt_instances:
            matched = ssd_match(pairwise_iou(gt.gt_boxes, anchors), self.iou_threshold)
            pos = matched >= 0
            idx = matched.clamp(min=0)
            if len(gt) > 0:
                labels = torch.where(pos, gt.gt_classes[idx], torch.full_like(idx, self.num_classes))
                boxes = torch.where(pos[:, None], gt.gt_boxes.tensor[idx], anchors.tensor)
            else:
                labels = torch.full_like(idx, self.num_classes)
                boxes = anchors.tensor.clone()
            gt_labels.append(labels)
            matched_boxes.append(boxes)
        return gt_labels, matched_boxes

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas = self._transpose_dense_predictions(predictions, [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)

    def losses(self, anchors, pred_logits, gt_labels, pred_deltas, gt_boxes):
        """
        Args:
            anchors: per level ``Boxes`` of ``R_l`` priors.
            pred_logits, pred_deltas: per level ``(N, R_l, K)`` / ``(N, R_l, 4)``.
            gt_labels, gt_boxes: per image ``(R,)`` / ``(R, 4)`` (:meth:`label_anchors`).

        Returns:
            ``{"loss_cls", "loss_box_reg"}``, 0-dim tensors.
        """
        labels = torch.stack(gt_labels)  # (N, R)
        pos = labels < self.num_classes
        num_pos = int(pos.sum().item())
        storage = get_event_storage()
        storage.put_scalar("num_pos_anchors", num_pos / max(len(gt_labels), 1))
        loss_cls = self.cls_loss(cat(pred_logits, dim=1), labels, normalizer=max(num_pos, 1), storage=storage)
        priors = Boxes.cat(anchors).tensor
        target = torch.stack([self.box2box_transform.get_deltas(priors, b) for b in gt_boxes])  # (N, R, 4)
        loss_box = smooth_l1_loss(cat(pred_deltas, dim=1)[pos], target[pos], self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / max(num_pos, 1) * self.box_reg_weight}

    def forward_inference(self, images, features, predictions):
        pred_logits, pred_deltas = self._transpose_dense_predictions(predictions, [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            scores = [self.cls_loss.scores(x[i]) for x in pred_logits]
            deltas = [x[i] for x in pred_deltas]
            pred = self._decode_multi_level_predictions(
                anchors, scores, deltas, self.test_score_thresh, self.test_topk_candidates, image_size
            )
            keep = batched_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh)
            results.append(pred[keep[: self.max_detections_per_image]])
        return results
