"""The alternative AP-loss optimisers of Fig. 8 (ap_loss_d2.losses.alternatives).

* approximate gradient: the smoothed AP equals a naive double loop of Eq. 32 (value and
  autograd gradient), chunking changes nothing, ``-log(AP + eps)``, empty inputs;
* structured hinge: the loss-augmented maximum equals brute force over *all* rankings of tiny
  inputs, the divide-and-conquer argmax equals a dense O(|P||N|) scan, the gradient equals
  finite differences where the maximiser is unique, the bound ``loss >= 1 - AP`` holds.
"""
import functools
import itertools
import math

import pytest
import torch

from ap_loss_d2.losses import ap_loss
from ap_loss_d2.losses.alternatives import (
    ap_loss_approx_gradient,
    ap_loss_structured_hinge,
    hinge_most_violating_interleaving,
    smoothed_ap,
)


def _random_case(seed, n=40, p_pos=0.2, p_ign=0.1, shape=None, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g, dtype=torch.float64) * 2
    if ties:
        s = s.round()
    u = torch.rand(n, generator=g)
    t = torch.zeros(n, dtype=torch.int64)
    t[u < p_pos] = 1
    t[(u >= p_pos) & (u < p_pos + p_ign)] = -1
    t[0], t[1] = 1, 0  # at least one of each
    if shape is not None:
        s, t = s.reshape(shape), t.reshape(shape)
    return s, t


# ------------------------------------------------------------------------------------------------
# Approximate gradient
# ------------------------------------------------------------------------------------------------


def _naive_smoothed_ap(s, t, k):
    s, t = s.reshape(-1), t.reshape(-1).tolist()
    P = [i for i, v in enumerate(t) if v == 1]
    V = [i for i, v in enumerate(t) if v in (0, 1)]

    def S(x):
        return torch.sigmoid(x / k)

    precisions = []
    for i in P:
        num = 1 + sum(S(s[q] - s[i]) for q in P if q != i)
        den = 1 + sum(S(s[u] - s[i]) for u in V if u != i)
        precisions.append(num / den)
    return torch.stack(precisions).mean()


@pytest.mark.parametrize("k", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothed_ap_matches_eq32(k, seed):
    s, t = _random_case(seed, shape=(2, 5, 4))
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    ours = smoothed_ap(a, t, sigmoid_k=k)
    ref = _naive_smoothed_ap(b, t, k)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    assert torch.all(a.grad[t == -1] == 0)


def test_smoothed_ap_chunks_change_nothing():
    s, t = _random_case(3, n=300, p_pos=0.3)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    whole = smoothed_ap(a, t)
    # one positive per chunk (a chunk of rows=1 needs 3 * 8 * |V| bytes)
    chunked = smoothed_ap(b, t, chunk_bytes=1)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-13)
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-16)


def test_approx_gradient_objective_and_gradient():
    s, t = _random_case(4, shape=(4, 10))
    x = s.clone().requires_grad_(True)
    stats = {}
    loss = ap_loss_approx_gradient(x, t, sigmoid_k=0.5, eps=1e-6, stats=stats)
    assert stats == {"num_pos": int((t == 1).sum()), "num_neg": int((t == 0).sum())}
    ap = _naive_smoothed_ap(s, t, 0.5)
    assert loss.item() == pytest.approx(-math.log(ap.item() + 1e-6), rel=1e-12)
    loss.backward()
    # descent direction: positives pushed up, negatives down
    assert torch.all(x.grad[t == 1] < 0) and torch.all(x.grad[t == 0] > 0)
    # float32 input: float32 result close to float64
    y = s.float().requires_grad_(True)
    loss32 = ap_loss_approx_gradient(y, t, sigmoid_k=0.5)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(loss.item(), rel=1e-5)


def test_approx_gradient_empty_inputs():
    x = torch.randn(2, 6, 3, requires_grad=True)
    t = torch.zeros(2, 6, 3, dtype=torch.int8)
    loss = ap_loss_approx_gradient(x, t)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(x.grad == 0)
    e = torch.zeros(0, requires_grad=True)
    assert ap_loss_approx_gradient(e, torch.zeros(0)).item() == 0.0
    # positives only: AP = 1, loss ~ -log(1 + eps)
    assert ap_loss_approx_gradient(torch.randn(5), torch.ones(5)).item() == pytest.approx(
        0.0, abs=1e-5
    )


def test_bad_inputs():
    with pytest.raises(ValueError):
        ap_loss_approx_gradient(torch.randn(3), torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError):
        ap_loss_structured_hinge(torch.randn(3), torch.ones(4))
    with pytest.raises(ValueError):
        smoothed_ap(torch.randn(3), torch.ones(3), sigmoid_k=0.0)


# ------------------------------------------------------------------------------------------------
# Structured hinge
# ------------------------------------------------------------------------------------------------


def _brute_force_hinge(s, t):
    """max over all rankings (permutations) of Delta_AP + F(R) - F(R*), and the number of
    maximising pairwise patterns R (to know whether the subgradient is unique)."""
    s, t = s.reshape(-1).tolist(), t.reshape(-1).tolist()
    P = [i for i, v in enumerate(t) if v == 1]
    N = [i for i, v in enumerate(t) if v == 0]
    m, K = len(P), len(N)
    values = {}
    for perm in itertools.permutations(P + N):
        rank = {e: r for r, e in enumerate(perm)}
        hits, ap = 0, 0.0
        for r, e in enumerate(perm):
            if t[e] == 1:
                hits += 1
                ap += hits / (r + 1)
        ap /= m
        pattern = tuple(rank[i] < rank[j] for i in P for j in N)
        f = sum(
            (1 if above else -1) * (s[i] - s[j])
            for (i, j), above in zip(itertools.product(P, N), pattern)
        )
        f_star = sum(s[i] - s[j] for i in P for j in N)
        values[pattern] = max(values.get(pattern, -math.inf), 1 - ap + (f - f_star) / (m * K))
    best = max(values.values())
    second = max([v for v in values.values() if v < best - 1e-12], default=-math.inf)
    return best, second


NUM_CASES_3_3 = 32


@functools.lru_cache(maxsize=None)
def _case_3_3(seed):
    """3 positives and 3 negatives at several score scales, with the brute-force maximum."""
    g = torch.Generator().manual_seed(seed)
    scale = [0.05, 0.5, 3.0, 20.0][seed % 4]
    s = torch.randn(6, generator=g, dtype=torch.float64) * scale
    t = torch.tensor([1, 1, 1, 0, 0, 0])[torch.randperm(6, generator=g)]
    return s, t, _brute_force_hinge(s, t)


@pytest.mark.parametrize("case", range(NUM_CASES_3_3))
def test_hinge_equals_brute_force_over_all_rankings(case):
    s, t, (best, _) = _case_3_3(case)
    loss = ap_loss_structured_hinge(s, t)
    assert loss.item() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize(
    "labels", [(1, 1, 0, 0, 0, 0, -1), (1, 1, 1, 1, 0, 0, -1), (1, 0, 0, 0, 0, -1, -1)]
)
@pytest.mark.parametrize("seed", range(5))
def test_hinge_brute_force_other_sizes_and_ignored(labels, seed):
    g = torch.Generator().manual_seed(100 + seed)
    t = torch.tensor(labels)[torch.randperm(len(labels), generator=g)]
    s = torch.randn(len(labels), generator=g, dtype=torch.float64)
    if seed == 4:
        s = s.round()  # ties between positives and negatives
    best, _ = _brute_force_hinge(s, t)
    assert ap_loss_structured_hinge(s, t).item() == pytest.approx(best, abs=1e-12)


def test_hinge_gradient_matches_finite_differences():
    checked = 0
    for case in range(NUM_CASES_3_3):
        s, t, (best, second) = _case_3_3(case)
        h = 1e-6
        # the maximiser stays the same within +-h when the gap exceeds what h can change
        if best - second < 1e-3:
            continue
        x = s.clone().requires_grad_(True)
        ap_loss_structured_hinge(x, t).backward()
        fd = torch.zeros_like(s)
        for e in range(s.numel()):
            d = torch.zeros_like(s)
            d[e] = h
            fd[e] = (ap_loss_structured_hinge(s + d, t) - ap_loss_structured_hinge(s - d, t)) / (
                2 * h
            )
        torch.testing.assert_close(x.grad, fd, rtol=1e-6, atol=1e-8)
        checked += 1
    assert checked >= 16


def _dense_argmax(p, n):
    """Yue et al.'s O(|P||N|) scan: for each negative j, the largest q maximising G_j(q)."""
    m, K = p.numel(), n.numel()
    i = torch.arange(1, m + 1, dtype=torch.float64)[None, :]
    j = torch.arange(1, K + 1, dtype=torch.float64)[:, None]
    delta = (i / (i + j - 1) - i / (i + j)) / m - 2.0 / (m * K) * (p[None, :] - n[:, None])
    # G_j(q) = sum_{i > q} delta_ij for q = 0..m
    g = torch.cat([delta.flip(1).cumsum(1).flip(1), torch.zeros(K, 1, dtype=torch.float64)], 1)
    best = g.max(1, keepdim=True).values
    q = torch.arange(m + 1)[None, :].expand(K, -1)
    close = g >= best - 1e-12 * (1 + best.abs())
    return torch.where(close, q, torch.full_like(q, -1)).max(1).values, g


@pytest.mark.parametrize("seed", range(4))
def test_hinge_divide_and_conquer_equals_dense_scan(seed):
    g = torch.Generator().manual_seed(seed)
    m, K = [(30, 2000), (200, 500), (1, 300), (50, 1)][seed]
    p = torch.sort(torch.randn(m, generator=g, dtype=torch.float64) * 3, descending=True).values
    n = torch.sort(torch.randn(K, generator=g, dtype=torch.float64) * 3 - 1, descending=True).values
    q = hinge_most_violating_interleaving(p, n)
    assert torch.all(q[1:] >= q[:-1])
    q_ref, table = _dense_argmax(p, n)
    rows = torch.arange(K)
    # same objective value (exact ties may pick another position of equal value)
    torch.testing.assert_close(table[rows, q], table[rows, q_ref], rtol=0, atol=1e-12)


def test_hinge_bound_and_gradient_signs():
    for seed in range(5):
        s, t = _random_case(seed, n=500, shape=(5, 100), ties=seed == 0)
        x = s.clone().requires_grad_(True)
        stats = {}
        loss = ap_loss_structured_hinge(x, t, stats=stats)
        exact = ap_loss(s, t, step="heaviside", interpolate=False)
        assert loss.item() >= exact.item() - 1e-12
        assert stats["num_pos"] == int((t == 1).sum())
        loss.backward()
        assert torch.all(x.grad[t == 1] <= 0) and torch.all(x.grad[t == 0] >= 0)
        assert torch.all(x.grad[t == -1] == 0)


def test_hinge_empty_and_dtypes():
    x = torch.randn(3, 4, requires_grad=True)
    for t in (torch.zeros(3, 4), torch.ones(3, 4), -torch.ones(3, 4)):
        loss = ap_loss_structured_hinge(x, t)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(x.grad == 0)
    s, t = _random_case(7)
    ref = ap_loss_structured_hinge(s, t)
    y = s.float().requires_grad_(True)
    out = ap_loss_structured_hinge(y, t)
    assert out.dtype == torch.float32
    out.backward()
    assert y.grad.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
