"""Naive float64 reference ("oracle") for AP-loss and AUC-loss.

Written straight from Algorithm 1 of the AP-loss paper (Sec. 3.1.2-3.4.4), one positive at a
time, with explicit Python loops and no vectorisation, so that it is easy to check by eye.
It is deliberately slow: use it on at most a few thousand scores.

Conventions (the contract of ``ap_loss_d2.losses.ranking``):

* step ``f``: "linear" (Eq. 21), "heaviside" (H(0) = 1, Eq. 4), "sigmoid" 1/(1+exp(-x/k)).
* P = {t == 1}, N = {t == 0}, entries with t == -1 are ignored.
* N_hat = {j in N : s_j >= min_{i in P} s_i - delta} (for every step; reported as
  num_neg_nontrivial). The linear and Heaviside steps are 0 below min_P s - delta, so summing
  over N_hat or over all of N is the same. The sigmoid step is not: it sums over ALL
  negatives (exact Eq. 54).
* positive i:  a_i = 1 + sum_{k in P, k != i} f(s_k - s_i)
               b_i = sum_{j in N_hat} f(s_j - s_i)
               prec_i = a_i / (a_i + b_i),   L_ij = f(s_j - s_i) / (a_i + b_i)
* interpolation (Algorithm 1, lines 10-15): positives in ascending score; MaxPrec starts at 0;
  if prec_i >= MaxPrec then MaxPrec = prec_i, else every L_ij is scaled by
  (1 - MaxPrec) / (1 - prec_i) so that the interpolated precision equals MaxPrec.
* gradient: g_i = -sum_j L_ij / |P| for positives, g_j = sum_i L_ij / |P| for j in N_hat,
  0 elsewhere (ignored entries, trivial negatives).
* loss = (1/|P|) sum_i sum_j L_ij  (= 1 - mean_i prec_i^interp, Eq. 5).
* AUC-loss: L'_ij = f(s_j - s_i) / |N| (|N| counts ALL negatives), no interpolation.

Both functions return ``(loss, grad)``: a Python float and a float64 ``numpy.ndarray`` with the
shape of the input scores. With ``details=True`` a third item, a dict with per-positive
quantities (a, b, prec, prec_interp) and the set sizes, is returned too.
"""
import math

import numpy as np

STEPS = ("linear", "heaviside", "sigmoid")


def step_value(x, step="linear", delta=1.0, sigmoid_k=0.5):
    """The step function f(x) of the contract, for one Python float x."""
    x = float(x)
    if step == "linear":
        if x < -delta:
            return 0.0
        if x > delta:
            return 1.0
        return x / (2.0 * delta) + 0.5
    if step == "heaviside":
        return 1.0 if x >= 0.0 else 0.0
    if step == "sigmoid":
        z = x / sigmoid_k
        # Two branches so that math.exp never overflows.
        if z >= 0.0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)
    raise ValueError(f"unknown step {step!r}; valid steps: {STEPS}")


def _split(scores, targets):
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.shape != t.shape:
        raise ValueError(f"shape mismatch: {s.shape} vs {t.shape}")
    s_flat = [float(v) for v in s.reshape(-1)]
    t_flat = [int(v) for v in t.reshape(-1)]
    positives = [i for i, ti in enumerate(t_flat) if ti == 1]
    negatives = [j for j, tj in enumerate(t_flat) if tj == 0]
    return s, s_flat, positives, negatives


def non_trivial_negatives(scores_flat, positives, negatives, delta):
    """N_hat: negatives j with s_j >= min_{i in P} s_i - delta (Algorithm 1, lines 4-5)."""
    if not positives:
        return []
    s_min = min(scores_flat[i] for i in positives)
    return [j for j in negatives if scores_flat[j] >= s_min - delta]


def _summed_negatives(sf, P, N, delta, step):
    """(negatives the sums run over, N_hat)."""
    n_hat = non_trivial_negatives(sf, P, N, delta)
    if step == "sigmoid":
        return list(N), n_hat
    return n_hat, n_hat


