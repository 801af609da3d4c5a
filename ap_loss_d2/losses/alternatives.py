"""The two alternative AP-loss optimisers the paper compares with (Sec. 4.2.3, Fig. 8), in plain
PyTorch. Inputs as :func:`ap_loss_d2.losses.ap_loss`: ``logits`` of any shape, ``targets`` of the
same shape with 1 (positive, set ``P``), 0 (negative, ``N``), -1 (ignored), all ranked together.

* :func:`ap_loss_approx_gradient`: the approximate gradient (Henderson & Ferrari, ACCV 2016; Song
  et al., ICML 2016), ``-log`` of the sigmoid-smoothed AP (:func:`smoothed_ap`, Eq. 32) by autograd;
* :func:`ap_loss_structured_hinge`: the structured hinge upper bound of ``1 - AP`` (SVM-AP, Yue et
  al., SIGIR 2007), loss-augmented inference solved exactly by sorting.
"""
from typing import Optional

import torch
import torch.utils.checkpoint

from .ranking import validate_ranking_inputs

__all__ = [
    "ap_loss_approx_gradient", "ap_loss_structured_hinge", "smoothed_ap", "hinge_most_violating_interleaving",
    "APPROX_CHUNK_BYTES",
]

#: Cap on the temporaries of one chunk of positives in :func:`smoothed_ap` (bytes).
APPROX_CHUNK_BYTES = 256 * 2 ** 20
# (rows x |P u N|) temporaries alive at once in one chunk (difference, sigmoid, its gradient).
_APPROX_TEMPORARIES = 3


def _smoothed_sums(p_rows, v, p, k):
    """For each positive score ``p_r`` of ``p_rows``: ``sum_{q in P} S((q - p_r) / k)`` and
    ``sum_{u in P u N} S((u - p_r) / k)``, self term included (``S(0) = 1/2``)."""
    pos = torch.sigmoid((p[None, :] - p_rows[:, None]) / k).sum(1)
    den = torch.sigmoid((v[None, :] - p_rows[:, None]) / k).sum(1)
    return pos, den


