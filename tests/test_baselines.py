"""Table 13 baselines: GHM-C and DR-loss against hand-computed values and naive loops written
from the papers' equations and from the authors' released code (read, not copied):
GHM-C: libuyu/GHM_Detection mmdetection/mmdet/core/loss/ghm_loss.py (GHMC_Loss.calc; the same in
open-mmlab/mmdetection mmdet/models/losses/ghm_loss.py) and experiments/cfg_retinanet_ghm_r50_fpn_1x.py
(bins=30, momentum=0.75); DR-loss: idstcv/DR_loss sigmoid_dr_loss.py (SigmoidDRLoss).
Empty inputs; a RetinaNet training step with each."""
import math

import pytest
import torch

from ap_loss_d2.losses.registry import cls_loss_names
from ap_loss_d2.losses.baselines import DR_DEFAULTS, GHM_BINS, GHM_MOMENTUM, dr_loss, ghm_c_loss


def _bce(x, t):
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _entries(logits, labels, k):
    """(score, target) of every non-ignored anchor x class, in a plain python list."""
    out = []
    for x_row, lab in zip(logits.reshape(-1, k).tolist(), labels.reshape(-1).tolist()):
        if lab < 0:
            continue
        for c in range(k):
            out.append((x_row[c], 1.0 if c == lab else 0.0))
    return out


def naive_ghm(entries, bins, counts_override=None, norm=None):
    """Sum_i CE_i / (norm * R_ind(g_i)), bins found by a python loop over edges j/M; norm = M (the
    paper's Eq. 4-8) unless given (the released code: the number of non-empty regions)."""
    gs = [abs(1 / (1 + math.exp(-x)) - t) for x, t in entries]
    region = []
    for g in gs:
        j = 0
        while j < bins - 1 and not (j / bins <= g < (j + 1) / bins):
            j += 1
        region.append(j)
    counts = counts_override or [region.count(j) for j in range(bins)]
    norm = bins if norm is None else norm
    return sum(_bce(x, t) / (norm * counts[j]) for (x, t), j in zip(entries, region)), [region.count(j) for j in range(bins)]


def test_registered_for_retinanet():
    assert {"ghm", "dr"} <= set(cls_loss_names("retinanet"))
    assert "ghm" not in cls_loss_names("roi_heads")


def test_ghm_defaults_are_the_released_config():
    # libuyu/GHM_Detection experiments/cfg_retinanet_ghm_r50_fpn_1x.py: GHMC bins=30, momentum=0.75
    assert (GHM_BINS, GHM_MOMENTUM) == (30, 0.75)
    with pytest.raises(ValueError, match="variant"):
        ghm_c_loss(torch.zeros(1, 2, 2), torch.tensor([[1, 2]]), 2, variant="mmdet")


def test_ghm_hand_computed():
    # one image, 2 anchors, K = 2: anchor 0 class 1, anchor 1 background; 2 bins.
    # entries (x, t): (0, 0), (0, 1), (0, 0), (0, 0): all g = 0.5 -> region 1, R = [0, 4]
    # paper (Li et al. Eq. 4-8, GD = M * R): loss = 4 * ln2 / (2 * 4) = ln2 / 2
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    labels = torch.tensor([[1, 2]])
    loss = ghm_c_loss(logits, labels, 2, bins=2, momentum=0, variant="paper")
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    loss.backward()
    # d/dx of CE/(M R) = (p - t) / 8
    assert logits.grad.flatten().tolist() == pytest.approx([0.5 / 8, -0.5 / 8, 0.5 / 8, 0.5 / 8])
    # released GHMC_Loss.calc: weight = tot / num_in_bin / n with n = 1 non-empty region, then
    # sum(weight * CE) / tot: 4 * ln2 / (1 * 4) = ln2, gradient (p - t) / 4
    logits.grad = None
    loss = ghm_c_loss(logits, labels, 2, bins=2, momentum=0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    assert logits.grad.flatten().tolist() == pytest.approx([0.5 / 4, -0.5 / 4, 0.5 / 4, 0.5 / 4])
    # two non-empty regions: x = (0, 0 | ln 9, 0) with K = 2, anchor 0 background, anchor 1 class 0:
    # g = 0.5, 0.5, 1 - 0.9 = 0.1, 0.5 -> R = [1, 3], n = 2:
    # released = CE(ln9, 1) / (2 * 1) + 3 ln2 / (2 * 3) = ln(10/9) / 2 + ln2 / 2
    x = torch.tensor([[[0.0, 0.0], [math.log(9), 0.0]]])
    got = ghm_c_loss(x, torch.tensor([[2, 0]]), 2, bins=2, momentum=0).item()
    assert got == pytest.approx(math.log(10 / 9) / 2 + math.log(2) / 2, rel=1e-6)


def test_ghm_against_naive_and_ignored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, generator=g) * 3
    labels = torch.tensor([[0, 3, 3, -1, 2, 3, 1], [3, 3, -1, 3, 0, 3, 3]])
    for bins in (1, 5, 30):
        expected, _ = naive_ghm(_entries(logits, labels, 3), bins)
        assert ghm_c_loss(logits, labels, 3, bins=bins, momentum=0, variant="paper").item() == pytest.approx(expected, rel=1e-5)
        _, r = naive_ghm(_entries(logits, labels, 3), bins)
        expected, _ = naive_ghm(_entries(logits, labels, 3), bins, norm=sum(c > 0 for c in r))
        assert ghm_c_loss(logits, labels, 3, bins=bins, momentum=0).item() == pytest.approx(expected, rel=1e-5)


