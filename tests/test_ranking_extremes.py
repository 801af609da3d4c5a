"""Ranking losses on any finite logits (issue 10.4), the exact sigmoid step (issue 14.2) and the
autograd contract (issue 10.5), against the float64 oracle of tests/ap_oracle.py.

The oracle computes every step value from the float64 difference of two scores, exact for
float32 scores whenever the step is not saturated, so it is exact (to float64 rounding of the
sums) on these inputs. Float64 logits must match it to 1e-9 relative; float32 logits must equal
the float64 call on the same values up to float32 rounding of the returned value.
"""

import numpy as np
import pytest
import torch

from ap_loss_d2.losses import ap_loss, auc_loss
from tests.ap_oracle import ap_oracle, auc_oracle
from tests.kernels import kernel  # noqa: F401  (the fixture)
from tests.params import slow_except

F32_MAX = float(np.finfo(np.float32).max)


def _call(fn, s, t, dtype, **kw):
    x = torch.tensor(np.asarray(s, dtype=np.float64), dtype=dtype, requires_grad=True)
    loss = fn(x, torch.as_tensor(np.asarray(t)), **kw)
    loss.backward()
    return float(loss), x.grad.double().numpy()


_ORACLES = {"ap": ap_oracle, "auc": auc_oracle}
_oracle_cache = {}


def _oracle(kind, s, t, **kw):
    """The oracle's (loss, grad), computed once per case (each kernel checks against it)."""
    key = (kind, s.tobytes(), np.asarray(t).tobytes(), tuple(sorted(kw.items())))
    if key not in _oracle_cache:
        if len(_oracle_cache) >= 64:  # bounded: drop the oldest case
            del _oracle_cache[next(iter(_oracle_cache))]
        _oracle_cache[key] = _ORACLES[kind](s, t, **kw)
    return _oracle_cache[key]


def _against_oracle(s, t, kernel="auto", **kw):
    """float64 logits vs the oracle to 1e-9; float32 logits (when the values are float32) vs
    the float64 call up to float32 rounding; ``kernel``: the one to run."""
    s = np.asarray(s, dtype=np.float64)
    for kind, fn in (("ap", ap_loss), ("auc", auc_loss)):
        okw = dict(kw)
        if kind == "auc":
            okw.pop("interpolate", None)
        exp_loss, exp_grad = _oracle(kind, s, t, **okw)
        okw["kernel"] = kernel
        loss, grad = _call(fn, s, t, torch.float64, **okw)
        np.testing.assert_allclose(loss, exp_loss, rtol=1e-9, atol=1e-15, err_msg=f"{kind} {kw}")
        np.testing.assert_allclose(grad, exp_grad, rtol=1e-9, atol=1e-15,
                                   err_msg=f"{kind} grad {kw}")
        if np.array_equal(s.astype(np.float32).astype(np.float64), s):
            loss32, grad32 = _call(fn, s, t, torch.float32, **okw)
            np.testing.assert_allclose(loss32, exp_loss, rtol=2**-22, atol=1e-30)
            np.testing.assert_allclose(grad32, exp_grad, rtol=2**-21, atol=1e-44)
            assert np.array_equal(grad32 != 0, exp_grad != 0)


def test_issue_example_huge_negative_positive(kernel):
    # Algorithm 1: f(0 - (-1e30)) = 1, a = 1, b = 1: loss 0.5, gradients -0.5 / +0.5
    for dtype in (torch.float32, torch.float64):
        loss, grad = _call(ap_loss, [-1e30, 0.0], [1, 0], dtype, kernel=kernel)
        assert loss == 0.5
        np.testing.assert_array_equal(grad, [-0.5, 0.5])
    _against_oracle([-1e30, 0.0], [1, 0], kernel=kernel)