def ap_oracle(scores, targets, delta=1.0, interpolate=True, step="linear", sigmoid_k=0.5,
              details=False):
    """AP-loss value and gradient w.r.t. the scores, by Algorithm 1. See the module docstring."""
    s, sf, P, N = _split(scores, targets)
    grad = [0.0] * len(sf)
    info = {"num_pos": len(P), "num_neg": len(N), "num_neg_nontrivial": 0,
            "order": [], "a": [], "b": [], "prec": [], "prec_interp": []}

    def result(loss):
        g = np.array(grad, dtype=np.float64).reshape(s.shape)
        return (loss, g, info) if details else (loss, g)

    if not P:  # no positives: nothing to rank
        return result(0.0)
    N_hat, n_hat = _summed_negatives(sf, P, N, delta, step)
    info["num_neg_nontrivial"] = len(n_hat)

    # Positives in ascending score (Algorithm 1, line 6). Ties: equal scores give equal a, b and
    # prec, so their relative order does not change anything.
    order = sorted(P, key=lambda i: sf[i])
    info["order"] = order

    def f(x):
        return step_value(x, step, delta, sigmoid_k)

    max_prec = 0.0
    total = 0.0  # sum over positives of sum_j L_ij
    for i in order:
        # rank among positives, Eq. 3/5 numerator: 1 + sum_{k in P, k != i} f(s_k - s_i)
        a = 1.0
        for k in P:
            if k != i:
                a += f(sf[k] - sf[i])
        # rank contribution of the non-trivial negatives
        b = 0.0
        for j in N_hat:
            b += f(sf[j] - sf[i])
        denom = a + b
        L = {j: f(sf[j] - sf[i]) / denom for j in N_hat}
        prec = a / denom
        info["a"].append(a)
        info["b"].append(b)
        info["prec"].append(prec)

        if interpolate:
            if prec >= max_prec:
                max_prec = prec
            else:
                # prec < max_prec <= 1, so 1 - prec > 0
                scale = (1.0 - max_prec) / (1.0 - prec)
                for j in N_hat:
                    L[j] = L[j] * scale
            info["prec_interp"].append(max_prec)
        else:
            info["prec_interp"].append(prec)

        row_sum = 0.0
        for j in N_hat:
            row_sum += L[j]
            grad[j] += L[j]          # Algorithm 1, line 17
        grad[i] -= row_sum           # Algorithm 1, line 16
        total += row_sum

    n_pos = len(P)
    for idx in range(len(grad)):     # Algorithm 1, line 19
        grad[idx] /= n_pos
    return result(total / n_pos)


def auc_oracle(scores, targets, delta=1.0, step="linear", sigmoid_k=0.5, details=False):
    """AUC-loss value and gradient (Eq. 7 with the step f), same loop structure as ap_oracle."""
    s, sf, P, N = _split(scores, targets)
    grad = [0.0] * len(sf)
    info = {"num_pos": len(P), "num_neg": len(N), "num_neg_nontrivial": 0}

    def result(loss):
        g = np.array(grad, dtype=np.float64).reshape(s.shape)
        return (loss, g, info) if details else (loss, g)

    if not P or not N:
        if P:
            info["num_neg_nontrivial"] = 0
        return result(0.0)
    N_hat, n_hat = _summed_negatives(sf, P, N, delta, step)
    info["num_neg_nontrivial"] = len(n_hat)
    n_neg_all = len(N)

    total = 0.0
    for i in sorted(P, key=lambda i: sf[i]):
        row_sum = 0.0
        for j in N_hat:
            L = step_value(sf[j] - sf[i], step, delta, sigmoid_k) / n_neg_all
            row_sum += L
            grad[j] += L
        grad[i] -= row_sum
        total += row_sum

    n_pos = len(P)
    for idx in range(len(grad)):
        grad[idx] /= n_pos
    return result(total / n_pos)