def test_ghm_momentum_ema_across_calls():
    # the paper's EMA (Eq. 8) over every region, started from the first counts
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[0, 3, 3, 2, 3, 1]])
    x1, x2 = torch.randn(1, 6, 3, generator=g), torch.randn(1, 6, 3, generator=g) * 2
    state = {}
    first = ghm_c_loss(x1, labels, 3, bins=4, momentum=0.75, variant="paper", state=state)
    _, r1 = naive_ghm(_entries(x1, labels, 3), 4)
    assert first.item() == pytest.approx(naive_ghm(_entries(x1, labels, 3), 4)[0], rel=1e-6)  # S = R at start
    second = ghm_c_loss(x2, labels, 3, bins=4, momentum=0.75, variant="paper", state=state)
    _, r2 = naive_ghm(_entries(x2, labels, 3), 4)
    ema = [0.75 * a + 0.25 * b for a, b in zip(r1, r2)]
    assert state["ghm_acc"].tolist() == pytest.approx(ema)
    assert second.item() == pytest.approx(naive_ghm(_entries(x2, labels, 3), 4, counts_override=ema)[0], rel=1e-6)


def test_ghm_released_ema_across_calls():
    # released GHMC_Loss: acc_sum starts at 0; acc_sum[i] = mmt * acc_sum[i] + (1 - mmt) * num_in_bin
    # only for non-empty regions; weight = tot / acc_sum[i] / n (n: non-empty regions of this call)
    labels = torch.tensor([[1, 2]])  # K = 2: entries (x0, 0), (x1, 1), (x2, 0), (x3, 0)
    x1 = torch.zeros(1, 2, 2)  # every g = 0.5 -> region 1 of 2: R = [0, 4]
    state = {}
    first = ghm_c_loss(x1, labels, 2, bins=2, momentum=0.75, state=state)
    assert state["ghm_acc"].tolist() == pytest.approx([0.0, 1.0])  # 0.25 * 4
    assert first.item() == pytest.approx(4 * math.log(2) / (1 * 1.0), rel=1e-6)
    # second call: x = (-ln 9, ln 9, 0, 0): g = 0.1, 0.1, 0.5, 0.5 -> R = [2, 2], n = 2
    x2 = torch.tensor([[[-math.log(9), math.log(9)], [0.0, 0.0]]])
    second = ghm_c_loss(x2, labels, 2, bins=2, momentum=0.75, state=state)
    acc = [0.25 * 2, 0.75 * 1.0 + 0.25 * 2]  # [0.5, 1.25]
    assert state["ghm_acc"].tolist() == pytest.approx(acc)
    expected = 2 * math.log(10 / 9) / (2 * acc[0]) + 2 * math.log(2) / (2 * acc[1])
    assert second.item() == pytest.approx(expected, rel=1e-6)
    # third call back to R = [0, 4]: region 0 is empty and keeps its value (not decayed)
    ghm_c_loss(x1, labels, 2, bins=2, momentum=0.75, state=state)
    assert state["ghm_acc"].tolist() == pytest.approx([0.5, 0.75 * 1.25 + 0.25 * 4])


def naive_dr(entries_per_image, p=DR_DEFAULTS):
    """Mean over images of tau / L * log(1 + exp(L * (P- - P+ + margin))), P- / P+ the
    expectations under softmax(p / lambda-) / softmax(-p / lambda+); an image without positives
    uses P+ = 1 (idstcv/DR_loss SigmoidDRLoss.forward, its ``neg_dist - 1. + self.margin``)."""
    total = 0.0
    for entries in entries_per_image:
        probs = [(1 / (1 + math.exp(-x)), t) for x, t in entries]
        neg = [q for q, t in probs if t == 0]
        pos = [q for q, t in probs if t == 1]
        if not neg:
            continue
        wn = [math.exp(q / p["neg_lambda"]) for q in neg]
        neg_dist = sum(w * q for w, q in zip(wn, neg)) / sum(wn)
        if pos:
            wp = [math.exp(-q / p["pos_lambda"]) for q in pos]
            pos_dist = sum(w * q for w, q in zip(wp, pos)) / sum(wp)
        else:
            pos_dist = 1.0
        total += p["tau"] / p["L"] * math.log(1 + math.exp(p["L"] * (neg_dist - pos_dist + p["margin"])))
    return total / len(entries_per_image)


