"""The anti-imbalance baselines of the paper's Table 13, as registered RetinaNet classification
losses: GHM-C (``"ghm"``) and DR-loss (``"dr"``). Needs only PyTorch.

Both are written from their papers' equations:

* GHM-C: B. Li, Y. Liu, X. Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019
  (Sec. 3: gradient norm g = |p - p*|, gradient density by unit-region approximation with M
  bins, EMA of the bin counts with momentum alpha; M = 30, alpha = 0.75 as in their released
  defaults).
* DR-loss: Q. Qian, L. Chen, H. Li, R. Jin, "DR Loss: Improving Object Detection by
  Distributional Ranking", CVPR 2020 (entropy-regularised distributions over the positives and
  negatives of an image, ranked with a margin, smoothed logistic loss; their defaults
  lambda_+ = 1, lambda_- = 0.1 / ln 3.5, margin gamma = 0.5, L = 6, loss weight tau = 4).

Classification entries: as for AP-loss (paper Fig. 3), each non-ignored anchor is one entry per
class, positive for its matched class and negative for the others (every class of a background
anchor); ignored anchors (label -1) are left out.
"""
import math

import torch
import torch.nn.functional as F

from .registry import ranking_targets, register_cls_loss

__all__ = ["ghm_c_loss", "dr_loss", "GHM_BINS", "GHM_MOMENTUM", "DR_DEFAULTS"]

#: GHM-C defaults (Li et al.): M unit regions of the gradient norm, EMA momentum alpha.
GHM_BINS = 30
GHM_MOMENTUM = 0.75
#: DR-loss defaults (Qian et al., Sec. 4 / implementation details).
DR_DEFAULTS = dict(pos_lambda=1.0, neg_lambda=0.1 / math.log(3.5), margin=0.5, L=6.0, tau=4.0)


def _check_inputs(logits, gt_labels, num_classes):
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError(f"logits must be a floating point (..., K) tensor, got {getattr(logits, 'shape', logits)!r}")
    if logits.shape[-1] != num_classes or tuple(gt_labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and gt_labels {tuple(gt_labels.shape)} must be (..., K={num_classes}) and (...)"
        )


def ghm_c_loss(logits, gt_labels, num_classes, *, bins=GHM_BINS, momentum=GHM_MOMENTUM, state=None, stats=None):
    """GHM-C: sigmoid binary cross entropy of every entry, weighted by the inverse gradient
    density (Li et al., Eq. 4-8).

    For entry i with probability p_i = sigmoid(x_i) and target p*_i in {0, 1}, the gradient norm
    is g_i = |p_i - p*_i| in [0, 1]. [0, 1] is cut into ``bins`` = M unit regions of width
    eps = 1/M (the last one closed); R_j counts the entries in region j. The gradient density is
    GD(g) = R_ind(g) / eps = M * R_ind(g), and with ``momentum`` alpha > 0 R_j is replaced by
    its EMA S_j = alpha * S_j(previous call) + (1 - alpha) * R_j (Eq. 8; the first call starts
    from S_j = R_j, and the EMA lives in ``state["ghm_acc"]``, a dict the caller keeps between
    iterations; without ``state`` each call uses its own counts). With beta_i = N / GD(g_i) the
    loss is the paper's ``(1/N) sum_i beta_i CE(p_i, p*_i) = sum_i CE_i / (M * S_ind(g_i))``
    (N: the number of entries). The weights are constants (no gradient through them).
    (The authors' released code divides by the number of non-empty regions instead of M.)

    Args:
        logits: ``(N, R, K)`` (or ``(E, K)``) scores.
        gt_labels: ``(N, R)`` (or ``(E,)``) int labels: -1 ignored, 0..K-1 class, K background.
        num_classes: K.
        bins: M >= 1.
        momentum: alpha in [0, 1); 0 = no EMA.
        state: optional dict holding the EMA between calls.
        stats: optional dict, filled with ``num_pos``.

    Returns:
        0-dim tensor; 0 (attached to the graph) without any non-ignored entry.
    """
    _check_inputs(logits, gt_labels, num_classes)
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"bins={bins!r} must be an int >= 1")
    if not (0 <= momentum < 1):
        raise ValueError(f"momentum={momentum!r} must be in [0, 1)")
    targets = ranking_targets(gt_labels, num_classes)
    valid = targets >= 0
    if stats is not None:
        stats["num_pos"] = int((targets == 1).sum())
    if not bool(valid.any()):
        return logits.sum() * 0.0
    x = logits[valid].float()
    t = targets[valid].float()
    with torch.no_grad():
        g = (x.sigmoid() - t).abs()
        idx = (g * bins).long().clamp_(max=bins - 1)
        counts = torch.bincount(idx, minlength=bins).float()
        if momentum > 0 and state is not None:
            acc = state.get("ghm_acc")
            if acc is None or acc.numel() != bins:
                acc = counts
            else:
                acc = momentum * acc.to(counts.device) + (1 - momentum) * counts
            state["ghm_acc"] = acc
            counts = acc
        weights = 1.0 / (bins * counts[idx])
    loss = (F.binary_cross_entropy_with_logits(x, t, reduction="none") * weights).sum()
    return loss.to(logits.dtype) if logits.dtype == torch.float64 else loss


