"""The two alternative AP-loss optimisers the paper compares with (Sec. 4.2.3, Fig. 8), in plain
PyTorch: no Detectron2 needed.

Same input contract as :func:`ap_loss_d2.losses.ap_loss`: ``logits`` of any shape, ``targets``
of the same shape with 1 (positive, set ``P``), 0 (negative, set ``N``) and -1 (ignored), all
entries ranked together.

* :func:`ap_loss_approx_gradient` -- the *approximate gradient* method (Henderson & Ferrari,
  ACCV 2016; Song et al., ICML 2016): the Heaviside step of AP is replaced by a sigmoid, the
  smoothed AP (:func:`smoothed_ap`, the paper's Eq. 32 with ``S(x) = sigmoid(x / k)``) is
  differentiated by autograd, with the log-space objective ``-log(AP + eps)`` of Song et al.
* :func:`ap_loss_structured_hinge` -- the *structured hinge loss* upper bound of ``1 - AP``
  (Yue et al., SIGIR 2007 "SVM-AP"; Mohapatra et al., CVPR 2018), whose loss-augmented inference
  is solved exactly by sorting (see the function's docstring).
"""
from typing import Optional

import torch
import torch.utils.checkpoint

from .ranking import validate_ranking_inputs

__all__ = [
    "ap_loss_approx_gradient",
    "ap_loss_structured_hinge",
    "smoothed_ap",
    "hinge_most_violating_interleaving",
    "APPROX_CHUNK_BYTES",
]

#: Cap on the temporaries of one chunk of positives in :func:`smoothed_ap` (bytes).
APPROX_CHUNK_BYTES = 256 * 2 ** 20
# (rows x |P u N|) temporaries alive at once in one chunk (difference, sigmoid, its gradient).
_APPROX_TEMPORARIES = 3


def _zero(logits):
    """A 0-dim zero attached to the graph of ``logits`` (its gradient is 0 everywhere)."""
    return logits.sum() * 0.0


# ------------------------------------------------------------------------------------------------
# Approximate gradient (sigmoid-smoothed AP)
# ------------------------------------------------------------------------------------------------


def _smoothed_sums(p_rows, v, p, k):
    """For each positive score ``p_r`` of ``p_rows``: ``sum_{q in P} S((q - p_r) / k)`` and
    ``sum_{u in P u N} S((u - p_r) / k)``, self term included (``S(0) = 1/2``)."""
    pos = torch.sigmoid((p[None, :] - p_rows[:, None]) / k).sum(1)
    den = torch.sigmoid((v[None, :] - p_rows[:, None]) / k).sum(1)
    return pos, den


