"""Negative selection before a ranking loss (paper supplementary Table 8: "OHEM + AP-loss" and
"Random Sampling + AP-loss"): a subset of the negatives of each image is kept, the others are
ignored, and AP-loss ranks what is left. Needs only PyTorch.

The unit of selection is the anchor (RoI), as in SSD-style hard negative mining and in this
repo's CE + OHEM baseline (:func:`ap_loss_d2.losses.ohem.ce_ohem_loss`): per image,
``ceil(ratio * max(#positive anchors, 1))`` background anchors are kept, each with all of its K
class entries; positive anchors keep all their entries (the positive one and the K - 1
negative ones). Unlike CE + OHEM, an image without positives keeps ``ceil(ratio)`` negatives:
a ranking set ranks them against the other images' positives. The paper's Table 8 text "use OHEM or Random Sampling to select a subset of
negative samples" counts samples = anchor boxes (its Sec. 1: "each sample (anchor box)"), and
its OHEM is [2] / SSD [21]. ``unit="entry"`` selects single anchor x class entries instead (3
negative entries per positive entry: K times fewer negatives; kept for comparison).
"""
import math

import torch

__all__ = ["NEG_SELECTIONS", "SELECTION_UNITS", "check_neg_pos_ratio", "select_negatives"]

#: ``"all"``: every negative (plain AP-loss); ``"ohem"``: the highest-scored (hardest)
#: negatives; ``"random"``: negatives drawn uniformly at random.
NEG_SELECTIONS = ("all", "ohem", "random")
#: What one selected negative is: a background ``"anchor"`` (all its K entries) or one ``"entry"``.
SELECTION_UNITS = ("anchor", "entry")


def check_neg_pos_ratio(neg_pos_ratio) -> float:
    """``float(neg_pos_ratio)``; ValueError unless it is a finite number > 0 (negatives kept per
    positive by ``"ce_ohem"``, ``"ap_ohem"``, ``"ap_random"``: MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO)."""
    if isinstance(neg_pos_ratio, bool) or not (
        isinstance(neg_pos_ratio, (int, float)) and math.isfinite(neg_pos_ratio) and neg_pos_ratio > 0
    ):
        raise ValueError(f"neg_pos_ratio={neg_pos_ratio!r} must be a finite number > 0")
    return float(neg_pos_ratio)


def select_negatives(targets, logits, mode, neg_pos_ratio=3.0, entries_per_image=None, generator=None, unit="anchor"):
    """Keep, per image, ``ceil(neg_pos_ratio * max(P, 1))`` negative units and mark the other
    negatives ignored.

    ``unit="anchor"`` (default): P = the image's positive anchors (rows holding a 1); a negative
    unit is a background anchor (a row with a 0 and no 1), kept with all its negative entries;
    its hardness is its highest score (the entry ranked highest among the negatives), as SSD
    ranks background anchors by their confidence loss. Positive anchors are never touched.
    ``unit="entry"``: P = the image's positive entries, a negative unit is one entry (anchor x
    class, paper Fig. 3), hardness its score.

    An image with fewer negative units keeps them all. Ties between equal scores are broken
    arbitrarily.

    Args:
        targets: ``(N, R, K)`` (or ``(sum_i R_i, K)``) int8 ranking targets: 1 positive, 0
            negative, -1 ignored (:func:`ap_loss_d2.losses.ranking_sets.ranking_targets`).
        logits: scores of the same shape (only read, no gradient).
        mode: one of :data:`NEG_SELECTIONS`.
        neg_pos_ratio: negative units kept per positive unit, a finite number > 0 (the rule of
            ``MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO``, shared with ``ce_ohem``).
        entries_per_image: ``[R_1, ..., R_N]`` for a 2-D input (None: dim 0 indexes images).
        generator: optional ``torch.Generator`` for ``"random"``.
        unit: one of :data:`SELECTION_UNITS`.

    Returns:
        New targets of the same shape (``targets`` itself for ``"all"``).
    """
    if mode not in NEG_SELECTIONS:
        raise ValueError(f"neg_selection={mode!r}; valid values: {', '.join(NEG_SELECTIONS)}")
    if unit not in SELECTION_UNITS:
        raise ValueError(f"unit={unit!r}; valid values: {', '.join(SELECTION_UNITS)}")
    check_neg_pos_ratio(neg_pos_ratio)
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
    k = targets.shape[-1]
    for t, x in images:  # views of ``out``: written in place
        if unit == "anchor":
            t, x = t.reshape(-1, k), x.detach().reshape(-1, k)
            is_pos = (t == 1).any(dim=1)
            neg = ((t == 0).any(dim=1) & ~is_pos).nonzero().squeeze(1)
            num_pos = int(is_pos.sum())
        else:
            t, x = t.reshape(-1), x.detach().reshape(-1)
            neg = (t == 0).nonzero().squeeze(1)
            num_pos = int((t == 1).sum())
        keep = math.ceil(neg_pos_ratio * max(num_pos, 1))
        if neg.numel() <= keep:
            continue
        if mode == "ohem":
            if unit == "anchor":
                hardness = x[neg].masked_fill(t[neg] != 0, -math.inf).amax(dim=1)
            else:
                hardness = x[neg]
            order = hardness.argsort(descending=True)
        else:
            order = torch.randperm(neg.numel(), generator=generator, device="cpu").to(neg.device)
        drop = neg[order[keep:]]
        if unit == "anchor":
            rows = t[drop]
            t[drop] = rows.masked_fill(rows == 0, -1)
        else:
            t[drop] = -1
    return out