def dr_loss(
    logits,
    gt_labels,
    num_classes,
    *,
    pos_lambda=DR_DEFAULTS["pos_lambda"],
    neg_lambda=DR_DEFAULTS["neg_lambda"],
    margin=DR_DEFAULTS["margin"],
    L=DR_DEFAULTS["L"],
    tau=DR_DEFAULTS["tau"],
    stats=None,
):
    """DR-loss (Qian et al.): per image, rank the expected positive probability above the
    expected negative probability by a margin.

    For one image with positive probabilities p_+ and negative probabilities p_- (sigmoids of
    its entries), the entropy-regularised worst-case distributions are
    q_- = softmax(p_- / lambda_-) (hard negatives weigh more) and
    q_+ = softmax(-p_+ / lambda_+) (hard positives weigh more); the expectations are
    P_- = sum q_- p_- and P_+ = sum q_+ p_+ (P_+ = 0 for an image without positives). The
    image's loss is tau * l(P_- - P_+ + margin) with the smoothed logistic loss
    l(z) = log(1 + exp(L z)) / L, and the result is the mean over the images.

    Args:
        logits: ``(N, R, K)`` scores of N images (a 2-D ``(R, K)`` input is one image).
        gt_labels: ``(N, R)`` int labels: -1 ignored, 0..K-1 class, K background.
        num_classes: K.
        pos_lambda, neg_lambda, margin, L, tau: the paper's parameters (defaults above).
        stats: optional dict, filled with ``num_pos``.

    Returns:
        0-dim tensor; 0 (attached to the graph) for N == 0 or images without any negative
        (an image without non-ignored entries contributes 0).
    """
    _check_inputs(logits, gt_labels, num_classes)
    if logits.dim() == 2:
        logits, gt_labels = logits[None], gt_labels[None]
    targets = ranking_targets(gt_labels, num_classes)
    if stats is not None:
        stats["num_pos"] = int((targets == 1).sum())
    losses = []
    for x, t in zip(logits, targets):
        p = x.float().sigmoid()
        neg = p[t == 0]
        if neg.numel() == 0:
            continue
        neg_dist = (torch.softmax(neg / neg_lambda, dim=0) * neg).sum()
        pos = p[t == 1]
        pos_dist = (torch.softmax(-pos / pos_lambda, dim=0) * pos).sum() if pos.numel() else neg_dist.new_zeros(())
        z = neg_dist - pos_dist + margin
        losses.append(tau * F.softplus(L * z) / L)
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).sum() / logits.shape[0]


@register_cls_loss(
    "ghm",
    heads=("retinanet",),
    options=("loss_state",),
    doc="GHM-C (Li et al. AAAI'19): sigmoid CE weighted by inverse gradient density, 30 bins, EMA 0.75 (Table 13)",
)
def _ghm(logits, gt_labels, num_classes, *, stats, loss_state):
    return ghm_c_loss(logits, gt_labels, num_classes, state=loss_state, stats=stats)


@register_cls_loss(
    "dr",
    heads=("retinanet",),
    doc="DR-loss (Qian et al. CVPR'20): distributional ranking, margin 0.5, L = 6, tau = 4 (Table 13)",
)
def _dr(logits, gt_labels, num_classes, *, stats):
    return dr_loss(logits, gt_labels, num_classes, stats=stats)