def smoothed_ap(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    sigmoid_k: float = 1.0,
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """Sigmoid-smoothed AP (paper Eq. 32: ``F = 1 - smoothed_ap`` with ``k = 1``), differentiable.

    With ``S(x) = sigmoid(x / k)`` and ``V = P u N``::

        prec_i = (1 + sum_{q in P, q != i} S(s_q - s_i)) / (1 + sum_{u in V, u != i} S(s_u - s_i))
        smoothed_ap = mean_{i in P} prec_i

    Args:
        logits: scores, any shape, any floating dtype (computed in float32 at least).
        targets: same shape; 1 positive, 0 negative, -1 ignored.
        sigmoid_k: temperature ``k`` of the sigmoid (> 0).
        chunk_bytes: cap on one chunk's temporaries (default :data:`APPROX_CHUNK_BYTES`).

    Returns:
        0-dim tensor in the computation dtype; 1 (attached to the graph, zero gradient) when
        there is no positive.

    Complexity: ``O(|P| * (|P| + |N|))`` time. Positives are processed in chunks of ``rows``
    with ``rows * |V| * 3 * itemsize <= chunk_bytes``; each chunk runs under
    ``torch.utils.checkpoint`` so autograd keeps only ``O(|P|)`` per-positive sums between
    forward and backward (the chunk is recomputed in backward): extra memory ``O(|P| + |V|)``
    plus one chunk.
    """
    validate_ranking_inputs(logits, targets)
    if not float(sigmoid_k) > 0:
        raise ValueError(f"sigmoid_k must be > 0, got {sigmoid_k}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits.reshape(-1).to(dtype)
    t = targets.reshape(-1)
    p = x[t == 1]
    if p.numel() == 0:
        return _zero(x) + 1.0
    v = x[(t == 1) | (t == 0)]
    budget = APPROX_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    rows = max(1, budget // (_APPROX_TEMPORARIES * x.element_size() * v.numel()))
    k = float(sigmoid_k)
    precisions = []
    for p_rows in torch.split(p, rows):
        if torch.is_grad_enabled() and x.requires_grad:
            pos, den = torch.utils.checkpoint.checkpoint(
                _smoothed_sums, p_rows, v, p, k, use_reentrant=False
            )
        else:
            pos, den = _smoothed_sums(p_rows, v, p, k)
        # "1 + sum over the others" = 1/2 + sum including the self term S(0) = 1/2
        precisions.append((pos + 0.5) / (den + 0.5))
    return torch.cat(precisions).mean()


def ap_loss_approx_gradient(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    sigmoid_k: float = 1.0,
    eps: float = 1e-6,
    stats: Optional[dict] = None,
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """AP-loss optimised by the approximate-gradient method: ``-log(smoothed_ap + eps)``.

    The Heaviside step is replaced by ``sigmoid(x / sigmoid_k)`` (:func:`smoothed_ap`) and the
    log-space objective of Song et al. lets the model leave the initial state quickly (paper
    Sec. 4.2.3). Plain autograd: the gradient is the true gradient of this smooth objective.

    Args:
        logits, targets: as :func:`ap_loss_d2.losses.ap_loss` (any shape; 1 / 0 / -1).
        sigmoid_k: sigmoid temperature ``k``.
        eps: added to AP inside the log.
        stats: optional dict, filled with ``num_pos`` and ``num_neg`` (ints).
        chunk_bytes: see :func:`smoothed_ap`.

    Returns:
        0-dim tensor (float32 or wider). With no positive: 0, attached to the graph.

    Complexity: as :func:`smoothed_ap`, ``O(|P| (|P| + |N|))`` time, one chunk of extra memory.
    """
    validate_ranking_inputs(logits, targets)
    if stats is not None:
        stats.update(num_pos=int((targets == 1).sum()), num_neg=int((targets == 0).sum()))
    if not bool((targets == 1).any()):
        return _zero(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    ap = smoothed_ap(logits, targets, sigmoid_k=sigmoid_k, chunk_bytes=chunk_bytes)
    return -torch.log(ap + eps)


# ------------------------------------------------------------------------------------------------
# Structured hinge loss (SVM-AP)
# ------------------------------------------------------------------------------------------------


def _ap_telescoping(j, q, m):
    """``T_j(q) = sum_{i=q+1}^{m} (i/(i+j-1) - i/(i+j))`` for 1-based negative ranks ``j``
    (float64 tensors), by the identity ``i/(i+j-1) - i/(i+j) = j/(i+j) - (j-1)/(i+j-1)`` and
    ``sum_{i=a+1}^{b} 1/(i+c) = digamma(b+c+1) - digamma(a+c+1)``."""
    dg = torch.digamma
    return j * (dg(m + j + 1) - dg(q + j + 1)) - (j - 1) * (dg(m + j) - dg(q + j))


def hinge_most_violating_interleaving(
    pos_sorted: torch.Tensor, neg_sorted: torch.Tensor
) -> torch.Tensor:
    """Loss-augmented inference of SVM-AP: the most violating ranking, as an interleaving.

    Args:
        pos_sorted: (m,) positive scores in descending order (float64).
        neg_sorted: (K,) negative scores in descending order (float64).

    Returns:
        (K,) int64 ``q`` with ``q[j]`` = number of positives ranked above the ``j``-th highest
        negative (non-decreasing in ``j``), maximising ``Delta_AP + F(R) - F(R*)``.

    With both lists kept in score order (Yue et al., 2007: an optimal ranking does), the
    objective separates over negatives: negative ``j`` (1-based) placed below ``q`` positives
    contributes ``G_j(q) = sum_{i>q} [(i/(i+j-1) - i/(i+j)) / m - 2 (s_i - s_j) / (m K)]``
    (the first part telescopes AP's per-positive precisions, the second is the discriminant).
    The increments of ``G_j`` are non-increasing in ``j``, so the largest maximiser ``q_j`` is
    non-decreasing in ``j``, which makes the independent maxima a valid ranking. The maximisers
    of all ``j`` are found by divide and conquer over the rows of this monotone argmax problem,
    level by level (each level vectorised): ``O((m + K) log K)`` evaluations of ``G_j(q)``,
    each ``O(1)`` (closed form with digamma and prefix sums), ``O(m + K)`` memory. With the two
    sorts: ``O(m log m + (m + K) log K)`` overall, versus ``O(m K)`` for Yue et al.'s scan over
    all (negative, position) pairs.
    """
    m, K = pos_sorted.numel(), neg_sorted.numel()
    device = pos_sorted.device
    q_best = torch.zeros(K, dtype=torch.int64, device=device)
    if K == 0 or m == 0:
        return q_best
    b = 2.0 / (m * K)
    prefix = torch.zeros(m + 1, dtype=torch.float64, device=device)
    torch.cumsum(pos_sorted, 0, out=prefix[1:])
    total = prefix[-1]
    m_f = float(m)

    def objective(rows, q):  # rows: 0-based negative ranks; q: candidate positions
        j = (rows + 1).double()
        qd = q.double()
        margin = (total - prefix[q]) - (m_f - qd) * neg_sorted[rows]
        return _ap_telescoping(j, qd, m_f) / m_f - b * margin

    r_lo = torch.zeros(1, dtype=torch.int64, device=device)
    r_hi = torch.full((1,), K, dtype=torch.int64, device=device)
    c_lo = torch.zeros(1, dtype=torch.int64, device=device)
    c_hi = torch.full((1,), m, dtype=torch.int64, device=device)
    while r_lo.numel():
        mid = (r_lo + r_hi) // 2
        lengths = c_hi - c_lo + 1
        seg = torch.repeat_interleave(torch.arange(mid.numel(), device=device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        q = c_lo[seg] + torch.arange(seg.numel(), device=device) - starts[seg]
        values = objective(mid[seg], q)
        best = torch.full((mid.numel(),), float("-inf"), dtype=torch.float64, device=device)
        best = best.scatter_reduce(0, seg, values, reduce="amax")
        # the largest maximiser of each row (the monotonicity argument needs a consistent choice)
        candidates = torch.where(values == best[seg], q, torch.full_like(q, -1))
        arg = torch.full((mid.numel(),), -1, dtype=torch.int64, device=device)
        arg = arg.scatter_reduce(0, seg, candidates, reduce="amax")
        q_best[mid] = arg
        # rows above mid take positions <= arg, rows below take positions >= arg
        r_lo, r_hi, c_lo, c_hi = (
            torch.cat([r_lo, mid + 1]),
            torch.cat([mid, r_hi]),
            torch.cat([c_lo, arg]),
            torch.cat([arg, c_hi]),
        )
        keep = r_lo < r_hi
        r_lo, r_hi, c_lo, c_hi = r_lo[keep], r_hi[keep], c_lo[keep], c_hi[keep]
    return q_best


class _StructuredHinge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, stats):
        x = logits.detach().reshape(-1)
        t = targets.reshape(-1)
        pos_idx = torch.nonzero(t == 1).squeeze(1)
        neg_idx = torch.nonzero(t == 0).squeeze(1)
        m, K = pos_idx.numel(), neg_idx.numel()
        grad = torch.zeros(x.numel(), dtype=torch.float64, device=x.device)
        if stats is not None:
            stats.update(num_pos=m, num_neg=K)
        if m == 0 or K == 0:
            ctx.save_for_backward(grad.reshape(logits.shape))
            return torch.zeros((), dtype=logits.dtype, device=logits.device)
        p, p_order = torch.sort(x[pos_idx].double(), descending=True, stable=True)
        n, n_order = torch.sort(x[neg_idx].double(), descending=True, stable=True)
        q = hinge_most_violating_interleaving(p, n)
        # c_i: negatives above the i-th positive (1-based i) = #{j : q_j < i}
        c = torch.searchsorted(q, torch.arange(m, device=x.device), right=True)
        i = torch.arange(1, m + 1, device=x.device, dtype=torch.float64)
        delta = 1.0 - (i / (i + c.double())).mean()
        prefix = torch.zeros(m + 1, dtype=torch.float64, device=x.device)
        torch.cumsum(p, 0, out=prefix[1:])
        b = 2.0 / (m * K)
        # F(R^) - F(R*) = -b * sum_j sum_{i > q_j} (s_i - s_j)
        margin = ((prefix[-1] - prefix[q]) - (m - q).double() * n).sum()
        loss = delta - b * margin
        # dF(R^)/ds - dF(R*)/ds: positive i: -b c_i; negative j: b (m - q_j)
        grad[pos_idx[p_order]] = -b * c.double()
        grad[neg_idx[n_order]] = b * (m - q).double()
        ctx.save_for_backward(grad.reshape(logits.shape))
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.double()).to(grad_output.dtype), None, None


def ap_loss_structured_hinge(
    logits: torch.Tensor, targets: torch.Tensor, *, stats: Optional[dict] = None
) -> torch.Tensor:
    """Structured hinge-loss upper bound of ``1 - AP`` (SVM-AP), with its subgradient.

    For rankings ``R`` (``R_ij = +1`` if positive ``i`` is ranked above negative ``j``, else
    ``-1``) and the discriminant ``F(R) = 1/(|P||N|) sum_{i in P, j in N} R_ij (s_i - s_j)``::

        loss = max_R [ Delta_AP(R*, R) + F(R) - F(R*) ]   (>= 1 - AP(scores), >= 0)

    where ``R*`` ranks every positive above every negative and ``Delta_AP = 1 - AP(R)``. The
    maximiser ``R^`` (loss-augmented inference) is found exactly by
    :func:`hinge_most_violating_interleaving`; the gradient is
    ``dF(R^)/ds - dF(R*)/ds``: ``-2 c_i / (|P||N|)`` for the positive with ``c_i`` negatives
    above it in ``R^``, ``2 (|P| - q_j) / (|P||N|)`` for the negative with ``q_j`` positives
    above it; 0 for ignored entries.

    Args:
        logits, targets: as :func:`ap_loss_d2.losses.ap_loss` (any shape; 1 / 0 / -1).
        stats: optional dict, filled with ``num_pos`` and ``num_neg`` (ints).

    Returns:
        0-dim tensor in the logits' dtype (computed in float64). No positive or no negative:
        0 with zero gradient.

    Complexity: ``O(|P| log |P| + (|P| + |N|) log |N|)`` time (two sorts, then the divide and
    conquer of :func:`hinge_most_violating_interleaving`), ``O(|P| + |N|)`` extra memory.
    """
    validate_ranking_inputs(logits, targets)
    return _StructuredHinge.apply(logits, targets, stats)
