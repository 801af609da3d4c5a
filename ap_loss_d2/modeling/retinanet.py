"""RetinaNet whose classification loss is a module of the loss registry (paper Sec. 3.1).

Only the losses change: head, anchors, matcher and inference are Detectron2's. One option
reproduces the authors' code where Detectron2 differs: ``box_reg_normalizer="batch_mean"``
(their box-loss normaliser). Inference scores come from the loss (``cls_loss.scores``):
per-class sigmoids, or for ``"ce_ohem"`` the softmax it trained.
"""
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.utils.events import get_event_storage

from ..losses.registry import build_cls_loss, check_head, check_number

__all__ = ["APLossRetinaNet", "BOX_REG_NORMALIZERS"]

#: Valid values of ``box_reg_normalizer`` (``MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER``).
BOX_REG_NORMALIZERS = ("ema", "batch_mean")


@META_ARCH_REGISTRY.register()
class APLossRetinaNet(RetinaNet):
    """Detectron2's RetinaNet with the classification loss ``cls_loss`` (a
    :class:`~ap_loss_d2.losses.registry.ClsLoss` serving ``cls_loss_head``). For the
    ranking losses every anchor is replicated per class (paper Fig. 3) and all images, FPN
    levels and classes of a ranking set are ranked together.
    """

    #: The head whose losses ``MODEL.CLS_LOSS.NAME`` may name.
    cls_loss_head = "retinanet"

    @configurable
    def __init__(
        self,
        *,
        cls_loss: nn.Module,
        box_reg_weight: float = 1.0,
        box_reg_normalizer: str = "ema",
        **kwargs,
    ):
        """
        Args:
            cls_loss: the classification loss module (e.g. ``APLoss(images_per_ranking_set=8)``).
            box_reg_weight: weight of the box-regression loss (0 turns it off, Fig. 8 study).
            box_reg_normalizer: ``"ema"`` (Detectron2: box loss summed over positive anchors and
                coordinates, divided by an EMA of the positive count) or ``"batch_mean"`` (the
                authors' code: divided by 4 x the positive anchors of this process's batch;
                IoU losses: by the count).
            kwargs: arguments of Detectron2's ``RetinaNet``.
        """
        num_classes = kwargs.get("num_classes")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"num_classes (MODEL.RETINANET.NUM_CLASSES)={num_classes!r}: set it to the dataset's "
                "number of classes (an integer >= 1)"
            )
        super().__init__(**kwargs)
        self.cls_loss = check_head(cls_loss, self.cls_loss_head)
        self.box_reg_weight = check_number(
            "box_reg_weight (MODEL.AP_LOSS_RETINANET.BOX_REG_WEIGHT)", box_reg_weight, allow_zero=True
        )
        if box_reg_normalizer not in BOX_REG_NORMALIZERS:
            raise ValueError(
                f"box_reg_normalizer (MODEL.AP_LOSS_RETINANET.BOX_REG_NORMALIZER)={box_reg_normalizer!r}; "
                f"valid values: {', '.join(BOX_REG_NORMALIZERS)}"
            )
        self.box_reg_normalizer = box_reg_normalizer

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        r = cfg.MODEL.AP_LOSS_RETINANET
        ret.update(
            cls_loss=build_cls_loss(cfg, cls.cls_loss_head),
            box_reg_weight=r.BOX_REG_WEIGHT,
            box_reg_normalizer=r.BOX_REG_NORMALIZER,
        )
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """Same inputs and outputs as ``RetinaNet.losses``.

        ``loss_cls``: ``cls_loss`` of ``(N, R, K)`` logits and ``(N, R)`` labels (for ``"focal"``
        exactly stock RetinaNet's); ``loss_box_reg``: Detectron2's dense box loss divided by the
        EMA of the positive count (``"ema"``, stock) or by the positives of the batch
        (``"batch_mean"``).
        """
        storage = get_event_storage()
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        ema = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)

        loss_cls = self.cls_loss(cat(pred_logits, dim=1), gt_labels, normalizer=ema, storage=storage)
        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        if self.box_reg_normalizer == "ema":
            loss_box_reg = loss_box_reg / ema
        else:
            # The authors' code divides the smooth-L1 gradient by 4 x num_positives.
            per_anchor = 4 if self.box_reg_loss_type == "smooth_l1" else 1
            loss_box_reg = loss_box_reg / (per_anchor * max(num_pos_anchors, 1))
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg * self.box_reg_weight}

    def forward_inference(self, images, features, predictions):
        """Detectron2's inference with the scores of ``cls_loss.scores`` (per-class sigmoids
        unless the loss trained another model, e.g. ``"ce_ohem"``'s softmax)."""
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(predictions, [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores_per_image = [self.cls_loss.scores(x[img_idx]) for x in pred_logits]
            deltas_per_image = [x[img_idx] for x in pred_anchor_deltas]
            results.append(self.inference_single_image(anchors, scores_per_image, deltas_per_image, image_size))
        return results
