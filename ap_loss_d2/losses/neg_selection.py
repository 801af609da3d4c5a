"""Negative selection before a ranking loss (paper supplementary Table 8: "OHEM + AP-loss",
"Random Sampling + AP-loss"): per image a subset of the negatives is kept, the others ignored.

The unit is the anchor (the paper's "sample (anchor box)", as SSD's hard negative mining and
:func:`ap_loss_d2.losses.ohem.ce_ohem_loss`): ``ceil(ratio * max(#positive anchors, 1))``
background anchors are kept with all their K entries; positive anchors keep all theirs. Unlike
CE + OHEM, an image without positives keeps ``ceil(ratio)`` negatives: a ranking set ranks them
against the other images' positives. ``unit="entry"`` selects single anchor x class entries
instead (for comparison). Needs only PyTorch.
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
    """``float(neg_pos_ratio)`` (MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO); ValueError unless a finite
    number > 0."""
    if isinstance(neg_pos_ratio, bool) or not (
        isinstance(neg_pos_ratio, (int, float)) and math.isfinite(neg_pos_ratio) and neg_pos_ratio > 0
    ):
        raise ValueError(f"neg_pos_ratio={neg_pos_ratio!r} must be a finite number > 0")
    return float(neg_pos_ratio)


def select_negatives(targets, logits, mode, neg_pos_ratio=3.0, entries_per_image=None, generator=None, unit="anchor"):
    """New ranking targets (``(N, R, K)``, or ``(sum_i R_i, K)`` with ``entries_per_image``;
    ``targets`` itself for ``"all"``) keeping per image ``ceil(neg_pos_ratio * max(P, 1))``
    negative units, the hardest (``"ohem"``, by ``logits``, ties arbitrary) or random ones
    (``"random"``, ``generator``); the other negatives become -1. ``unit="anchor"``: P = positive
    anchors, a unit is a background anchor, its hardness its highest score (as SSD);
    ``"entry"``: P = positive entries, a unit one entry."""
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
