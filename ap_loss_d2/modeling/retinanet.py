"""RetinaNet whose classification loss is chosen by ``MODEL.CLS_LOSS.NAME`` (paper Sec. 3.1),
from the registry of :mod:`ap_loss_d2.losses.registry` (head ``"retinanet"``).

Only the losses change: head, anchors, matcher and inference are Detectron2's. Two options
reproduce the authors' code where Detectron2 differs: ``box_reg_normalizer="batch_mean"`` (their
box-loss normaliser) and, for ``"ce_ohem"``, softmax scores at test time (what it trained).
"""
import time

import torch

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling import box_regression
from detectron2.utils.events import get_event_storage

from ..config import BOX_REG_NORMALIZERS, check_number
from ..losses.registry import compute_cls_loss, get_cls_loss

__all__ = ["APLossRetinaNet"]

# Detectron2's dense box loss (RetinaNet's own: smooth_l1, giou, and diou/ciou on main), present
# on v0.6 and main under this name; looked up once so that a Detectron2 without it fails clearly.
_dense_box_regression_loss = getattr(box_regression, "_dense_box_regression_loss", None)


def ranking_options(options, entry):
    """``delta``, ``step``, ``sigmoid_k`` of ``options``, and ``interpolate`` if ``entry``
    takes it."""
    keys = ("delta", "step", "sigmoid_k") + (("interpolate",) if "interpolate" in entry.options else ())
    return {k: options[k] for k in keys}


