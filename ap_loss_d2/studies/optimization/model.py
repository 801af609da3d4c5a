"""The Fig. 8 study's model, hook and trainer (see :mod:`ap_loss_d2.studies.optimization`):
:class:`OptimizationStudyRetinaNet` subsamples background anchors and keeps the last batch,
:class:`ExactAPLossHook` records the exact AP-loss of that batch, :class:`StudyTrainer` runs the
hook and writes every recorded value to ``metrics.json``."""
import os

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.engine import HookBase, hooks
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, get_event_storage

from ...engine import Trainer
from ...losses import ap_loss
from ...modeling import APLossRetinaNet, ranking_targets

#: Event-storage keys written by :class:`ExactAPLossHook`.
AP_LOSS_KEY = "optim_study/ap_loss"
AP_LOSS_ALL_KEY = "optim_study/ap_loss_all_negatives"
NEG_KEY = "optim_study/neg_anchors_per_image"


def add_optimization_study_config(cfg):
    """Add the study-only ``OPTIMIZATION_STUDY`` keys (read by the study's model and trainer)."""
    cfg.OPTIMIZATION_STUDY = CN()
    # Background anchors kept per image in the loss (random, re-drawn every iteration; the rest
    # are ignored); -1 keeps all.
    cfg.OPTIMIZATION_STUDY.NUM_NEGATIVES = -1
    # Record the exact AP-loss (and write metrics.json) every this many iterations.
    cfg.OPTIMIZATION_STUDY.RECORD_PERIOD = 5
    return cfg


@META_ARCH_REGISTRY.register()
class OptimizationStudyRetinaNet(APLossRetinaNet):
    """``APLossRetinaNet`` for the Fig. 8 study (not a training recipe).

    * ``num_negatives >= 0``: in each image only ``num_negatives`` background anchors, drawn at
      random every iteration, stay negatives; the other background anchors get label -1
      (ignored by every loss). Positive and ignored anchors are unchanged.
    * Keeps the last training batch's detached logits and ranking labels in ``last_batch``
      (``logits`` (N, R, K), ``targets`` used by the loss, ``targets_all`` before subsampling,
      ``neg_anchors_per_image``) for :class:`ExactAPLossHook`.
    """

    @configurable
    def __init__(self, *, num_negatives: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.num_negatives = int(num_negatives)
        self.last_batch = None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["num_negatives"] = cfg.OPTIMIZATION_STUDY.NUM_NEGATIVES
        return ret

    def subsample_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """One image's anchor labels (R,) with all but ``num_negatives`` random background
        anchors set to -1."""
        background = torch.nonzero(labels == self.num_classes).squeeze(1)
        if self.num_negatives < 0 or background.numel() <= self.num_negatives:
            return labels
        drop = background[
            torch.randperm(background.numel(), device=labels.device)[self.num_negatives :]
        ]
        labels = labels.clone()
        labels[drop] = -1
        return labels

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        with torch.no_grad():
            targets_all = ranking_targets(torch.stack(gt_labels), self.num_classes)
            if self.num_negatives >= 0:
                gt_labels = [self.subsample_negatives(x) for x in gt_labels]
            stacked = torch.stack(gt_labels)
            self.last_batch = dict(
                logits=cat(pred_logits, dim=1).detach(),
                targets=ranking_targets(stacked, self.num_classes),
                targets_all=targets_all,
                neg_anchors_per_image=float((stacked == self.num_classes).sum()) / len(gt_labels),
            )
        return super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)


class ExactAPLossHook(HookBase):
    """Every ``period`` iterations (and at the last one): the exact AP-loss of the batch just
    trained on, ``ap_loss(logits, targets, step="heaviside", interpolate=False)`` on the
    detached logits, written to the event storage as ``optim_study/ap_loss`` (not smoothed).

    Also writes ``optim_study/neg_anchors_per_image`` and, when negatives are subsampled,
    ``optim_study/ap_loss_all_negatives`` (the same batch ranked with all its negatives). A
    batch without positives has no AP: nothing is written for it.
    """

    def __init__(self, period: int):
        self.period = int(period)

    def _due(self):
        it = self.trainer.iter
        return (it + 1) % self.period == 0 or it == self.trainer.max_iter - 1

    def after_step(self):
        if not self._due():
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        batch = getattr(model, "last_batch", None)
        if batch is None:
            raise RuntimeError(
                "ExactAPLossHook needs a model that keeps `last_batch` (OptimizationStudyRetinaNet)"
            )
        if not bool((batch["targets"] == 1).any()):
            return
        storage = get_event_storage()
        logits = batch["logits"].double()  # the value in float64, not rounded to the logits' dtype
        value = ap_loss(logits, batch["targets"], step="heaviside", interpolate=False)
        storage.put_scalar(AP_LOSS_KEY, float(value), smoothing_hint=False)
        storage.put_scalar(NEG_KEY, batch["neg_anchors_per_image"], smoothing_hint=False)
        if model.num_negatives >= 0:
            value_all = ap_loss(logits, batch["targets_all"], step="heaviside", interpolate=False)
            storage.put_scalar(AP_LOSS_ALL_KEY, float(value_all), smoothing_hint=False)


class StudyTrainer(Trainer):
    """The project's Trainer with the study's hooks: no evaluation, :class:`ExactAPLossHook`
    right before the writers, and the writers (console + ``metrics.json``) every
    ``OPTIMIZATION_STUDY.RECORD_PERIOD`` iterations so each recorded value reaches the file."""

    def build_hooks(self):
        period = self.cfg.OPTIMIZATION_STUDY.RECORD_PERIOD
        ret = [
            h
            for h in super().build_hooks()
            if not isinstance(h, (hooks.EvalHook, hooks.PeriodicWriter))
        ]
        ret.append(ExactAPLossHook(period))
        ret.append(hooks.PeriodicWriter(self.build_writers(), period=period))
        return ret

    def build_writers(self):
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
        ]
