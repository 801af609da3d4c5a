"""The built-in classification losses, one registered :class:`ClsLoss` class each (paper
Tables 2, 8, 13 and Fig. 8). Each validates its arguments once, in its constructor, and is built
from ``MODEL.CLS_LOSS`` by :func:`~ap_loss_d2.losses.registry.build_cls_loss`.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from detectron2.config import configurable

from .alternatives import ap_loss_approx_gradient, ap_loss_structured_hinge
from .distributed import group_size, resolve_group
from .baselines import DR_DEFAULTS, GHM_BINS, GHM_MOMENTUM, GHM_VARIANTS, dr_loss, ghm_c_loss
from .neg_selection import check_neg_pos_ratio, select_negatives
from .ohem import ce_ohem_loss, ce_ohem_scores
from .ranking import ap_loss, auc_loss, check_ranking_options
from .ranking_sets import RankingSets, ranking_targets
from .base import ClsLoss, check_number
from .registry import CLS_LOSS_REGISTRY

__all__ = [
    "APLoss",
    "AUCLoss",
    "APOHEMLoss",
    "APRandomLoss",
    "FocalLoss",
    "CEOHEMLoss",
    "APApproxLoss",
    "APHingeLoss",
    "GHMCLoss",
    "DRLoss",
    "SoftmaxCELoss",
]


def _images_per_process(cfg) -> Optional[int]:
    """``SOLVER.IMS_PER_BATCH`` per process (scaled as DefaultTrainer.auto_scale_workers does
    when ``SOLVER.REFERENCE_WORLD_SIZE`` differs from the world); None if it does not split."""
    world = group_size(resolve_group(True))
    total, reference = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.get("REFERENCE_WORLD_SIZE", 0)
    if reference and reference != world:
        total = int(round(total * world / reference))
    return total // world if total % world == 0 and total > 0 else None


class _RankingLoss(ClsLoss):
    """Shared by AP- and AUC-loss: the step function and the ranking sets."""

    kernel = None

    @configurable
    def __init__(
        self,
        *,
        delta: float = 1.0,
        step: str = "linear",
        sigmoid_k: float = 0.5,
        kernel: str = "auto",
        images_per_ranking_set: int = 0,
        rank_across_processes: bool = False,
        images_per_process: Optional[int] = None,
        num_processes: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_ranking_options(delta=delta, step=step, sigmoid_k=sigmoid_k, kernel=kernel)
        self.options = dict(delta=delta, step=step, sigmoid_k=sigmoid_k, kernel=kernel)
        self.sets = RankingSets(images_per_ranking_set, rank_across_processes, images_per_process, num_processes)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.CLS_LOSS
        return {
            **super().from_config(cfg),
            "delta": c.DELTA,
            "step": c.STEP,
            "sigmoid_k": c.SIGMOID_K,
            "kernel": c.KERNEL,
            "images_per_ranking_set": c.IMAGES_PER_RANKING_SET,
            "rank_across_processes": c.RANK_ACROSS_PROCESSES,
            "images_per_process": _images_per_process(cfg),
        }

    def extra_repr(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{super().extra_repr()}, {opts}, images_per_ranking_set={self.sets.images_per_set}"

    def select(self, targets, logits, entries_per_image):
        """Targets after negative selection (all negatives here)."""
        return targets

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        targets = ranking_targets(gt_labels, logits.shape[-1])
        targets = self.select(targets, logits, entries_per_image)
        kernel = type(self).kernel
        return self.sets(kernel, logits, targets, entries_per_image=entries_per_image, stats=stats, **self.options)


@CLS_LOSS_REGISTRY.register()
class APLoss(_RankingLoss):
    """AP-loss (the paper; error-driven update, Algorithm 1)"""

    name, label = "ap", "AP-loss"
    kernel = staticmethod(ap_loss)

    @configurable
    def __init__(self, *, interpolate: bool = True, **kwargs):
        """
        Args:
            interpolate: interpolated AP (Sec. 3.4.3).
            kwargs: ``delta``, ``step``, ``sigmoid_k``, ``kernel`` (see
                :func:`ap_loss_d2.losses.ap_loss`),
                ``images_per_ranking_set``, ``rank_across_processes`` (see
                :class:`~ap_loss_d2.losses.ranking_sets.RankingSets`), ``weight``, ``diagnostics``.
        """
        super().__init__(**kwargs)
        check_ranking_options(**self.options, interpolate=interpolate)
        self.options["interpolate"] = interpolate

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "interpolate": cfg.MODEL.CLS_LOSS.INTERPOLATE}


@CLS_LOSS_REGISTRY.register()
class AUCLoss(_RankingLoss):
    """AUC-loss (Eq. 7, same error-driven update)"""

    name, label = "auc", "AUC-loss"
    kernel = staticmethod(auc_loss)


class _NegativesPerPositive(ClsLoss):
    """``neg_pos_ratio``: background anchors kept per positive anchor of an image
    (``MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO``)."""

    @configurable
    def __init__(self, *, neg_pos_ratio: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.neg_pos_ratio = check_neg_pos_ratio(neg_pos_ratio)

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "neg_pos_ratio": cfg.MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO}


@CLS_LOSS_REGISTRY.register()
class APOHEMLoss(_NegativesPerPositive, APLoss):
    """OHEM + AP-loss (Table 8): per image the hardest background anchors, neg_pos_ratio per positive anchor, others ignored"""

    name, label = "ap_ohem", "OHEM + AP-loss"
    heads = ("retinanet", "ssd")
    selection = "ohem"

    def select(self, targets, logits, entries_per_image):
        return select_negatives(targets, logits, self.selection, self.neg_pos_ratio, entries_per_image)


@CLS_LOSS_REGISTRY.register()
class APRandomLoss(APOHEMLoss):
    """Random sampling + AP-loss (Table 8): per image random background anchors, neg_pos_ratio per positive anchor, others ignored"""

    name, label = "ap_random", "Random + AP-loss"
    selection = "random"


@CLS_LOSS_REGISTRY.register()
class FocalLoss(ClsLoss):
    """RetinaNet's sigmoid focal loss, identical to stock RetinaNet"""

    name, label = "focal", "Focal loss"
    heads = ("retinanet", "ssd")

    @configurable
    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0, **kwargs):
        """
        Args:
            alpha: weight of the positive term in [0, 1], or < 0 for none (fvcore's rule).
            gamma: focusing parameter >= 0.
        """
        super().__init__(**kwargs)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha < 0 or 0 <= alpha <= 1):
            raise ValueError(f"alpha={alpha!r} must be in [0, 1] (or < 0 for no weighting)")
        self.alpha = float(alpha)
        self.gamma = check_number("gamma", gamma, allow_zero=True)

    @classmethod
    def from_config(cls, cfg):
        r = cfg.MODEL.RETINANET
        return {**super().from_config(cfg), "alpha": r.FOCAL_LOSS_ALPHA, "gamma": r.FOCAL_LOSS_GAMMA}

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        """fvcore's sigmoid focal loss summed over the non-ignored entries and K classes
        (background: all-zero target), divided by ``normalizer`` (RetinaNet: the EMA of the
        positive-anchor count)."""
        from fvcore.nn import sigmoid_focal_loss_jit

        if normalizer is None:
            raise ValueError("the focal loss needs the head's normalizer (positive anchors)")
        valid = gt_labels >= 0
        target = F.one_hot(gt_labels[valid], num_classes=logits.shape[-1] + 1)[:, :-1]
        loss = sigmoid_focal_loss_jit(
            logits[valid], target.to(logits.dtype), alpha=self.alpha, gamma=self.gamma, reduction="sum"
        )
        return loss / normalizer