def cls_loss_clock(device) -> float:
    """Host clock for ``cls_loss/time``. On CUDA it first waits for the device, for every loss
    alike, so the times of different losses compare (each then includes its own kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def put_cls_loss_stats(storage, stats, start, device):
    """Write a registered loss's ``stats`` and its time since ``start``
    (:func:`cls_loss_clock`) to the event storage (``cls_loss/*``)."""
    storage.put_scalar("cls_loss/time", cls_loss_clock(device) - start)
    for k, v in stats.items():
        storage.put_scalar(f"cls_loss/{k}", v)


@META_ARCH_REGISTRY.register()
class APLossRetinaNet(RetinaNet):
    """Detectron2's RetinaNet with its classification loss replaced.

    ``cls_loss``: a loss registered for the ``"retinanet"`` head (see
    :mod:`ap_loss_d2.losses.registry`): ``"ap"`` (AP-loss), ``"auc"`` (AUC-loss), ``"focal"``
    (stock RetinaNet, identical losses), ``"ce_ohem"`` (softmax CE with a fixed zero background
    logit and 3:1 online hard negative mining), ``"ap_approx"`` / ``"ap_hinge"`` (the
    alternatives of Fig. 8), or one you register. For the ranking losses every anchor is
    replicated per class (paper Fig. 3) and all images, FPN levels and classes of a ranking set
    are ranked together. Inference: per-class sigmoid scores, or the entry's own ``scores``
    (``"ce_ohem"``: the softmax over ``K + 1`` classes it was trained with).
    ``cls_loss_weight`` scales ``loss_cls`` of every loss, ``"focal"`` included.
    """

    #: The registry head this model reads ``MODEL.CLS_LOSS`` for (see engine validation).
    cls_loss_head = "retinanet"

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
            cls_loss: a name registered for the ``"retinanet"`` head.
            cls_loss_weight: weight of the classification loss.
            box_reg_weight: weight of the box-regression loss (0 turns it off, Fig. 8 study).
            box_reg_normalizer: ``"ema"`` (Detectron2: box loss summed over positive anchors and
                coordinates, divided by an EMA of the positive count) or ``"batch_mean"`` (the
                authors' code: divided by 4 x the positive anchors of this process's batch,
                i.e. averaged over positive anchors and the 4 coordinates; IoU losses: by the
                count).
            delta, interpolate, step, sigmoid_k: AP-/AUC-loss options (see ``ap_loss``).
            approx_sigmoid_k: temperature of the sigmoid of ``"ap_approx"`` (paper Eq. 32: 1).
            ohem_neg_pos_ratio: negatives kept per positive by ``"ce_ohem"``.
            rank_across_processes: rank all processes' images together (exact).
            images_per_ranking_set: images ranked together (0: this process's); see
                :func:`ap_loss_d2.losses.registry.ranking_loss`.
            kwargs: arguments of Detectron2's ``RetinaNet``.
        """
        super().__init__(**kwargs)
        self.cls_loss_entry = get_cls_loss(cls_loss, self.cls_loss_head, key="cls_loss")
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
        if _dense_box_regression_loss is None:
            raise ImportError(
                "this Detectron2 has no detectron2.modeling.box_regression._dense_box_regression_loss "
                "(v0.6 and main have it); install one of those"
            )
        self.cls_loss = cls_loss
        self.cls_loss_weight = cls_loss_weight
        self.box_reg_weight = box_reg_weight
        self.box_reg_normalizer = box_reg_normalizer
        self.rank_across_processes = rank_across_processes
        self.images_per_ranking_set = images_per_ranking_set
        self.cls_loss_state = {}
        # every option a registered loss may ask for; the entry takes the ones it declares
        self.loss_options = dict(
            delta=delta,
            interpolate=interpolate,
            step=step,
            sigmoid_k=sigmoid_k,
            approx_sigmoid_k=approx_sigmoid_k,
            ohem_neg_pos_ratio=ohem_neg_pos_ratio,
            rank_across_processes=rank_across_processes,
            images_per_ranking_set=images_per_ranking_set,
            focal_loss_alpha=self.focal_loss_alpha,
            focal_loss_gamma=self.focal_loss_gamma,
            entries_per_image=None,
            # state a loss keeps between iterations (GHM-C's EMA of its gradient density)
            loss_state=self.cls_loss_state,
        )

    @property
    def ranking_options(self):
        """The step options ``delta``, ``step``, ``sigmoid_k`` (and ``interpolate`` when the loss
        takes it, as AP-loss does)."""
        return ranking_options(self.loss_options, self.cls_loss_entry)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.MODEL.CLS_LOSS
        ret.update(
            cls_loss=c.NAME or "ap",
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
        """Same inputs and outputs as ``RetinaNet.losses``; see Detectron2's docstring.

        ``loss_cls``: the registered loss of ``(N, R, K)`` logits and ``(N, R)`` labels (for
        ``"focal"`` exactly stock RetinaNet's); ``loss_box_reg``: Detectron2's dense box loss
        divided by the EMA of the positive count (``"ema"``, stock) or by the positives of the
        batch (``"batch_mean"``). Diagnostics: ``cls_loss/time`` and the loss's own stats.
        """
        storage = get_event_storage()
        start = cls_loss_clock(pred_logits[0].device)
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().item()
        storage.put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        ema = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)

        stats = {}
        loss_cls = compute_cls_loss(
            self.cls_loss_entry,
            cat(pred_logits, dim=1),  # (N, R, K)
            gt_labels,
            self.num_classes,
            {**self.loss_options, "normalizer": ema},
            stats,
        )
        put_cls_loss_stats(storage, stats, start, pred_logits[0].device)
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
            # The authors' code divides the smooth-L1 gradient by 4 x num_positives (their
            # logged value by num_positives only, 4x ours; the gradient is the same). Under DDP
            # gradients are averaged over processes, as their DataParallel replicas' losses are.
            per_anchor = 4 if self.box_reg_loss_type == "smooth_l1" else 1
            loss_box_reg = loss_box_reg / (per_anchor * max(num_pos_anchors, 1))
        return {
            "loss_cls": loss_cls * self.cls_loss_weight,
            "loss_box_reg": loss_box_reg * self.box_reg_weight,
        }

    def forward_inference(self, images, features, predictions):
        """Detectron2's inference; a loss registered with ``scores`` (``"ce_ohem"``: the softmax
        over ``K + 1`` classes with a zero background logit, as trained; the paper's Fig. 7
        scores CE+OHEM by softmax) scores with it instead of per-class sigmoids."""
        scores = self.cls_loss_entry.scores
        if scores is None:
            return super().forward_inference(images, features, predictions)
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores_per_image = [scores(x[img_idx]) for x in pred_logits]
            deltas_per_image = [x[img_idx] for x in pred_anchor_deltas]
            results.append(
                self.inference_single_image(anchors, scores_per_image, deltas_per_image, image_size)
            )
        return results
