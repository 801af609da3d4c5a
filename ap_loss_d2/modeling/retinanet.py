"""RetinaNet whose classification loss is chosen by ``MODEL.CLS_LOSS.NAME`` (paper Sec. 3.1).

Only the losses change: head, anchors, matcher and inference are Detectron2's. Two options
reproduce the authors' code where Detectron2 differs: ``box_reg_normalizer="batch_mean"`` (their
box-loss normaliser) and, for ``"ce_ohem"``, softmax scores at test time (what it trained).
"""
import time

import torch
from fvcore.nn import giou_loss, smooth_l1_loss

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.utils.events import get_event_storage

from ..config import BOX_REG_NORMALIZERS, RETINANET_LOSSES, check_number
from ..losses.alternatives import ap_loss_approx_gradient, ap_loss_structured_hinge
from ..losses.ohem import ce_ohem_loss, ce_ohem_scores
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
    batch are ranked together. Inference: per-class sigmoid scores, except ``"ce_ohem"`` which
    scores with the softmax over ``K + 1`` classes (background logit 0) it was trained with.
    ``cls_loss_weight`` scales ``loss_cls`` of every loss, ``"focal"`` included.
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss: str = "ap",
        cls_loss_weight: float = 1.0,
        box_reg_weight: float = 1.0,
        box_reg_normalizer: str = "ema",
        delta: float = 1.0,
        interpolate: bool = True,
        step: str = "linear",
        sigmoid_k: float = 0.5,
        approx_sigmoid_k: float = 1.0,
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
            box_reg_normalizer: ``"ema"`` (Detectron2: box loss summed over positive anchors and
                coordinates, divided by an EMA of the positive count) or ``"batch_mean"`` (the
                authors' code: divided by 4 x the positive anchors of this process's batch,
                i.e. averaged over positive anchors and the 4 coordinates; GIoU: by the count).
            delta, interpolate, step, sigmoid_k: AP-/AUC-loss options (see ``ap_loss``).
            approx_sigmoid_k: temperature of the sigmoid of ``"ap_approx"`` (paper Eq. 32: 1).
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
        if box_reg_normalizer not in BOX_REG_NORMALIZERS:
            raise ValueError(
                f"box_reg_normalizer={box_reg_normalizer!r}; valid values: "
                f"{', '.join(BOX_REG_NORMALIZERS)}"
            )
        for name, value, allow_zero in (
            ("cls_loss_weight", cls_loss_weight, True),
            ("box_reg_weight", box_reg_weight, True),
            ("delta", delta, False),
            ("sigmoid_k", sigmoid_k, False),
            ("approx_sigmoid_k", approx_sigmoid_k, False),
            ("ohem_neg_pos_ratio", ohem_neg_pos_ratio, False),
        ):
            check_number(name, value, allow_zero)
        self.cls_loss = cls_loss
        self.cls_loss_weight = cls_loss_weight
        self.box_reg_weight = box_reg_weight
        self.box_reg_normalizer = box_reg_normalizer
        self.approx_sigmoid_k = approx_sigmoid_k
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
            box_reg_normalizer=c.BOX_REG_NORMALIZER,
            delta=c.DELTA,
            interpolate=c.INTERPOLATE,
            step=c.STEP,
            sigmoid_k=c.SIGMOID_K,
            approx_sigmoid_k=c.APPROX_SIGMOID_K,
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
            loss_box_reg = out["loss_box_reg"]
            if self.box_reg_normalizer != "ema":
                labels = torch.stack(gt_labels)
                pos_mask = (labels >= 0) & (labels != self.num_classes)
                loss_box_reg = self._normalized_box_loss(
                    anchors, pred_anchor_deltas, gt_boxes, pos_mask, None
                )
            return {
                "loss_cls": out["loss_cls"] * self.cls_loss_weight,
                "loss_box_reg": loss_box_reg * self.box_reg_weight,
            }

        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = None
        if self.box_reg_normalizer == "ema":
            normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)

        logits = cat(pred_logits, dim=1)  # (N, R, K)
        if self.cls_loss == "ce_ohem":
            loss_cls = ce_ohem_loss(logits, gt_labels, neg_pos_ratio=self.ohem_neg_pos_ratio)
        elif self.cls_loss in ("ap_approx", "ap_hinge"):
            targets = ranking_targets(gt_labels, self.num_classes)
            if self.cls_loss == "ap_approx":
                loss_cls = ap_loss_approx_gradient(logits, targets, sigmoid_k=self.approx_sigmoid_k)
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
        loss_box_reg = self._normalized_box_loss(
            anchors, pred_anchor_deltas, gt_boxes, pos_mask, normalizer
        )
        return {
            "loss_cls": loss_cls * self.cls_loss_weight,
            "loss_box_reg": loss_box_reg * self.box_reg_weight,
        }

    def _normalized_box_loss(self, anchors, pred_anchor_deltas, gt_boxes, pos_mask, ema_normalizer):
        """The box loss divided by ``ema_normalizer`` ("ema") or, for "batch_mean", by the
        positive anchors of this batch (x 4 coordinates for smooth L1), as the authors' code
        does: its backward divides the smooth-L1 gradient by ``4 * num_positives``. (Their
        logged regression loss is divided by ``num_positives`` only, 4x ours; the gradient,
        what training uses, is the same.) Under DDP, gradients are averaged over processes,
        as their ``DataParallel`` replicas' losses are averaged by ``.mean()``."""
        loss = self.box_regression_loss(anchors, pred_anchor_deltas, gt_boxes, pos_mask)
        if self.box_reg_normalizer == "ema":
            return loss / ema_normalizer
        per_anchor = 4 if self.box_reg_loss_type == "smooth_l1" else 1
        return loss / (per_anchor * max(int(pos_mask.sum().item()), 1))

    def forward_inference(self, images, features, predictions):
        """Detectron2's inference; ``"ce_ohem"`` models score with :func:`ce_ohem_scores` (the
        softmax over ``K + 1`` classes with a zero background logit, as trained; the paper's
        Fig. 7 scores CE+OHEM by softmax) instead of per-class sigmoids."""
        if self.cls_loss != "ce_ohem":
            return super().forward_inference(images, features, predictions)
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores_per_image = [ce_ohem_scores(x[img_idx]) for x in pred_logits]
            deltas_per_image = [x[img_idx] for x in pred_anchor_deltas]
            results.append(
                self.inference_single_image(anchors, scores_per_image, deltas_per_image, image_size)
            )
        return results

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
