"""RetinaNet whose classification loss is chosen by ``MODEL.CLS_LOSS.NAME`` (paper Sec. 3.1).

Only the loss changes: head, anchors, matcher, box regression and inference are Detectron2's.
"""
import time

import torch
from fvcore.nn import giou_loss, smooth_l1_loss

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.utils.events import get_event_storage

from ..config import RETINANET_LOSSES
from ..losses.alternatives import ap_loss_approx_gradient, ap_loss_structured_hinge
from ..losses.ohem import ce_ohem_loss
from .labels import ranking_loss, ranking_targets

__all__ = ["APLossRetinaNet"]


@META_ARCH_REGISTRY.register()
class APLossRetinaNet(RetinaNet):
    """Detectron2's RetinaNet with its classification loss replaced.

    ``cls_loss``: ``"ap"`` (AP-loss), ``"auc"`` (AUC-loss), ``"focal"`` (stock RetinaNet,
    identical losses), ``"ce_ohem"`` (softmax CE with a fixed zero background logit and 3:1
    online hard negative mining), ``"ap_approx"`` / ``"ap_hinge"`` (AP-loss optimised by the
    approximate gradient / the structured hinge loss, the alternatives of Fig. 8; see
    :mod:`ap_loss_d2.losses.alternatives`). For the ranking losses every anchor is replicated
    per class (paper Fig. 3: 1 for its matched class, 0 for the other classes and for
    background anchors, -1 for ignored anchors) and all images, FPN levels and classes of the
    batch are ranked together. Inference is unchanged (per-class sigmoid scores).
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss: str = "ap",
        cls_loss_weight: float = 1.0,
        box_reg_weight: float = 1.0,
        delta: float = 1.0,
        interpolate: bool = True,
        step: str = "linear",
        sigmoid_k: float = 0.5,
        ohem_neg_pos_ratio: float = 3.0,
        rank_across_processes: bool = False,
        images_per_ranking_set: int = 0,
        **kwargs,
    ):
        """
        Args:
            cls_loss: one of ``RETINANET_LOSSES``.
            cls_loss_weight: weight of the classification loss.
            box_reg_weight: weight of the box-regression loss (0 turns it off, Fig. 8 study).
            delta, interpolate, step, sigmoid_k: AP-/AUC-loss options (see ``ap_loss``).
            ohem_neg_pos_ratio: negatives kept per positive by ``"ce_ohem"``.
            rank_across_processes: rank all processes' images together (exact).
            images_per_ranking_set: images ranked together (0: this process's); see
                :func:`ap_loss_d2.modeling.labels.ranking_loss`.
            kwargs: arguments of Detectron2's ``RetinaNet``.
        """
        super().__init__(**kwargs)
        if cls_loss not in RETINANET_LOSSES:
            raise ValueError(
                f"Unknown classification loss {cls_loss!r} for RetinaNet; valid names: "
                f"{', '.join(RETINANET_LOSSES)}"
            )
        self.cls_loss = cls_loss
        self.cls_loss_weight = cls_loss_weight
        self.box_reg_weight = box_reg_weight
        self.ranking_options = dict(delta=delta, step=step, sigmoid_k=sigmoid_k)
        if cls_loss == "ap":
            self.ranking_options["interpolate"] = interpolate
        self.ohem_neg_pos_ratio = ohem_neg_pos_ratio
        self.rank_across_processes = rank_across_processes
        self.images_per_ranking_set = images_per_ranking_set

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.MODEL.CLS_LOSS
        ret.update(
            cls_loss=c.NAME,
            cls_loss_weight=c.WEIGHT,
            box_reg_weight=c.BOX_REG_WEIGHT,
            delta=c.DELTA,
            interpolate=c.INTERPOLATE,
            step=c.STEP,
            sigmoid_k=c.SIGMOID_K,
            ohem_neg_pos_ratio=c.OHEM_NEG_POS_RATIO,
            rank_across_processes=c.RANK_ACROSS_PROCESSES,
            images_per_ranking_set=c.IMAGES_PER_RANKING_SET,
        )
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """Same inputs and outputs as ``RetinaNet.losses``; see Detectron2's docstring."""
        storage = get_event_storage()
        start = time.perf_counter()
        if self.cls_loss == "focal":
            out = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
            storage.put_scalar("cls_loss/time", time.perf_counter() - start)
            out["loss_box_reg"] = out["loss_box_reg"] * self.box_reg_weight
            return out

        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)

        logits = cat(pred_logits, dim=1)  # (N, R, K)
        if self.cls_loss == "ce_ohem":
            loss_cls = ce_ohem_loss(logits, gt_labels, neg_pos_ratio=self.ohem_neg_pos_ratio)
        elif self.cls_loss in ("ap_approx", "ap_hinge"):
            targets = ranking_targets(gt_labels, self.num_classes)
            if self.cls_loss == "ap_approx":
                k = self.ranking_options["sigmoid_k"]
                loss_cls = ap_loss_approx_gradient(logits, targets, sigmoid_k=k)
            else:
                loss_cls = ap_loss_structured_hinge(logits, targets)
        else:
            loss_cls = ranking_loss(
                self.cls_loss,
                logits,
                gt_labels,
                self.num_classes,
                rank_across_processes=self.rank_across_processes,
                images_per_ranking_set=self.images_per_ranking_set,
                **self.ranking_options,
            )
        storage.put_scalar("cls_loss/time", time.perf_counter() - start)
        loss_box_reg = self.box_regression_loss(anchors, pred_anchor_deltas, gt_boxes, pos_mask)
        return {
            "loss_cls": loss_cls * self.cls_loss_weight,
            "loss_box_reg": loss_box_reg / normalizer * self.box_reg_weight,
        }

    def box_regression_loss(self, anchors, pred_anchor_deltas, gt_boxes, fg_mask):
        """Stock RetinaNet's box loss (summed over ``fg_mask``), for the non-focal losses.

        Supports the box regression types of Detectron2 v0.6 ("smooth_l1", "giou").
        """
        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        pred = cat(pred_anchor_deltas, dim=1)  # (N, R, 4)
        if self.box_reg_loss_type == "smooth_l1":
            gt = torch.stack([self.box2box_transform.get_deltas(anchors, b) for b in gt_boxes])
            return smooth_l1_loss(pred[fg_mask], gt[fg_mask], beta=self.smooth_l1_beta, reduction="sum")
        if self.box_reg_loss_type == "giou":
            boxes = torch.stack([self.box2box_transform.apply_deltas(d, anchors) for d in pred])
            return giou_loss(boxes[fg_mask], torch.stack(gt_boxes)[fg_mask], reduction="sum")
        raise ValueError(
            f"MODEL.RETINANET.BBOX_REG_LOSS_TYPE={self.box_reg_loss_type!r} is not supported with "
            f"cls_loss={self.cls_loss!r}; use 'smooth_l1' or 'giou'"
        )