@pytest.mark.parametrize("delta", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("step", ["linear", "heaviside"])
def test_float32_extremes(delta, step, kernel):
    big = float(np.float32(3e38))
    s = [big, -big, 0.0, 1.0, big, -big, F32_MAX, -F32_MAX, 0.5, -1e30, 1e30, 1e-30, big]
    t = [1, 1, 0, 1, 0, 0, 0, 1, -1, 0, 1, 0, 0]
    _against_oracle(s, t, delta=delta, step=step, kernel=kernel)
    # ties at the extremes and windows of width 2 delta around huge scores
    s2 = [big, big, big, -big, -big, 0.0, 0.0]
    _against_oracle(s2, [1, 0, 1, 1, 0, 0, 1], delta=delta, step=step, kernel=kernel)
    _against_oracle(s2, [1, 0, 1, 1, 0, 0, 1], delta=delta, step=step, interpolate=False, kernel=kernel)


@pytest.mark.parametrize("delta", slow_except([1e-3, 1.0, 1e3], {1.0}))
def test_spread_1e12_many_negatives(delta, kernel):
    """1e5 negatives spread over 1e12, each positive with negatives inside its window: the sums
    must not cancel (the issue's 0.6666 instead of 0.7143)."""
    rng = np.random.default_rng(int(delta * 1000) % 97)
    n_neg, n_pos = 100_000, 6
    p = np.array([-4e11, -1e11, 0.0, 3e11, 5e11, 5e11 + delta / 2])
    neg = rng.uniform(-5e11, 5e11, n_neg)
    # 30 % of the negatives inside or near some window
    near = rng.random(n_neg) < 0.3
    neg[near] = p[rng.integers(0, n_pos, near.sum())] + rng.uniform(-2 * delta, 2 * delta,
                                                                     near.sum())
    s = np.concatenate([p, neg])
    t = np.concatenate([np.ones(n_pos, int), np.zeros(n_neg, int)])
    _against_oracle(s, t, delta=delta, kernel=kernel)
    # the same values rounded to float32 (windows collapse far from 0)
    _against_oracle(s.astype(np.float32).astype(np.float64), t, delta=delta, kernel=kernel)


def test_spread_1e12_value_from_issue(kernel):
    """A small case whose value is known in closed form: positives at 0 and 1e12 - 0.5, negatives
    at 1e12 and 1e12 + ... every negative inside the upper positive's window (delta = 1)."""
    s = np.array([0.0, 1e12 - 0.5] + [1e12 + 0.25] * 4)
    t = np.array([1, 1, 0, 0, 0, 0])
    # upper positive i: a = 1, b = 4 * f(0.75) = 4 * 0.875 = 3.5, prec = 1/4.5
    # lower positive: a = 1 + 1, b = 4, prec = 2/6; interpolated: max(2/6, 1/4.5) for the lower
    exp = 1 - (2 / 6 + 2 / 6) / 2
    loss, _ = _call(ap_loss, s, t, torch.float64, kernel=kernel)
    assert abs(loss - exp) < 1e-12
    _against_oracle(s, t, kernel=kernel)


def test_delta_range_random(kernel):
    rng = np.random.default_rng(5)
    for delta in (1e-3, 1e-1, 10.0, 1e3):
        s = rng.normal(0, 3 * delta, 400)
        t = np.zeros(400, int)
        t[rng.choice(400, 25, replace=False)] = 1
        t[rng.choice(400, 10, replace=False)] = -1
        _against_oracle(s, t, delta=delta, kernel=kernel)
        _against_oracle(s, t, delta=delta, step="heaviside", kernel=kernel)


# ---------------------------------------------------------------------------------------------
# Exact sigmoid step (Eq. 54): over all negatives
# ---------------------------------------------------------------------------------------------
def test_sigmoid_toy_k1_exact():
    # one positive at 0, negatives at -0.5 and -3 (below min_P s - delta = -1), k = 1: both count
    s, t = np.array([0.0, -0.5, -3.0]), np.array([1, 0, 0])
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    b_exact = sig(-0.5) + sig(-3.0)
    exp_exact = 1 - 1 / (1 + b_exact)  # a = 1 (no other positive)
    loss, _ = _call(ap_loss, s, t, torch.float64, step="sigmoid", sigmoid_k=1.0)
    assert abs(loss - exp_exact) < 1e-12
    _against_oracle(s, t, step="sigmoid", sigmoid_k=1.0)


def test_sigmoid_random_exact():
    rng = np.random.default_rng(9)
    s = rng.normal(0, 2, 300)
    t = np.zeros(300, int)
    t[rng.choice(300, 20, replace=False)] = 1
    _against_oracle(s, t, step="sigmoid", sigmoid_k=0.5)


# ---------------------------------------------------------------------------------------------
# Autograd contract
# ---------------------------------------------------------------------------------------------
def test_create_graph_raises():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(50, dtype=torch.long)
    t[:5] = 1
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ap_loss(x, t), x, create_graph=True)
    # without create_graph it works
    (g,) = torch.autograd.grad(ap_loss(x, t), x)
    assert g.abs().sum() > 0


def test_vmap_raises_clear_error():
    x = torch.randn(3, 20)
    t = torch.zeros(3, 20, dtype=torch.long)
    t[:, :3] = 1
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(ap_loss)(x, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(ap_loss)(x[0], t[0])


def test_no_grad_value_only():
    x = torch.randn(4, 300)
    t = torch.zeros(4, 300, dtype=torch.long)
    t[:, :10] = 1
    ref = ap_loss(x.clone().requires_grad_(), t)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            v = ap_loss(x.clone().requires_grad_(), t)
        assert v.grad_fn is None and float(v) == float(ref)
    v = ap_loss(x, t)  # logits not requiring grad
    assert v.grad_fn is None and float(v) == float(ref)


def test_compile_with_graph_breaks():
    x = torch.randn(2, 200, requires_grad=True)
    t = torch.zeros(2, 200, dtype=torch.long)
    t[:, :7] = 1
    eager = ap_loss(x, t)
    (g_eager,) = torch.autograd.grad(eager, x)

    def f(x, t):
        return ap_loss(x * 1.0, t)

    compiled = torch.compile(f, backend="eager")
    out = compiled(x, t)
    (g,) = torch.autograd.grad(out, x)
    assert float(out) == float(eager)
    torch.testing.assert_close(g, g_eager)
