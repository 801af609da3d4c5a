"""Faster R-CNN whose second-stage classification loss is chosen by ``MODEL.CLS_LOSS.NAME``
(paper, supplementary A4.3 "AP-loss in Two-stage Detector").

Two classes, registered by importing this module:

* :class:`APLossFastRCNNOutputLayers`, a subclass of Detectron2's ``FastRCNNOutputLayers`` (the
  box predictor: class logits + box deltas). Only the classification loss and the class
  probabilities at inference change; the box regression branch, its loss and
  ``fast_rcnn_inference`` are Detectron2's.
* :class:`APLossROIHeads`, a ``StandardROIHeads`` registered in ``ROI_HEADS_REGISTRY``
  (``MODEL.ROI_HEADS.NAME: APLossROIHeads``) whose box branch uses that predictor.

Why a ROI-heads subclass: Detectron2 has no registry for box predictors; ``StandardROIHeads``
builds ``FastRCNNOutputLayers`` directly in its ``_init_box_head`` classmethod, which its
``from_config`` calls and subclasses may override (on v0.6 and main alike). Overriding only
that keeps RoI sampling, pooling, the box head, the mask/keypoint branches and inference
untouched (the stock predictor it builds is replaced before the module is constructed).
LazyConfig users do not need the subclass at all: pass
``box_predictor=L(APLossFastRCNNOutputLayers)(...)`` to any ``StandardROIHeads`` (the configs in
``configs/lazy/`` use ``APLossROIHeads`` for uniformity).

Losses (``cls_loss``):

* ``"ce"``: Detectron2's own predictor (softmax cross entropy over K + 1 classes): the losses,
  probabilities and parameters are exactly those of stock Faster R-CNN (on Detectron2 main this
  includes its ``use_sigmoid_ce`` / ``use_fed_loss`` options, configured by their own
  ``MODEL.ROI_BOX_HEAD`` keys).
* ``"ap"`` / ``"auc"``: the classifier has K logits (no background logit). Every sampled RoI is
  replicated per class and labelled 1 for its ground-truth class and 0 for the other classes;
  background RoIs are 0 for every class. The RoIs of all images of the batch and all classes
  are ranked together by :func:`ap_loss_d2.losses.ap_loss` / ``auc_loss`` (across processes
  too with ``rank_across_processes``). At inference the class probabilities are per-class
  sigmoids with a zero background column appended, the layout ``fast_rcnn_inference`` expects.

Any loss serving the ``"roi_heads"`` head (:mod:`ap_loss_d2.losses.registry`) works the same
way (K logits, scores from ``cls_loss.scores``), unless it is ``native`` like ``"ce"``.
``MODEL.CLS_LOSS.WEIGHT`` (the loss's ``weight``) scales ``loss_cls``; for ``"ce"`` through the
base class's ``loss_weight`` dict (the default 1.0 leaves it bit-identical to stock Faster R-CNN).
"""
from typing import List, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from ..losses.registry import build_cls_loss, check_head

__all__ = ["APLossFastRCNNOutputLayers", "APLossROIHeads"]

# Options of Detectron2 main's FastRCNNOutputLayers that replace the softmax classifier; they
# do not combine with a ranking loss. Absent (never set) on Detectron2 v0.6.
_CLASSIFIER_OPTIONS = ("use_sigmoid_ce", "use_fed_loss")


class APLossFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Detectron2's ``FastRCNNOutputLayers`` with the classification loss ``cls_loss`` (a
    :class:`~ap_loss_d2.losses.registry.ClsLoss` serving the ``"roi_heads"`` head). With a
    non-native loss ``cls_score`` outputs K logits instead of K + 1.
    """

    @configurable
    def __init__(self, input_shape, *, cls_loss: nn.Module, **kwargs):
        """
        Args:
            input_shape (ShapeSpec): shape of the per-RoI feature, as for the base class.
            cls_loss: the classification loss module (e.g. ``APLoss()``, ``SoftmaxCELoss()``).
            kwargs: arguments of Detectron2's ``FastRCNNOutputLayers`` (``box2box_transform``,
                ``num_classes``, test thresholds, box regression options, ``loss_weight``...).
        """
        check_head(cls_loss, "roi_heads")
        weight = kwargs.get("loss_weight", 1.0)
        if not isinstance(weight, dict):
            weight = {"loss_cls": weight, "loss_box_reg": weight}
        kwargs["loss_weight"] = {**weight, "loss_cls": cls_loss.weight if cls_loss.native else 1.0}
        super().__init__(input_shape, **kwargs)
        self.cls_loss = cls_loss
        if cls_loss.native:
            return
        enabled = [name for name in _CLASSIFIER_OPTIONS if getattr(self, name, False)]
        if enabled:
            raise ValueError(
                f"cls_loss {cls_loss.name!r} replaces the softmax classifier and cannot be combined "
                f"with {', '.join(enabled)} (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS); "
                f"disable them or use MODEL.CLS_LOSS.NAME ce"
            )
        # K logits, no background logit; same initialisation as the stock classifier.
        self.cls_score = nn.Linear(self.cls_score.in_features, self.num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "cls_loss": build_cls_loss(cfg, "roi_heads")}

    def losses(self, predictions, proposals: List[Instances]):
        """Same inputs and outputs as ``FastRCNNOutputLayers.losses``.

        For a non-native loss, ``loss_cls`` is ``cls_loss`` of the ``(sum_i R_i, K)`` logits of
        all sampled RoIs (``entries_per_image`` = the RoIs per image), and
        ``fast_rcnn/fg_cls_accuracy`` is logged (the native ``"ce"`` logs Detectron2's own
        ``fast_rcnn/*`` statistics).
        """
        if self.cls_loss.native:
            return super().losses(predictions, proposals)
        storage = get_event_storage()
        scores, proposal_deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # Images without ground truth have no "gt_boxes": their RoIs are all background
            # and take no part in the box loss, any placeholder box will do.
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.int64, device=scores.device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)

        loss_cls = self.cls_loss(
            scores, gt_classes, entries_per_image=[len(p) for p in proposals], storage=storage
        )
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        if fg.any():
            # the stock head's fg accuracy (there is no background logit to compare with)
            accurate = scores.detach()[fg].argmax(dim=1) == gt_classes[fg]
            storage.put_scalar("fast_rcnn/fg_cls_accuracy", accurate.float().mean().item())
        loss_box_reg = self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg * self.loss_weight.get("loss_box_reg", 1.0)}

    def predict_probs(self, predictions: Tuple[torch.Tensor, torch.Tensor], proposals: List[Instances]):
        """
        Returns:
            list[Tensor]: per image, (Ri, K + 1) class probabilities, background last. For a
            non-native loss: ``cls_loss.scores`` of the K logits and a background column of 0.
        """
        if self.cls_loss.native:
            return super().predict_probs(predictions, proposals)
        scores, _ = predictions
        probs = self.cls_loss.scores(scores)
        probs = torch.cat([probs, probs.new_zeros((probs.shape[0], 1))], dim=1)
        return probs.split([len(p) for p in proposals], dim=0)


@ROI_HEADS_REGISTRY.register()
class APLossROIHeads(StandardROIHeads):
    """``StandardROIHeads`` whose box predictor is :class:`APLossFastRCNNOutputLayers`
    (configured by ``MODEL.CLS_LOSS``). Everything else, including the mask and keypoint
    branches, is Detectron2's.
    """

    #: The head whose losses ``MODEL.CLS_LOSS.NAME`` may name.
    cls_loss_head = "roi_heads"

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = APLossFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret
