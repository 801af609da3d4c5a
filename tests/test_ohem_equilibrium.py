"""Why OHEM + AP-loss ("ap_ohem", Table 8) keeps near-equal scores from scratch
(docs/table8.md): around equal scores the loss follows mean(positive scores) minus the mean of
the *kept* negatives. OHEM keeps the top-scored background anchors, so a score that follows a
feature raises the loss unless the positives beat the hardest background anchors on it.

One image, one class, 4 positive anchors and 200 background anchors with feature
``h = linspace(-1, 1, 200)``; scores ``s = -4.6 + eps * h``. All positives have the same score,
so every positive has ``a = 1 + 0.5 * 3 = 2.5`` and (linear step, delta 1, all differences
inside the step) ``b = sum_j (0.5 + eps * (h_j - h_pos) / 2)`` over the kept negatives ``j``;
value ``b / (a + b)``; error-driven update ``g_j = f_j / (a + b)`` per kept negative and
``-b / (a + b) / 4`` per positive (Eq. 14 with all positives alike)."""
import math

import pytest
import torch

EPS = 0.05
NUM_POS, NUM_BG, RATIO = 4, 200, 3.0


def _losses():
    pytest.importorskip("detectron2")
    from ap_loss_d2.losses.cls_losses import APLoss, APOHEMLoss

    return APLoss(), APOHEMLoss(neg_pos_ratio=RATIO)


def _oracle(h_pos, h_kept):
    """Closed-form value and update projected on ``h`` (sum_e g_e h_e) at ``eps = EPS``."""
    a = 1 + 0.5 * (NUM_POS - 1)
    f = [0.5 + EPS * (h - h_pos) / 2 for h in h_kept]
    b = sum(f)
    proj = sum(fj * h for fj, h in zip(f, h_kept)) / (a + b) - b / (a + b) * h_pos
    return b / (a + b), proj


def _run(loss, h_pos, eps):
    h = torch.cat([torch.full((NUM_POS,), h_pos), torch.linspace(-1, 1, NUM_BG)]).double()
    labels = torch.tensor([[0] * NUM_POS + [1] * NUM_BG])
    logits = (-4.6 + eps * h).reshape(1, -1, 1).requires_grad_(True)
    value = loss(logits, labels)
    value.backward()
    return value.item(), float((logits.grad.reshape(-1) * h).sum())


@pytest.mark.parametrize("h_pos", [0.5, 1.5])
def test_loss_and_update_along_a_feature(h_pos):
    ap, ohem = _losses()
    background = torch.linspace(-1, 1, NUM_BG).double().tolist()
    kept = sorted(background)[-math.ceil(RATIO * NUM_POS):]  # the 12 highest-scored anchors
    for loss, negatives in ((ohem, kept), (ap, background)):
        equal, _ = _oracle(h_pos, [h_pos] * len(negatives))  # eps = 0 in effect: f = 0.5
        value, _ = _run(loss, h_pos, 0.0)
        assert value == pytest.approx(equal, rel=1e-9)
        value, proj = _run(loss, h_pos, EPS)
        want_value, want_proj = _oracle(h_pos, negatives)
        assert value == pytest.approx(want_value, rel=1e-9)
        assert proj == pytest.approx(want_proj, rel=1e-9)


def test_weak_feature_is_learned_by_ap_but_not_by_ohem():
    """h_pos = 0.5 is above the background mean (0) but below the 12 kept anchors (h > 0.88):
    AP-loss lowers its loss by following h and its update grows eps; OHEM + AP-loss raises its
    loss and its update shrinks eps back to equal scores. With h_pos = 1.5 both follow h."""
    ap, ohem = _losses()
    for loss, h_pos, learns in ((ap, 0.5, True), (ohem, 0.5, False), (ohem, 1.5, True), (ap, 1.5, True)):
        flat, _ = _run(loss, h_pos, 0.0)
        value, proj = _run(loss, h_pos, EPS)
        assert (value < flat) == learns
        assert (proj < 0) == learns  # SGD moves eps by -lr * proj
