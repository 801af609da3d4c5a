"""Softmax cross-entropy with online hard negative mining (OHEM, SSD-style), for comparisons.

Needs only PyTorch.
"""
import math

import torch

from .neg_selection import check_neg_pos_ratio

__all__ = ["ce_ohem_loss", "ce_ohem_scores"]


def ce_ohem_loss(cls_logits, gt_labels, *, neg_pos_ratio=3.0):
    """Softmax cross-entropy over ``K + 1`` classes with per-image hard negative mining.

    The background logit is fixed at 0, i.e. each anchor's class scores are
    ``[0, s_1, ..., s_K]`` (background first) and its loss is
    ``CE = logsumexp([0, s_1..s_K]) - score_of_its_class``.

    Per image: every positive (foreground) anchor is kept, and the background anchors with the
    largest CE loss are kept, ``ceil(neg_pos_ratio * num_pos_in_image)`` of them (or all of them
    if there are fewer). An image without positives keeps no negative, as SSD (Caffe SSD's
    ``MineHardExamples``, mmdetection's ``SSDHead``). Ignored anchors (label -1) are never kept.
    Ties between negatives of equal loss are broken arbitrarily (the value does not depend on it).

    Args:
        cls_logits: ``(N, A, K)`` floating point tensor (N images, A anchors, K foreground
            classes).
        gt_labels: ``(N, A)`` integer tensor: -1 ignored, ``0..K-1`` foreground class, ``K``
            background.
        neg_pos_ratio: negatives kept per positive (3:1 by default); a finite number > 0 (the
            same rule as ``MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO``).

    Returns:
        Scalar tensor: sum of the kept anchors' CE losses divided by ``max(total positives, 1)``
        (positives counted over the whole batch), float32 for float16/bfloat16 logits (computed
        in float32), else the logits' dtype. Gradients flow only to the kept anchors.
        Empty inputs (``N == 0`` or ``A == 0``) give a zero loss attached to the graph.
    """
    if not torch.is_tensor(cls_logits) or cls_logits.dim() != 3:
        raise ValueError(f"cls_logits must be an (N, A, K) tensor, got shape "
                         f"{tuple(getattr(cls_logits, 'shape', ()))}")
    if not cls_logits.is_floating_point():
        raise ValueError(f"cls_logits must be floating point, got {cls_logits.dtype}")
    n_img, n_anchor, n_cls = cls_logits.shape
    gt_labels = torch.as_tensor(gt_labels, device=cls_logits.device)
    if tuple(gt_labels.shape) != (n_img, n_anchor):
        raise ValueError(f"gt_labels shape {tuple(gt_labels.shape)} does not match "
                         f"cls_logits shape {tuple(cls_logits.shape)}: expected "
                         f"{(n_img, n_anchor)}")
    check_neg_pos_ratio(neg_pos_ratio)
    if n_img == 0 or n_anchor == 0:
        return cls_logits.sum() * 0.0
    gt_labels = gt_labels.long()
    bad = (gt_labels < -1) | (gt_labels > n_cls)
    if bool(bad.any()):
        vals = torch.unique(gt_labels[bad]).tolist()
        raise ValueError(f"gt_labels must be in [-1, {n_cls}] (-1 ignored, 0..{n_cls - 1} "
                         f"foreground, {n_cls} background); got {vals[:10]}")

    x = cls_logits if cls_logits.dtype in (torch.float32, torch.float64) else cls_logits.float()
    # logsumexp over [0, s_1..s_K] = logaddexp(0, logsumexp(s)); no (N, A, K+1) copy.
    if n_cls > 0:
        lse = torch.logaddexp(torch.logsumexp(x, dim=-1), x.new_zeros(()))
    else:
        lse = x.new_zeros((n_img, n_anchor))
    pos = (gt_labels >= 0) & (gt_labels < n_cls)
    neg = gt_labels == n_cls
    if n_cls > 0:
        cls_idx = torch.where(pos, gt_labels, torch.zeros_like(gt_labels)).unsqueeze(-1)
        target_score = torch.where(pos, x.gather(-1, cls_idx).squeeze(-1), x.new_zeros(()))
    else:
        target_score = x.new_zeros((n_img, n_anchor))
    ce = lse - target_score  # (N, A)

    # Hard negative mining per image, on detached losses.
    num_pos_img = pos.sum(dim=1)  # (N,)
    num_keep = torch.ceil(neg_pos_ratio * num_pos_img.to(torch.float64)).long()
    neg_loss = torch.where(neg, ce.detach(), torch.full_like(ce, -math.inf, dtype=ce.dtype))
    order = torch.argsort(neg_loss, dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_anchor, device=order.device).expand(n_img, -1))
    keep = pos | (neg & (rank < num_keep.unsqueeze(1)))

    total_pos = int(num_pos_img.sum())
    return ce[keep].sum() / max(total_pos, 1)


def ce_ohem_scores(cls_logits):
    """Foreground class probabilities of the model :func:`ce_ohem_loss` trains: the softmax over
    ``K + 1`` classes with the background logit fixed at 0, background column dropped.

    ``p_k = exp(s_k) / (1 + sum_j exp(s_j))`` for ``k = 1..K``, computed stably.

    Args:
        cls_logits: ``(..., K)`` floating point tensor.

    Returns:
        ``(..., K)`` tensor of the same dtype, each row summing to less than 1 (the rest is the
        background probability). Empty inputs give an empty output.
    """
    if not torch.is_tensor(cls_logits) or not cls_logits.is_floating_point() or cls_logits.dim() < 1:
        raise ValueError("cls_logits must be a floating point tensor of shape (..., K)")
    if cls_logits.numel() == 0:
        return cls_logits.clone()
    x = cls_logits if cls_logits.dtype in (torch.float32, torch.float64) else cls_logits.float()
    lse = torch.logaddexp(torch.logsumexp(x, dim=-1, keepdim=True), x.new_zeros(()))
    return torch.exp(x - lse).to(cls_logits.dtype)
