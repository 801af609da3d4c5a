"""Negative selection before a ranking loss (paper supplementary Table 8: "OHEM + AP-loss" and
"Random Sampling + AP-loss"): a subset of the negatives of each image is kept, the others are
ignored, and AP-loss ranks what is left. Needs only PyTorch.
"""
import math

import torch

__all__ = ["NEG_SELECTIONS", "select_negatives"]

#: ``"all"``: every negative (plain AP-loss); ``"ohem"``: the highest-scored (hardest)
#: negatives; ``"random"``: negatives drawn uniformly at random.
NEG_SELECTIONS = ("all", "ohem", "random")


def select_negatives(targets, logits, mode, neg_pos_ratio=3.0, entries_per_image=None, generator=None):
    """Keep, per image, ``ceil(neg_pos_ratio * max(P, 1))`` negatives (P: the image's positive
    entries) and mark the other negatives ignored.

    Entries are anchors/RoIs x classes (paper Fig. 3); hardness is the entry's score (a higher
    score ranks a negative above more positives). An image with fewer negatives keeps them all.
    Ties between equal scores are broken arbitrarily.

    Args:
        targets: ``(N, R, K)`` (or ``(sum_i R_i, K)``) int8 ranking targets: 1 positive, 0
            negative, -1 ignored (:func:`ap_loss_d2.losses.registry.ranking_targets`).
        logits: scores of the same shape (only read, no gradient).
        mode: one of :data:`NEG_SELECTIONS`.
        neg_pos_ratio: negatives kept per positive, a finite number > 0.
        entries_per_image: ``[R_1, ..., R_N]`` for a 2-D input (None: dim 0 indexes images).
        generator: optional ``torch.Generator`` for ``"random"``.

    Returns:
        New targets of the same shape (``targets`` itself for ``"all"``).
    """
    if mode not in NEG_SELECTIONS:
        raise ValueError(f"neg_selection={mode!r}; valid values: {', '.join(NEG_SELECTIONS)}")
    if isinstance(neg_pos_ratio, bool) or not (
        isinstance(neg_pos_ratio, (int, float)) and math.isfinite(neg_pos_ratio) and neg_pos_ratio > 0
    ):
        raise ValueError(f"neg_pos_ratio={neg_pos_ratio!r} must be a finite number > 0")
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)} must have one shape")
    if mode == "all" or targets.numel() == 0:
        return targets
    out = targets.clone()
    if entries_per_image is None:
        images = [(out[i], logits[i]) for i in range(out.shape[0])]
    else:
        sizes = [int(r) for r in entries_per_image]
        images = list(zip(out.split(sizes, dim=0), logits.split(sizes, dim=0)))
    for t, x in images:  # views of ``out``: written in place
        t = t.reshape(-1)
        neg = (t == 0).nonzero().squeeze(1)
        keep = math.ceil(neg_pos_ratio * max(int((t == 1).sum()), 1))
        if neg.numel() <= keep:
            continue
        if mode == "ohem":
            order = x.detach().reshape(-1)[neg].argsort(descending=True)
        else:
            order = torch.randperm(neg.numel(), generator=generator, device="cpu").to(neg.device)
        t[neg[order[keep:]]] = -1
    return out
