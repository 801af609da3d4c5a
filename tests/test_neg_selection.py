"""Table 8: OHEM / random negative selection before AP-loss ("ap_ohem", "ap_random") against a
naive per-image selection and the Algorithm 1 oracle on the kept entries. The unit is the
anchor (SSD-style, as ce_ohem): background anchors are kept or dropped with all their K entries;
``unit="entry"`` is the per-entry variant."""
import itertools
import math

import pytest
import torch

from ap_loss_d2.losses.neg_selection import select_negatives
from ap_loss_d2.losses.ranking_sets import ranking_targets

from .ap_oracle import ap_oracle


def _naive_ohem_anchors(targets, logits, ratio):
    """Per image: keep every positive anchor, and the ceil(ratio * max(#positive anchors, 1))
    background anchors of highest max score with all their entries; ignore the others."""
    out = targets.clone()
    for i in range(targets.shape[0]):
        t, x = out[i], logits[i].tolist()
        rows = t.tolist()
        pos = sum(1 for r in rows if 1 in r)
        bg = [a for a, r in enumerate(rows) if 1 not in r and 0 in r]
        keep = math.ceil(ratio * max(pos, 1))
        hard = sorted(bg, key=lambda a: -max(x[a][c] for c in range(len(rows[a])) if rows[a][c] == 0))
        for a in hard[keep:]:
            for c in range(len(rows[a])):
                if rows[a][c] == 0:
                    t[a, c] = -1
    return out


def _naive_ohem(targets, logits, ratio):
    """Per-entry variant (unit="entry")."""
    out = targets.clone()
    for i in range(targets.shape[0]):
        t, x = out[i].reshape(-1), logits[i].reshape(-1).tolist()
        pos = int((t == 1).sum())
        neg = [j for j in range(t.numel()) if int(t[j]) == 0]
        keep = math.ceil(ratio * max(pos, 1))
        for j in sorted(neg, key=lambda j: -x[j])[keep:]:
            t[j] = -1
    return out


def test_ohem_matches_naive_hand_case():
    # one image, 3 anchors, K = 2: anchor 0 class 0, anchors 1, 2 background.
    # negatives (entry: score): (0,1): 0.3, (1,0): 2.0, (1,1): -1.0, (2,0): 0.5, (2,1): 1.0
    # 1 positive, ratio 2 -> keep the 2 hardest: (1,0) and (2,1)
    logits = torch.tensor([[[5.0, 0.3], [2.0, -1.0], [0.5, 1.0]]])
    targets = ranking_targets(torch.tensor([[0, 2, 2]]), 2)
    out = select_negatives(targets, logits, "ohem", 2.0, unit="entry")
    assert out.tolist() == [[[1, -1], [0, -1], [-1, 0]]]
    assert select_negatives(targets, logits, "all") is targets
    # per anchor (default): the positive anchor keeps its negative entry (0,1); background anchors
    # by max score: anchor 1 (2.0), anchor 2 (1.0); ratio 2 keeps both, ratio 1 keeps anchor 1 only
    assert select_negatives(targets, logits, "ohem", 2.0).tolist() == [[[1, 0], [0, 0], [0, 0]]]
    assert select_negatives(targets, logits, "ohem", 1.0).tolist() == [[[1, 0], [0, 0], [-1, -1]]]
    with pytest.raises(ValueError, match="unit='rows'; valid values: anchor, entry"):
        select_negatives(targets, logits, "ohem", 1.0, unit="rows")


