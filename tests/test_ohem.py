"""ce_ohem_loss against a naive per-image implementation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ap_loss_d2.losses.ohem import ce_ohem_loss


def naive_ohem(cls_logits, gt_labels, neg_pos_ratio=3.0):
    """Per image, explicit: CE over [0, s_1..s_K], keep positives + hardest negatives."""
    n_img, n_anchor, n_cls = cls_logits.shape
    total = cls_logits.sum() * 0.0  # attached to the graph when nothing is kept
    total_pos = 0
    kept = torch.zeros(n_img, n_anchor, dtype=torch.bool)
    for n in range(n_img):
        full = torch.cat([cls_logits.new_zeros(n_anchor, 1), cls_logits[n]], dim=1)
        labels = gt_labels[n]
        target = torch.where(labels == n_cls, torch.zeros_like(labels), labels + 1)
        ce = F.cross_entropy(full, target.clamp(min=0), reduction="none")
        pos_ids = [a for a in range(n_anchor) if 0 <= int(labels[a]) < n_cls]
        neg_ids = [a for a in range(n_anchor) if int(labels[a]) == n_cls]
        n_keep = math.ceil(neg_pos_ratio * len(pos_ids))  # none without positives, as SSD
        neg_sorted = sorted(neg_ids, key=lambda a: -float(ce[a]))
        for a in pos_ids + neg_sorted[:n_keep]:
            total = total + ce[a]
            kept[n, a] = True
        total_pos += len(pos_ids)
    return total / max(total_pos, 1), kept


def _case(seed, n_img, n_anchor, n_cls, pos_frac=0.05, ign_frac=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_img, n_anchor, n_cls, generator=g, dtype=torch.float64) * 2)
    u = torch.rand(n_img, n_anchor, generator=g)
    labels = torch.full((n_img, n_anchor), n_cls, dtype=torch.long)
    fg = u < pos_frac
    labels[fg] = torch.randint(0, n_cls, (int(fg.sum()),), generator=g)
    labels[(u >= pos_frac) & (u < pos_frac + ign_frac)] = -1
    return logits.to(dtype), labels


@pytest.mark.parametrize("ratio", [3.0, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(1, 50, 3), (3, 80, 5), (2, 200, 1)])
def test_matches_naive(ratio, shape):
    logits, labels = _case(int(ratio * 10) + shape[1], *shape)
    labels[0, : shape[1] // 2][labels[0, : shape[1] // 2] >= 0] = shape[2]  # fewer positives
    if shape[0] > 1:
        labels[1][(labels[1] >= 0) & (labels[1] < shape[2])] = shape[2]  # image without positives
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    loss = ce_ohem_loss(x1, labels, neg_pos_ratio=ratio)
    ref, kept = naive_ohem(x2, labels, ratio)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    # gradient only on kept anchors (every class of a kept anchor gets some gradient)
    row_has_grad = x1.grad.abs().sum(-1) > 0
    assert torch.equal(row_has_grad, kept)
    assert not x1.grad[labels == -1].any()


def test_kept_counts():
    n_cls = 4
    logits, labels = _case(1, 3, 300, n_cls, pos_frac=0.0, ign_frac=0.0)
    labels[0, :5] = 2  # 5 positives -> 15 hardest negatives
    labels[2, :100] = 1  # 100 positives, only 200 negatives -> all 200 kept
    x = logits.clone().requires_grad_(True)
    ce_ohem_loss(x, labels, neg_pos_ratio=3.0).backward()
    kept = x.grad.abs().sum(-1) > 0
    assert kept[0].sum() == 5 + 15
    assert kept[1].sum() == 0  # no positives: no negatives (Caffe SSD, mmdetection)
    assert kept[2].sum() == 300
    # the kept negatives of image 0 are the hardest ones
    with torch.no_grad():
        lse = torch.logaddexp(torch.logsumexp(logits[0], -1), torch.zeros(()))
    neg_loss = lse[5:]
    thresh = neg_loss.sort(descending=True).values[14]
    assert (neg_loss[kept[0, 5:]] >= thresh).all()
    assert (neg_loss[~kept[0, 5:]] < thresh).all()


def test_image_without_positives_keeps_no_negatives():
    """SSD's mining (Caffe SSD ``MineHardExamples``: ``min(int(num_pos * neg_pos_ratio), num_neg)``
    per image; mmdetection ``SSDHead``: ``topk(neg_pos_ratio * num_pos)``), written out by hand."""
    logits = torch.tensor([[[2.0], [1.0], [-1.0], [0.5]], [[3.0], [2.0], [1.0], [0.0]]], requires_grad=True)
    labels = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # image 1: one positive; image 2: none
    loss = ce_ohem_loss(logits, labels, neg_pos_ratio=1.0)
    # image 1: positive CE log(1 + e^2) - 2, and its hardest negative (score 1.0: log(1 + e)); image 2: nothing
    assert float(loss) == pytest.approx(math.log(1 + math.exp(2.0)) - 2.0 + math.log(1 + math.e), rel=1e-6)
    loss.backward()
    assert logits.grad[0, :2].ne(0).all() and not logits.grad[0, 2:].any() and not logits.grad[1].any()
    # a batch without any positive: zero loss, no gradient
    x = torch.randn(2, 6, 3, requires_grad=True)
    loss = ce_ohem_loss(x, torch.full((2, 6), 3))
    loss.backward()
    assert float(loss) == 0.0 and not x.grad.any()


def test_value_normalised_by_total_positives():
    logits = torch.tensor([[[1.0, -1.0], [0.5, 0.0]]], requires_grad=True)  # (1, 2, 2)
    labels = torch.tensor([[0, 2]])  # anchor 0 class 0, anchor 1 background
    loss = ce_ohem_loss(logits, labels)
    lse0 = math.log(1 + math.exp(1.0) + math.exp(-1.0))
    lse1 = math.log(1 + math.exp(0.5) + 1)
    assert float(loss) == pytest.approx((lse0 - 1.0) + lse1, rel=1e-6)


def test_empty_and_degenerate():
    for shape in [(0, 10, 3), (2, 0, 3)]:
        x = torch.randn(*shape, requires_grad=True)
        loss = ce_ohem_loss(x, torch.zeros(shape[:2], dtype=torch.long))
        assert float(loss) == 0.0 and loss.requires_grad
        loss.backward()
        assert x.grad is not None and not x.grad.any()
    # all ignored
    x = torch.randn(2, 5, 3, requires_grad=True)
    loss = ce_ohem_loss(x, torch.full((2, 5), -1))
    loss.backward()
    assert float(loss) == 0.0 and not x.grad.any()


def test_half_and_bad_input():
    logits, labels = _case(4, 2, 60, 3, dtype=torch.float32)
    x16 = logits.half().requires_grad_(True)
    loss16 = ce_ohem_loss(x16, labels)
    loss16.backward()
    assert x16.grad.dtype == torch.float16 and torch.isfinite(x16.grad).all()
    ref, _ = naive_ohem(logits.half().float(), labels)
    assert float(loss16) == pytest.approx(float(ref), rel=2e-3)
    with pytest.raises(ValueError, match="shape"):
        ce_ohem_loss(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="7"):
        ce_ohem_loss(torch.randn(2, 5, 3), torch.full((2, 5), 7))
    with pytest.raises(ValueError):
        ce_ohem_loss(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


def test_grad_flows_to_all_classes_of_kept_anchor_only():
    logits, labels = _case(9, 1, 400, 6, pos_frac=0.02, ign_frac=0.2)
    x = logits.clone().requires_grad_(True)
    ce_ohem_loss(x, labels).backward()
    kept = x.grad.abs().sum(-1) > 0
    n_pos = int(((labels >= 0) & (labels < 6)).sum())
    assert n_pos > 0 and int(kept.sum()) == n_pos + 3 * n_pos
    assert (x.grad[kept] != 0).all()
    assert not x.grad[~kept].any()
    assert np.isfinite(x.grad.numpy()).all()