def smoothed_ap(logits, targets, *, sigmoid_k: float = 1.0, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """Sigmoid-smoothed AP (paper Eq. 32 with ``k = 1``), differentiable. With
    ``S(x) = sigmoid(x / k)`` and ``V = P u N``::

        prec_i = (1 + sum_{q in P, q != i} S(s_q - s_i)) / (1 + sum_{u in V, u != i} S(s_u - s_i))
        smoothed_ap = mean_{i in P} prec_i

    Computed in float32 at least; 1 (zero gradient) without positives. ``O(|P| |V|)`` time;
    positives in chunks whose temporaries stay under ``chunk_bytes`` (default
    :data:`APPROX_CHUNK_BYTES`), each under ``torch.utils.checkpoint``: extra memory
    ``O(|P| + |V|)`` plus one chunk.
    """
    validate_ranking_inputs(logits, targets)
    if not float(sigmoid_k) > 0:
        raise ValueError(f"sigmoid_k must be > 0, got {sigmoid_k}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits.reshape(-1).to(dtype)
    t = targets.reshape(-1)
    p = x[t == 1]
    if p.numel() == 0:
        return x.sum() * 0.0 + 1.0
    v = x[(t == 1) | (t == 0)]
    budget = APPROX_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    rows = max(1, budget // (_APPROX_TEMPORARIES * x.element_size() * v.numel()))
    k = float(sigmoid_k)
    precisions = []
    for p_rows in torch.split(p, rows):
        if torch.is_grad_enabled() and x.requires_grad:
            pos, den = torch.utils.checkpoint.checkpoint(_smoothed_sums, p_rows, v, p, k, use_reentrant=False)
        else:
            pos, den = _smoothed_sums(p_rows, v, p, k)
        # "1 + sum over the others" = 1/2 + sum including the self term S(0) = 1/2
        precisions.append((pos + 0.5) / (den + 0.5))
    return torch.cat(precisions).mean()


def ap_loss_approx_gradient(
    logits, targets, *, sigmoid_k: float = 1.0, eps: float = 1e-6, stats: Optional[dict] = None,
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """AP-loss by the approximate gradient: ``-log(smoothed_ap + eps)`` (the log-space objective
    of Song et al.), differentiated by autograd; 0 without positives. ``stats`` (optional dict)
    gets ``num_pos`` and ``num_neg``; ``sigmoid_k``, ``chunk_bytes`` as :func:`smoothed_ap`."""
    validate_ranking_inputs(logits, targets)
    if stats is not None:
        stats.update(num_pos=int((targets == 1).sum()), num_neg=int((targets == 0).sum()))
    if not bool((targets == 1).any()):
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).sum() * 0.0
    ap = smoothed_ap(logits, targets, sigmoid_k=sigmoid_k, chunk_bytes=chunk_bytes)
    return -torch.log(ap + eps)


def _ap_telescoping(j, q, m):
    """``T_j(q) = sum_{i=q+1}^{m} (i/(i+j-1) - i/(i+j))`` for 1-based negative ranks ``j``
    (float64 tensors), by the identity ``i/(i+j-1) - i/(i+j) = j/(i+j) - (j-1)/(i+j-1)`` and
    ``sum_{i=a+1}^{b} 1/(i+c) = digamma(b+c+1) - digamma(a+c+1)``."""
    dg = torch.digamma
    return j * (dg(m + j + 1) - dg(q + j + 1)) - (j - 1) * (dg(m + j) - dg(q + j))


def hinge_most_violating_interleaving(pos_sorted: torch.Tensor, neg_sorted: torch.Tensor) -> torch.Tensor:
    """Loss-augmented inference of SVM-AP: for (m,) positive and (K,) negative float64 scores in
    descending order, the (K,) int64 ``q`` (positives ranked above the ``j``-th negative,
    non-decreasing) maximising ``Delta_AP + F(R) - F(R*)``.

    With both lists in score order (Yue et al.), the objective separates over negatives:
    negative ``j`` (1-based) below ``q`` positives contributes
    ``G_j(q) = sum_{i>q} [(i/(i+j-1) - i/(i+j)) / m - 2 (s_i - s_j) / (m K)]``. Its increments are
    non-increasing in ``j``, so the largest maximisers are monotone and are found by divide and
    conquer over ``j`` (each level vectorised; ``G_j(q)`` in O(1) by digamma and prefix sums):
    ``O((m + K) log K)`` time, ``O(m + K)`` memory, versus ``O(m K)`` for Yue et al.'s scan.
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

    r_lo, r_hi, c_lo, c_hi = (torch.tensor([v], dtype=torch.int64, device=device) for v in (0, K, 0, m))
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
        r_lo, r_hi = torch.cat([r_lo, mid + 1]), torch.cat([mid, r_hi])
        c_lo, c_hi = torch.cat([c_lo, arg]), torch.cat([arg, c_hi])
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


def ap_loss_structured_hinge(logits, targets, *, stats: Optional[dict] = None) -> torch.Tensor:
    """Structured hinge upper bound of ``1 - AP`` (SVM-AP), with its subgradient. For rankings
    ``R`` (``R_ij = +1`` if positive ``i`` is above negative ``j``, else -1) and
    ``F(R) = 1/(|P||N|) sum_ij R_ij (s_i - s_j)``::

        loss = max_R [ Delta_AP(R*, R) + F(R) - F(R*) ]   (>= 1 - AP(scores), >= 0)

    ``R*`` ranks every positive first. The gradient ``dF(R^)/ds - dF(R*)/ds`` at the maximiser
    ``R^`` (:func:`hinge_most_violating_interleaving`): ``-2 c_i / (|P||N|)`` for a positive with
    ``c_i`` negatives above it, ``2 (|P| - q_j) / (|P||N|)`` for a negative with ``q_j`` positives
    above it. Computed in float64, returned in the logits' dtype; 0 without positives or
    negatives. ``stats`` (optional dict) gets ``num_pos`` and ``num_neg``.
    ``O(|P| log |P| + (|P| + |N|) log |N|)`` time, ``O(|P| + |N|)`` memory.
    """
    validate_ranking_inputs(logits, targets)
    return _StructuredHinge.apply(logits, targets, stats)