def test_ohem_and_random_per_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 4, generator=g)
    labels = torch.randint(0, 5, (3, 20), generator=g)
    labels[1] = 4  # no positives: keeps ceil(ratio) negatives
    labels[2, :3] = -1
    targets = ranking_targets(labels, 4)
    for ratio in (0.5, 1.0, 3.0):
        entry = select_negatives(targets, logits, "ohem", ratio, unit="entry")
        assert torch.equal(entry, _naive_ohem(targets, logits, ratio))
        assert torch.equal(select_negatives(targets, logits, "ohem", ratio), _naive_ohem_anchors(targets, logits, ratio))
        out = select_negatives(targets, logits, "random", ratio, generator=torch.Generator().manual_seed(1), unit="entry")
        anchors = select_negatives(targets, logits, "random", ratio, generator=torch.Generator().manual_seed(1))
        for i in range(3):
            pos = int((targets[i] == 1).sum())
            n_neg = int((targets[i] == 0).sum())
            assert int((out[i] == 0).sum()) == min(n_neg, math.ceil(ratio * max(pos, 1)))
            assert torch.equal(out[i] == 1, targets[i] == 1)  # positives untouched
            assert torch.equal(out[i][targets[i] == -1], targets[i][targets[i] == -1])
            bg = (labels[i] == 4).sum().item()
            kept_bg = ((anchors[i] == 0).all(dim=1) & (labels[i] == 4)).sum().item()
            assert kept_bg == min(bg, math.ceil(ratio * max(pos, 1)))
            # a background anchor is kept or dropped whole; positive anchors keep every entry
            assert bool(((anchors[i] == 0).all(dim=1) | (anchors[i] == -1).all(dim=1) | (labels[i] < 4)).all())
            assert torch.equal(anchors[i][labels[i] < 4], targets[i][labels[i] < 4])
    # the 2-D layout of a two-stage head gives the same selection
    flat = select_negatives(targets.reshape(60, 4), logits.reshape(60, 4), "ohem", 1.0, entries_per_image=[20, 20, 20], unit="entry")
    assert torch.equal(flat.reshape(3, 20, 4), _naive_ohem(targets, logits, 1.0))
    flat = select_negatives(targets.reshape(60, 4), logits.reshape(60, 4), "ohem", 1.0, entries_per_image=[20, 20, 20])
    assert torch.equal(flat.reshape(3, 20, 4), _naive_ohem_anchors(targets, logits, 1.0))


def test_bad_selection_values():
    t = torch.zeros(1, 2, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="neg_selection='hard'; valid values: all, ohem, random"):
        select_negatives(t, torch.zeros(1, 2, 2), "hard")
    with pytest.raises(ValueError, match="neg_pos_ratio=0"):
        select_negatives(t, torch.zeros(1, 2, 2), "ohem", 0)