@CLS_LOSS_REGISTRY.register()
class CEOHEMLoss(_NegativesPerPositive):
    """softmax CE over K + 1 classes (background logit fixed at 0) with 3:1 online hard negative mining; softmax scores at test"""

    name, label = "ce_ohem", "CE + OHEM"
    heads = ("retinanet", "ssd")

    def scores(self, logits):
        return ce_ohem_scores(logits)

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        return ce_ohem_loss(logits, gt_labels, neg_pos_ratio=self.neg_pos_ratio)


@CLS_LOSS_REGISTRY.register()
class APApproxLoss(ClsLoss):
    """AP-loss by the approximate gradient, -log(smoothed AP) (Fig. 8)"""

    name, label = "ap_approx", "AP-loss (approx. gradient)"
    heads = ("retinanet",)

    @configurable
    def __init__(self, *, sigmoid_k: float = 1.0, **kwargs):
        """``sigmoid_k``: temperature of the sigmoid smoothing AP (supplementary Eq. 32: 1)."""
        super().__init__(**kwargs)
        self.sigmoid_k = check_number("approx_sigmoid_k", sigmoid_k)

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "sigmoid_k": cfg.MODEL.CLS_LOSS.APPROX_SIGMOID_K}

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        targets = ranking_targets(gt_labels, logits.shape[-1])
        return ap_loss_approx_gradient(logits, targets, sigmoid_k=self.sigmoid_k)


