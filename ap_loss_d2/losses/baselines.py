"""The anti-imbalance baselines of the paper's Table 13, GHM-C (``"ghm"``) and DR-loss (``"dr"``),
written from their papers and checked against the authors' released code (read, not copied).
Entries as for AP-loss (paper Fig. 3): each non-ignored anchor is one entry per class, positive
for its matched class; ignored anchors are left out. Needs only PyTorch.

* GHM-C: Li, Liu, Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019. Defaults (M = 30
  bins, EMA momentum 0.75) from libuyu/GHM_Detection ``cfg_retinanet_ghm_r50_fpn_1x.py``.
* DR-loss: Qian, Chen, Li, Jin, "DR Loss: Improving Object Detection by Distributional Ranking",
  CVPR 2020. Defaults from idstcv/DR_loss ``sigmoid_dr_loss.py``; their config's classifier prior
  (``PRIOR_PROB: 0.5``) is a model setting, ``MODEL.RETINANET.PRIOR_PROB``, not part of the loss.
"""
import math

import torch
import torch.nn.functional as F

from .ranking_sets import ranking_targets

__all__ = ["ghm_c_loss", "dr_loss", "GHM_BINS", "GHM_MOMENTUM", "GHM_VARIANTS", "DR_DEFAULTS"]

#: GHM-C defaults (Li et al.; libuyu/GHM_Detection RetinaNet config): M unit regions of the
#: gradient norm, EMA momentum alpha.
GHM_BINS = 30
GHM_MOMENTUM = 0.75
#: GHM-C normalisations: "released" = the authors' code, "paper" = the paper's equations.
GHM_VARIANTS = ("released", "paper")
#: DR-loss defaults (Qian et al.; idstcv/DR_loss sigmoid_dr_loss.py, SigmoidDRLoss.__init__).
DR_DEFAULTS = dict(pos_lambda=1.0, neg_lambda=0.1 / math.log(3.5), margin=0.5, L=6.0, tau=4.0)


def _check_inputs(logits, gt_labels, num_classes):
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError(f"logits must be a floating point (..., K) tensor, got {getattr(logits, 'shape', logits)!r}")
    if logits.shape[-1] != num_classes or tuple(gt_labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and gt_labels {tuple(gt_labels.shape)} must be (..., K={num_classes}) and (...)"
        )


def ghm_c_loss(
    logits, gt_labels, num_classes, *, bins=GHM_BINS, momentum=GHM_MOMENTUM, variant="released", state=None, stats=None
):
    """GHM-C (Li et al., Eq. 4-8): sigmoid cross entropy of every entry of ``(..., K)`` logits
    and ``(...)`` labels (-1 ignored, K background), weighted by the inverse gradient density.

    Gradient norms g = |sigmoid(x) - target| fall into ``bins`` = M regions of [0, 1]; R_j counts
    region j, S_j stands for it: R_j, or with ``momentum`` alpha > 0 and a caller-kept ``state``
    dict, the EMA ``state["ghm_acc"]`` = alpha S_j + (1 - alpha) R_j (``state["ghm_started"]``, a
    bool tensor, avoids a host read). Weights are constants. ``variant="released"`` (the
    authors' ``GHMC_Loss.calc``, as in mmdetection): sum_i CE_i / (n S(g_i)), n = non-empty
    regions, EMA from 0 over non-empty regions; ``"paper"``: sum_i CE_i / (M S(g_i)), EMA from
    R over every region. 0 without non-ignored entries; ``stats`` gets ``num_pos``.
    """
    _check_inputs(logits, gt_labels, num_classes)
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"bins={bins!r} must be an int >= 1")
    if not (0 <= momentum < 1):
        raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
    if variant not in GHM_VARIANTS:
        raise ValueError(f"variant={variant!r}: valid choices are {GHM_VARIANTS}")
    targets = ranking_targets(gt_labels, num_classes)
    valid = targets >= 0
    if stats is not None:
        stats["num_pos"] = (targets == 1).sum()
    if not bool(valid.any()):
        return logits.sum() * 0.0
    x = logits[valid].float()
    t = targets[valid].float()
    with torch.no_grad():
        g = (x.sigmoid() - t).abs()
        idx = (g * bins).long().clamp_(max=bins - 1)
        counts = torch.bincount(idx, minlength=bins).float()
        nonempty = counts > 0
        if momentum > 0 and state is not None:
            acc = state.get("ghm_acc")
            if acc is None or acc.numel() != bins:
                acc, started = counts.new_zeros(bins), torch.zeros((), dtype=torch.bool, device=counts.device)
            else:
                acc = acc.to(counts)
                started = state.get("ghm_started", torch.ones((), dtype=torch.bool)).to(counts.device)
            ema = momentum * acc + (1 - momentum) * counts
            if variant == "released":
                acc = torch.where(nonempty, ema, acc)
            else:
                acc = torch.where(started, ema, counts)
            state["ghm_acc"] = acc
            state["ghm_started"] = torch.ones((), dtype=torch.bool, device=counts.device)
            counts = acc
        norm = nonempty.sum().float() if variant == "released" else float(bins)
        weights = 1.0 / (norm * counts[idx])
    loss = (F.binary_cross_entropy_with_logits(x, t, reduction="none") * weights).sum()
    return loss.to(logits.dtype) if logits.dtype == torch.float64 else loss


def dr_loss(
    logits, gt_labels, num_classes, *, pos_lambda=DR_DEFAULTS["pos_lambda"], neg_lambda=DR_DEFAULTS["neg_lambda"],
    margin=DR_DEFAULTS["margin"], L=DR_DEFAULTS["L"], tau=DR_DEFAULTS["tau"], stats=None,
):
    """DR-loss (Qian et al.) of ``(N, R, K)`` logits (``(R, K)``: one image) and ``(N, R)``
    labels: per image (as in the paper), with sigmoid probabilities p_+ / p_-, the expectations
    P_- = sum softmax(p_- / lambda_-) p_- and P_+ = sum softmax(-p_+ / lambda_+) p_+ (1 without
    positives, as the authors' ``SigmoidDRLoss``) give tau * log(1 + exp(L z)) / L with
    z = P_- - P_+ + margin; the sum over images divided by N. Images without negatives add 0;
    ``stats`` gets ``num_pos``.
    """
    _check_inputs(logits, gt_labels, num_classes)
    if logits.dim() == 2:
        logits, gt_labels = logits[None], gt_labels[None]
    targets = ranking_targets(gt_labels, num_classes)
    if stats is not None:
        stats["num_pos"] = (targets == 1).sum()
    losses = []
    for x, t in zip(logits, targets):
        p = x.float().sigmoid()
        neg = p[t == 0]
        if neg.numel() == 0:
            continue
        neg_dist = (torch.softmax(neg / neg_lambda, dim=0) * neg).sum()
        pos = p[t == 1]
        pos_dist = (torch.softmax(-pos / pos_lambda, dim=0) * pos).sum() if pos.numel() else neg_dist.new_ones(())
        z = neg_dist - pos_dist + margin
        losses.append(tau * F.softplus(L * z) / L)
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).sum() / logits.shape[0]