def test_ap_ohem_is_ap_loss_on_the_kept_entries():
    """"ap_ohem" equals the Algorithm 1 oracle on the same scores with the unselected negatives
    ignored (value and gradient)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 30, 3, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 30), generator=g)
    labels[:, 10:] = 3  # mostly background, so that anchor-level OHEM drops some anchors
    APLoss, APOHEMLoss, APRandomLoss = _classes()
    loss = APOHEMLoss(neg_pos_ratio=1.0)(logits, labels)
    kept = _naive_ohem_anchors(ranking_targets(labels, 3), logits.detach(), 1.0)
    value, grad = ap_oracle(logits.detach().double().numpy(), kept.numpy(), delta=1.0, interpolate=True)
    assert loss.item() == pytest.approx(value, rel=1e-5)
    loss.backward()
    assert logits.grad.double().numpy() == pytest.approx(grad, abs=1e-6)
    full = APLoss()(logits, labels)
    assert full.item() != pytest.approx(loss.item())
    # random selection: reproducible under the global seed, and an AP-loss of a subset
    torch.manual_seed(7)
    a = APRandomLoss(neg_pos_ratio=1.0)(logits, labels)
    torch.manual_seed(7)
    b = APRandomLoss(neg_pos_ratio=1.0)(logits, labels)
    assert a.item() == b.item() and 0 <= a.item() <= 1


def _classes():
    pytest.importorskip("detectron2")
    from ap_loss_d2.losses.cls_losses import APLoss, APOHEMLoss, APRandomLoss

    return APLoss, APOHEMLoss, APRandomLoss


def test_ap_ohem_hand_selected_subset():
    """The kept set written out by hand; value and gradient of "ap_ohem" against Algorithm 1."""
    # image 0, K = 2: anchor 0 class 0 (scores 1.0, 0.2); background anchors 1..4 with max scores
    # 1.5, 0.9, 0.0, 2.0. 1 positive anchor, ratio 2 -> keep anchors 4 and 1, all their entries,
    # and the positive anchor's negative entry 0.2.
    # image 1: no positive -> keeps ceil(2 * 1) = 2 background anchors: 0 (max 0.7), 2 (max 0.3).
    x = torch.tensor([[[1.0, 0.2], [0.5, 1.5], [0.9, -1.0], [-0.5, 0.0], [2.0, -2.0]],
                      [[0.7, -0.1], [-1.0, -2.0], [0.3, 0.1], [-0.2, 0.2], [-3.0, -3.0]]], requires_grad=True)
    labels = torch.tensor([[0, 2, 2, 2, 2], [2, 2, 2, 2, 2]])
    kept = torch.tensor([[[1, 0], [0, 0], [-1, -1], [-1, -1], [0, 0]],
                         [[0, 0], [-1, -1], [0, 0], [-1, -1], [-1, -1]]])
    loss = _classes()[1](neg_pos_ratio=2.0)(x, labels)
    value, grad = ap_oracle(x.detach().double().numpy(), kept.numpy(), delta=1.0, interpolate=True)
    assert loss.item() == pytest.approx(value, rel=1e-6)
    loss.backward()
    assert x.grad.double().numpy() == pytest.approx(grad, abs=1e-7)
    # the per-entry selection keeps only the entries 2.0 and 1.5 of image 0: entry 0.5 of anchor 1
    # (non-trivial, above min_P s - delta = 0) and 0.2 drop out, so its value is smaller
    entry = torch.tensor([[[1, -1], [-1, 0], [-1, -1], [-1, -1], [0, -1]],
                          [[0, -1], [-1, -1], [0, -1], [-1, -1], [-1, -1]]])
    assert ap_oracle(x.detach().double().numpy(), entry.numpy())[0] < value - 0.02


def test_ap_random_is_ap_loss_of_a_random_anchor_subset():
    """Every "ap_random" draw equals Algorithm 1 on one of the possible kept sets (enumerated by
    hand: the positive anchor + 2 of the 4 background anchors), and different seeds draw
    different sets."""
    # positive 1.0; each background anchor has one non-trivial entry, f = 0.8, 0.4, 0.2, 0.1
    # (linear step, delta 1), so the 6 pairs give 6 different values
    x = torch.tensor([[[1.0, 0.2], [1.6, -1.0], [-1.0, 0.8], [0.4, -1.0], [-1.0, 0.2]]], requires_grad=True)
    labels = torch.tensor([[0, 2, 2, 2, 2]])
    candidates = []
    for pair in itertools.combinations(range(1, 5), 2):
        t = torch.full((1, 5, 2), -1)
        t[0, 0] = torch.tensor([1, 0])
        for a in pair:
            t[0, a] = 0
        candidates.append(ap_oracle(x.detach().double().numpy(), t.numpy()))
    assert len({round(v, 9) for v, _ in candidates}) == 6  # the 6 subsets are distinguishable
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x.grad = None
        loss = _classes()[2](neg_pos_ratio=2.0)(x, labels)
        loss.backward()
        match = [i for i, (v, _) in enumerate(candidates) if abs(v - loss.item()) < 1e-6]
        assert len(match) == 1
        assert x.grad.double().numpy() == pytest.approx(candidates[match[0]][1], abs=1e-7)
        seen.add(match[0])
    assert len(seen) > 1


@pytest.mark.parametrize("loss", ["ap_ohem", "ap_random"])
def test_retinanet_step(loss):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from . import test_retinanet as retina

    torch.manual_seed(0)
    cfg = retina.tiny_cfg(loss)
    cfg.MODEL.CLS_LOSS.OHEM_NEG_POS_RATIO = 3.0
    model = build_model(cfg)
    losses, storage = retina.train_step(model, retina.make_batch())
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert model.head.cls_score.weight.grad.abs().sum() > 0
