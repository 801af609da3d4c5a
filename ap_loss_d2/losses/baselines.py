"""The anti-imbalance baselines of the paper's Table 13: GHM-C and DR-loss (the
registered losses ``"ghm"`` and ``"dr"``). Needs only PyTorch.

Both are written from their papers' equations and checked against the authors' released code
(read, not copied):

* GHM-C: B. Li, Y. Liu, X. Wang, "Gradient Harmonized Single-stage Detector", AAAI 2019
  (Sec. 3: gradient norm g = |p - p*|, gradient density by unit-region approximation with M
  bins, EMA of the bin counts with momentum alpha). Defaults M = 30, alpha = 0.75: the RetinaNet
  config of the authors' code, libuyu/GHM_Detection ``experiments/cfg_retinanet_ghm_r50_fpn_1x.py``
  (``loss_cls=dict(type='GHMC', bins=30, momentum=0.75, use_sigmoid=True, loss_weight=1.0)``).
  The paper and that code differ in the normalisation and the EMA start; ``variant`` picks one
  (default ``"released"``: the code the paper's numbers came from, also mmdetection's
  ``mmdet/models/losses/ghm_loss.py``).
* DR-loss: Q. Qian, L. Chen, H. Li, R. Jin, "DR Loss: Improving Object Detection by
  Distributional Ranking", CVPR 2020 (entropy-regularised distributions over the positives and
  negatives of an image, ranked with a margin, smoothed logistic loss). Defaults as in the
  authors' idstcv/DR_loss ``sigmoid_dr_loss.py`` (``SigmoidDRLoss``): lambda_+ = 1,
  lambda_- = 0.1 / ln 3.5, margin 0.5, L = 6, tau = 4; an image without positives is scored
  against P_+ = 1 as there. (Their RetinaNet config ``configs/dr_retina/dr_R-50-FPN_1x.yaml``
  also initialises the classifier with ``PRIOR_PROB: 0.5`` instead of RetinaNet's 0.01; that is
  a model setting, ``MODEL.RETINANET.PRIOR_PROB``, not part of the loss.)

Classification entries: as for AP-loss (paper Fig. 3), each non-ignored anchor is one entry per
class, positive for its matched class and negative for the others (every class of a background
anchor); ignored anchors (label -1) are left out.
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
    """GHM-C: sigmoid binary cross entropy of every entry, weighted by the inverse gradient
    density (Li et al., Eq. 4-8).

    For entry i with probability p_i = sigmoid(x_i) and target p*_i in {0, 1}, the gradient norm
    is g_i = |p_i - p*_i| in [0, 1]. [0, 1] is cut into ``bins`` = M unit regions of width
    eps = 1/M (the last one closed); R_j counts the entries in region j and S_j is what stands
    for it: R_j itself, or with ``momentum`` alpha > 0 and a ``state`` dict kept by the caller
    between iterations (``state["ghm_acc"]``), the EMA S_j = alpha * S_j(previous) + (1 - alpha) * R_j
    (Eq. 8; without ``state`` each call uses its own counts; ``state["ghm_started"]``, a bool
    tensor, tells whether the EMA has started, so that no host read is needed). The weights are constants (no
    gradient through them). With N entries:

    * ``variant="released"`` (default; libuyu/GHM_Detection ``mmdetection/mmdet/core/loss/ghm_loss.py``
      ``GHMC_Loss.calc``, the same in mmdetection): loss = sum_i CE_i / (n * S_ind(g_i)), n = the
      number of non-empty regions of this call; the EMA starts from S = 0 and only non-empty
      regions are updated.
    * ``variant="paper"`` (Eq. 4-8: GD(g) = M * S_ind(g), beta_i = N / GD(g_i), loss =
      (1/N) sum_i beta_i CE_i): loss = sum_i CE_i / (M * S_ind(g_i)); the EMA starts from S = R
      and updates every region (empty ones decay).

    Args:
        logits: ``(N, R, K)`` (or ``(E, K)``) scores.
        gt_labels: ``(N, R)`` (or ``(E,)``) int labels: -1 ignored, 0..K-1 class, K background.
        num_classes: K.
        bins: M >= 1.
        momentum: alpha in [0, 1); 0 = no EMA.
        variant: one of ``GHM_VARIANTS``.
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
    P_- = sum q_- p_- and P_+ = sum q_+ p_+ (P_+ = 1 for an image without positives, as in
    the authors' ``SigmoidDRLoss.forward``). The image's loss is tau * l(P_- - P_+ + margin)
    with the smoothed logistic loss l(z) = log(1 + exp(L z)) / L, and the result is the mean
    over the images. (Per image as in the paper, "for each image, we convert the classification
    problem to a ranking problem"; the released module ranks whatever entries it is given, in
    maskrcnn-benchmark's RetinaNet loss the concatenated anchors of the batch.)

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