def test_dr_defaults_are_the_released_ones():
    # idstcv/DR_loss sigmoid_dr_loss.py: SigmoidDRLoss(pos_lambda=1, neg_lambda=0.1/math.log(3.5),
    # L=6., tau=4.), self.margin = 0.5
    assert DR_DEFAULTS == dict(pos_lambda=1.0, neg_lambda=0.1 / math.log(3.5), margin=0.5, L=6.0, tau=4.0)


def test_dr_hand_computed():
    # one image, one anchor of class 0, K = 2: positive entry x = 0 (p = .5), negative x = 0
    # (p = .5): P+ = P- = .5, z = margin = .5 -> tau / L * log(1 + e^3)
    logits = torch.zeros(1, 1, 2)
    loss = dr_loss(logits, torch.tensor([[0]]), 2)
    assert loss.item() == pytest.approx(4 / 6 * math.log(1 + math.exp(3)), rel=1e-6)
    # all equal negatives: the softmax is uniform whatever lambda
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    assert dr_loss(logits, torch.tensor([[1, 2]]), 2).item() == pytest.approx(4 / 6 * math.log(1 + math.exp(3)), rel=1e-6)
    # an image without positives (SigmoidDRLoss.forward: P+ = 1): every p = .5, z = .5 - 1 + .5 = 0
    # -> tau / L * log 2
    assert dr_loss(logits, torch.tensor([[2, 2]]), 2).item() == pytest.approx(4 / 6 * math.log(2), rel=1e-6)
    # unequal negatives: anchor 0 of class 0, anchor 1 background, x = (ln 3, 0 | ln 3, 0): the
    # positive has p = .75 (P+ = .75), the negatives p = .5, .75, .5; lambda- = 0.1 / ln 3.5, so
    # softmax(p / lambda-) weighs them 3.5^5 : 3.5^7.5 : 3.5^5
    w = 3.5 ** 2.5
    p_neg = (2 * 0.5 + 0.75 * w) / (2 + w)
    x = torch.tensor([[[math.log(3), 0.0], [math.log(3), 0.0]]])
    expected = 4 / 6 * math.log(1 + math.exp(6 * (p_neg - 0.75 + 0.5)))
    assert dr_loss(x, torch.tensor([[0, 2]]), 2).item() == pytest.approx(expected, rel=1e-6)


def test_dr_against_naive():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 3, generator=g) * 2
    labels = torch.tensor([[0, 3, 3, -1, 2, 3], [3, 3, 3, 3, 3, 3], [1, 1, -1, 3, 0, 3]])  # image 2: no positive
    per_image = [_entries(logits[i], labels[i], 3) for i in range(3)]
    assert dr_loss(logits, labels, 3).item() == pytest.approx(naive_dr(per_image), rel=1e-5)


@pytest.mark.parametrize("fn", [ghm_c_loss, dr_loss])
def test_empty_inputs(fn):
    for shape in ((0, 5, 3), (2, 0, 3)):
        x = torch.randn(*shape, requires_grad=True)
        loss = fn(x, torch.zeros(shape[:2], dtype=torch.long), 3)
        assert loss.item() == 0 and loss.requires_grad
        loss.backward()
    x = torch.randn(1, 4, 3, requires_grad=True)
    loss = fn(x, torch.full((1, 4), -1), 3)  # everything ignored
    assert loss.item() == 0
    loss.backward()
    with pytest.raises(ValueError, match="gt_labels"):
        fn(x, torch.zeros(1, 5, dtype=torch.long), 3)


@pytest.mark.parametrize("loss", ["ghm", "dr"])
def test_retinanet_step(loss):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from . import test_retinanet as retina

    torch.manual_seed(0)
    model = build_model(retina.tiny_cfg(loss))
    losses, storage = retina.train_step(model, retina.make_batch())
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert storage.latest()["cls_loss/num_pos"][0] > 0
    assert model.head.cls_score.weight.grad.abs().sum() > 0
    if loss == "ghm":  # the EMA persists in the model between iterations, in its state_dict
        first = model.state_dict()["cls_loss.ghm_acc"].clone()
        assert first.shape == (30,) and first.sum() > 0 and model.state_dict()["cls_loss.ghm_started"]
        retina.train_step(model, retina.make_batch(seed=1))
        assert not torch.equal(first, model.state_dict()["cls_loss.ghm_acc"])