@CLS_LOSS_REGISTRY.register()
class APHingeLoss(ClsLoss):
    """AP-loss by the structured hinge-loss upper bound, SVM-AP (Fig. 8)"""

    name, label = "ap_hinge", "AP-loss (structured hinge)"
    heads = ("retinanet",)

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        return ap_loss_structured_hinge(logits, ranking_targets(gt_labels, logits.shape[-1]))


@CLS_LOSS_REGISTRY.register()
class GHMCLoss(ClsLoss):
    """GHM-C (Li et al. AAAI'19): sigmoid CE weighted by inverse gradient density, 30 bins, EMA 0.75 (Table 13)

    The EMA of the bin counts is a buffer (``ghm_acc``, with ``ghm_started``): it is in the
    ``state_dict``, so checkpoints and ``--resume`` keep it. Each process keeps its own EMA of
    its own images' counts, as GHM-C's released code does on every GPU (the buffers are not
    broadcast: Detectron2 wraps models with ``broadcast_buffers=False``); a checkpoint holds
    the main process's, which every process loads on resume.
    """

    name, label = "ghm", "GHM-C"
    heads = ("retinanet",)

    @configurable
    def __init__(self, *, bins: int = GHM_BINS, momentum: float = GHM_MOMENTUM, variant: str = "released", **kwargs):
        """See :func:`ap_loss_d2.losses.baselines.ghm_c_loss`."""
        super().__init__(**kwargs)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins={bins!r} must be an int >= 1")
        self.momentum = check_number("momentum", momentum, allow_zero=True, upper=1)
        if variant not in GHM_VARIANTS:
            raise ValueError(f"variant={variant!r}: valid choices are {GHM_VARIANTS}")
        self.bins, self.variant = bins, variant
        self.register_buffer("ghm_acc", torch.zeros(bins))
        self.register_buffer("ghm_started", torch.zeros((), dtype=torch.bool))

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        state = {"ghm_acc": self.ghm_acc, "ghm_started": self.ghm_started}
        loss = ghm_c_loss(
            logits, gt_labels, logits.shape[-1], bins=self.bins, momentum=self.momentum,
            variant=self.variant, state=state, stats=stats,
        )
        if self.training:
            self.ghm_acc.copy_(state["ghm_acc"])
            self.ghm_started.fill_(True)
        return loss


@CLS_LOSS_REGISTRY.register()
class DRLoss(ClsLoss):
    """DR-loss (Qian et al. CVPR'20): distributional ranking, margin 0.5, L = 6, tau = 4 (Table 13)"""

    name, label = "dr", "DR-loss"
    heads = ("retinanet",)

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.params = dict(DR_DEFAULTS)

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        return dr_loss(logits, gt_labels, logits.shape[-1], stats=stats, **self.params)


@CLS_LOSS_REGISTRY.register()
class SoftmaxCELoss(ClsLoss):
    """softmax CE over K + 1 classes, Detectron2's own Fast R-CNN head (stock Faster R-CNN)"""

    name, label = "ce", "CE"
    heads = ("roi_heads",)
    native = True

    def scores(self, logits):
        return F.softmax(logits, dim=-1)

    def loss(self, logits, gt_labels, stats, normalizer, entries_per_image):
        """Softmax CE over ``K + 1`` logits (background last), mean over the non-ignored RoIs
        (the head computes it with Detectron2's ``FastRCNNOutputLayers.losses``)."""
        valid = gt_labels >= 0
        return F.cross_entropy(logits[valid], gt_labels[valid]) if valid.any() else logits.sum() * 0.0
