"""Table 8: OHEM / random negative selection before AP-loss ("ap_ohem", "ap_random") against a
naive per-image selection and the Algorithm 1 oracle on the kept entries."""
import math

import pytest
import torch

from ap_loss_d2.losses import CLS_LOSSES, cls_loss_names
from ap_loss_d2.losses.neg_selection import select_negatives
from ap_loss_d2.losses.registry import compute_cls_loss, ranking_targets

from .ap_oracle import ap_oracle


def _naive_ohem(targets, logits, ratio):
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
    out = select_negatives(targets, logits, "ohem", 2.0)
    assert out.tolist() == [[[1, -1], [0, -1], [-1, 0]]]
    assert select_negatives(targets, logits, "all") is targets


def test_ohem_and_random_per_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 4, generator=g)
    labels = torch.randint(0, 5, (3, 20), generator=g)
    labels[1] = 4  # no positives: keeps ceil(ratio) negatives
    labels[2, :3] = -1
    targets = ranking_targets(labels, 4)
    for ratio in (0.5, 1.0, 3.0):
        assert torch.equal(select_negatives(targets, logits, "ohem", ratio), _naive_ohem(targets, logits, ratio))
        out = select_negatives(targets, logits, "random", ratio, generator=torch.Generator().manual_seed(1))
        for i in range(3):
            pos = int((targets[i] == 1).sum())
            n_neg = int((targets[i] == 0).sum())
            assert int((out[i] == 0).sum()) == min(n_neg, math.ceil(ratio * max(pos, 1)))
            assert torch.equal(out[i] == 1, targets[i] == 1)  # positives untouched
            assert torch.equal(out[i][targets[i] == -1], targets[i][targets[i] == -1])
    # the 2-D layout of a two-stage head gives the same selection
    flat = select_negatives(targets.reshape(60, 4), logits.reshape(60, 4), "ohem", 1.0, entries_per_image=[20, 20, 20])
    assert torch.equal(flat.reshape(3, 20, 4), _naive_ohem(targets, logits, 1.0))


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
    options = dict(delta=1.0, step="linear", sigmoid_k=0.5, interpolate=True, entries_per_image=None,
                   rank_across_processes=False, images_per_ranking_set=0, ohem_neg_pos_ratio=1.0)
    assert "ap_ohem" in cls_loss_names("retinanet") and "ap_random" in cls_loss_names("retinanet")
    loss = compute_cls_loss(CLS_LOSSES["ap_ohem"], logits, labels, 3, options, {})
    kept = _naive_ohem(ranking_targets(labels, 3), logits.detach(), 1.0)
    value, grad = ap_oracle(logits.detach().double().numpy(), kept.numpy(), delta=1.0, interpolate=True)
    assert loss.item() == pytest.approx(value, rel=1e-5)
    loss.backward()
    assert logits.grad.double().numpy() == pytest.approx(grad, abs=1e-6)
    full = compute_cls_loss(CLS_LOSSES["ap"], logits, labels, 3, options, {})
    assert full.item() != pytest.approx(loss.item())
    # random selection: reproducible under the global seed, and an AP-loss of a subset
    torch.manual_seed(7)
    a = compute_cls_loss(CLS_LOSSES["ap_random"], logits, labels, 3, options, {})
    torch.manual_seed(7)
    b = compute_cls_loss(CLS_LOSSES["ap_random"], logits, labels, 3, options, {})
    assert a.item() == b.item() and 0 <= a.item() <= 1


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
