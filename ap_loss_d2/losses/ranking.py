"""Exact error-driven AP-loss and AUC-loss (Chen et al., "AP-Loss for Accurate One-Stage Object
Detection", Sec. 3 and Algorithm 1), in plain PyTorch: no Detectron2 needed.

All entries of one call are ranked together (all images, anchors and classes of a mini-batch,
Sec. 3.4.1). For positives ``P`` (label 1) and non-trivial negatives
``N^ = {j : t_j = 0, s_j >= min_P s - delta}``, with ``f`` the step function:

* ``a_i = 1 + sum_{k in P, k != i} f(s_k - s_i)``, ``b_i = sum_{j in N^} f(s_j - s_i)``,
  ``prec_i = a_i / (a_i + b_i)``, ``L_ij = f(s_j - s_i) / (a_i + b_i)``;
* interpolation (positives in ascending score, running max ``MaxPrec``): where
  ``prec_i < MaxPrec`` the ``L_ij`` are scaled by ``(1 - MaxPrec) / (1 - prec_i)``;
* gradient (Eq. 14, normalised by ``|P|``): positive ``i``: ``-(1 - prec_i^interp) / |P|``;
  negative ``j``: ``sum_i L_ij / |P|``; ignored labels and trivial negatives: 0;
* value: ``1 - mean_i prec_i^interp``.

How it is fast and exact at once
--------------------------------
The algorithm needs two kinds of sums over pairs (positive ``i``, other entry ``j``):
``sum_j f(s_j - s_i)`` for every positive (``a_i`` and ``b_i``) and ``sum_i w_i f(s_j - s_i)``
for every negative (its gradient, with ``w_i = c_i / (a_i + b_i)``). For the linear and
Heaviside steps, ``f(s - p_i)`` is piecewise linear in ``s`` with breakpoints at the sorted
positive scores (``p_i``, resp. ``p_i +- delta``). So

* each negative needs only the index of the segment between breakpoints that holds it (one
  binary search over ``O(|P|)`` sorted breakpoints, accelerated by a uniform-grid lookup table);
* ``b_i`` is a window sum over segments: per-segment counts and score sums (two ``bincount``)
  and their prefix sums (float64) give every ``b_i`` at once;
* ``sum_i w_i f(s - p_i)`` is, inside each segment, ``intercept_k + slope_k * s``: prefix sums
  of ``w_i`` along the breakpoints give all coefficients, so each negative's gradient is one
  gather and one multiply-add.

Time ``O((|P| + |N^|) log |P| + |N|)`` (the ``|N|`` part is the element-wise selection of
``N^``), extra memory ``O(|P| + |N^|)``: no ``|P| x |N|`` matrix, no loop over positives, no
sort of the negatives. The sigmoid step (Eq. 54) has no window: it is computed exactly in chunks
of negatives against all positives, ``O(|P| * (|P| + |N^|))`` time with the chunk's extra memory
capped by :data:`SIGMOID_CHUNK_BYTES`.

All arithmetic is float64 whatever the logits' dtype (float16/bfloat16/float32/float64 are
exact in float64), so a half-precision call equals the float32 call on the same values; the
gradient is returned in the logits' dtype.
"""
import time
from typing import Optional

import torch

__all__ = [
    "ap_loss",
    "auc_loss",
    "NonFiniteLogitsError",
    "STEPS",
    "SIGMOID_CHUNK_BYTES",
    "validate_ranking_inputs",
]

STEPS = ("linear", "heaviside", "sigmoid")
#: Cap on the temporary memory of one chunk of the sigmoid step (bytes).
SIGMOID_CHUNK_BYTES = 256 * 2**20
# Uniform grid cells per breakpoint for the segment lookup table (see _SegmentIndex).
_GRID_CELLS_PER_BREAKPOINT = 64


class NonFiniteLogitsError(ValueError):
    """The logits given to a ranking loss hold NaN or Inf."""


def ap_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    delta: float = 1.0,
    interpolate: bool = True,
    step: str = "linear",
    sigmoid_k: float = 0.5,
    stats: Optional[dict] = None,
    process_group=None,
) -> torch.Tensor:
    """AP-loss ``1 - AP`` over all entries, with the error-driven update as its gradient.

    Args:
        logits: scores, any shape (e.g. ``(N images, A anchors, K classes)``), float16,
            bfloat16, float32 or float64, any device.
        targets: same shape as ``logits``; 1 positive, 0 negative, -1 ignored (any int or
            float dtype).
        delta: width of the piecewise step (Eq. 21); negatives scoring below
            ``min(positive scores) - delta`` are trivial (no loss, zero gradient).
        interpolate: use interpolated AP (Sec. 3.4.3).
        step: ``"linear"`` (Eq. 21), ``"heaviside"`` (Eq. 4) or ``"sigmoid"`` (Eq. 54).
        sigmoid_k: slope parameter ``k`` of the sigmoid step.
        stats: optional dict, filled with ``num_pos``, ``num_neg_nontrivial`` (ints, global
            when ranking across processes) and ``time`` (seconds spent in the loss's forward,
            host clock; the algorithm already synchronises with the device to size N^).
        process_group: a ``torch.distributed`` group to rank the entries of all its processes
            together (see :mod:`ap_loss_d2.losses.distributed`); ``None`` ranks locally.

    Returns:
        A 0-dim tensor in the logits' dtype. Its backward gives the error-driven update
        (Eq. 9/14) of Algorithm 1 times the incoming gradient. With no positives the loss is 0
        and every gradient 0.

    Complexity: see the module docstring; ``O((|P| + |N^|) log |P| + |N|)`` time and
    ``O(|P| + |N^|)`` extra memory for the linear and Heaviside steps.
    """
    return _RankingLoss.apply(
        logits, targets, "ap", _Options(delta, interpolate, step, sigmoid_k, stats, process_group)
    )


def auc_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    delta: float = 1.0,
    step: str = "linear",
    sigmoid_k: float = 0.5,
    stats: Optional[dict] = None,
    process_group=None,
) -> torch.Tensor:
    """AUC-loss ``1 - AUC`` with the error-driven update (activation of Eq. 7).

    ``L'_ij = f(s_j - s_i) / |N|`` with ``|N|`` the number of all negatives; value
    ``sum_{i in P, j in N^} L'_ij / |P|``; gradients: positive ``i``: ``-sum_j L'_ij / |P|``,
    negative ``j``: ``sum_i L'_ij / |P|``. Arguments, shapes, dtypes and complexity as
    :func:`ap_loss` (there is no interpolation for AUC).
    """
    return _RankingLoss.apply(
        logits, targets, "auc", _Options(delta, False, step, sigmoid_k, stats, process_group)
    )


class _Options:
    def __init__(self, delta, interpolate, step, sigmoid_k, stats, process_group):
        if step not in STEPS:
            raise ValueError(f"step={step!r} is not a valid step function; choose one of {STEPS}")
        if not (float(delta) > 0):
            raise ValueError(f"delta must be > 0, got {delta}")
        if step == "sigmoid" and not (float(sigmoid_k) > 0):
            raise ValueError(f"sigmoid_k must be > 0, got {sigmoid_k}")
        self.delta = float(delta)
        self.interpolate = bool(interpolate)
        self.step = step
        self.sigmoid_k = float(sigmoid_k)
        self.stats = stats
        self.process_group = process_group


class _RankingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, kind, opts):
        start = time.perf_counter()
        validate_ranking_inputs(logits, targets)
        loss, grad, n_pos, n_neg = _ranking_loss_and_grad(logits.detach(), targets.detach(), kind, opts)
        ctx.save_for_backward(grad)
        if opts.stats is not None:
            opts.stats.update(num_pos=n_pos, num_neg_nontrivial=n_neg, time=time.perf_counter() - start)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def validate_ranking_inputs(logits, targets):
    """Raise a ValueError naming the problem unless ``logits``/``targets`` are valid inputs of a
    ranking loss: same shape and device, floating logits without NaN/Inf
    (:class:`NonFiniteLogitsError`, with their count), labels in {1, 0, -1}."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("logits and targets must be tensors")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but targets on {targets.device}")
    if logits.numel() == 0:
        return
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise NonFiniteLogitsError(f"{bad} of {logits.numel()} logits are NaN or Inf")
    if targets.dtype == torch.bool:
        raise ValueError("targets must hold 1 (positive), 0 (negative), -1 (ignored); got a bool tensor")
    if targets.is_floating_point():
        invalid = (targets != 0) & (targets != 1) & (targets != -1)
        if bool(invalid.any()):
            values = torch.unique(targets[invalid])[:10].tolist()
            raise ValueError(
                f"targets must be 1 (positive), 0 (negative) or -1 (ignored); found "
                f"{int(invalid.sum())} other labels, e.g. {values}"
            )
    else:
        lo, hi = torch.aminmax(targets)
        if int(lo) < -1 or int(hi) > 1:
            invalid = (targets < -1) | (targets > 1)
            values = torch.unique(targets[invalid])[:10].tolist()
            raise ValueError(
                f"targets must be 1 (positive), 0 (negative) or -1 (ignored); found "
                f"{int(invalid.sum())} other labels, e.g. {values}"
            )


def _ranking_loss_and_grad(logits, targets, kind, opts):
    """Returns (loss float64 0-dim, gradient in logits dtype and shape, |P|, |N^|).

    Negatives are processed in chunks of the flattened input, twice: pass 1 finds the
    non-trivial ones and accumulates their per-positive sums ``b_i``; pass 2 selects them again
    and writes their gradients. Between the passes only their segment indices are kept (int16
    while |P| < 16k), so the extra memory stays a small multiple of the logits.
    """
    from . import distributed as dist_utils

    group = opts.process_group
    x = logits.reshape(-1)
    t = targets.reshape(-1)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    # contiguous whatever the logits' strides: flat position i of `grad` is entry i of `x`
    grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    pos_idx = torch.nonzero(t == 1).squeeze(1)
    p_all, offset = dist_utils.gather_positive_scores(x[pos_idx].double(), group)
    m = p_all.numel()
    if m == 0:
        return zero, grad, 0, 0

    p, order = torch.sort(p_all, stable=True)
    kernel = _make_kernel(opts, p)
    threshold = p[0] - opts.delta
    chunk = _chunk_size(x.numel())
    chunks = [(x[i : i + chunk], t[i : i + chunk], i) for i in range(0, x.numel(), chunk)]
    b = torch.zeros_like(p)
    segments = []  # per chunk: segment index of each non-trivial negative, in a small int type
    n_neg = 0
    for xc, tc, _ in chunks:
        _, s = _nontrivial_negatives(xc, tc, threshold)
        b_part, seg = kernel.accumulate(s)
        b += b_part
        n_neg += s.numel()
        segments.append(None if seg is None else seg.to(_small_index_dtype(kernel.num_segments)))
    b = dist_utils.all_reduce_sum(b, group)
    n_neg = dist_utils.all_reduce_count(n_neg, group, x.device)

    if kind == "ap":
        a = (1.0 - kernel.f0) + kernel.accumulate(p)[0]
        denom = a + b
        prec = a / denom
        prec_interp = torch.cummax(prec, 0).values if opts.interpolate else prec
        scale = torch.where(prec < prec_interp, (1 - prec_interp) / (1 - prec), torch.ones_like(prec))
        w = scale / denom
        loss = 1 - prec_interp.mean()
        g_pos = -(1 - prec_interp) / m
    else:  # auc
        n_all_neg = dist_utils.all_reduce_count(int((t == 0).sum()), group, x.device)
        if n_all_neg == 0:
            return zero, grad, m, n_neg
        w = torch.full_like(p, 1.0 / n_all_neg)
        loss = b.sum() / (n_all_neg * m)
        g_pos = -b / (n_all_neg * m)

    flat = grad.view(-1)
    coefficients = kernel.coefficients(w / m)
    for (xc, tc, start), seg in zip(chunks, segments):
        # the same selection as in pass 1 (deterministic), rather than keeping its positions
        idx, s = _nontrivial_negatives(xc, tc, threshold)
        if idx.numel():
            g_neg = kernel.evaluate(coefficients, s, seg)
            flat.index_copy_(0, idx + start, g_neg.to(flat.dtype))
    if pos_idx.numel():
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(m, device=order.device)
        mine = inverse[offset : offset + pos_idx.numel()]
        flat.index_copy_(0, pos_idx, g_pos[mine].to(flat.dtype))
    return loss, grad, m, n_neg


def _small_index_dtype(n):
    """Smallest signed integer dtype holding 0..n (segment indices kept between passes)."""
    for dtype in (torch.int16, torch.int32):
        if n <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _chunk_size(numel):
    """Entries per chunk of the negatives' passes: ~1/16 of the input, at least 2**16."""
    return max(2**16, -(-numel // 16))


def _nontrivial_negatives(x, t, threshold):
    """Positions and float64 scores of negatives with ``s >= threshold`` (exact in float64).

    The element-wise pass compares in the logits' dtype against the threshold rounded down to
    that dtype (a superset), then refines the few borderline entries in float64.
    """
    thr = threshold.to(x.dtype)
    if thr.double() > threshold:
        thr = torch.nextafter(thr, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
    idx = torch.nonzero((t == 0) & (x >= thr)).squeeze(1)
    s = x[idx].double()
    keep = s >= threshold
    if not bool(keep.all()):
        idx, s = idx[keep], s[keep]
    return idx, s


def _make_kernel(opts, p):
    if opts.step == "linear":
        return _LinearStep(p, opts.delta)
    if opts.step == "heaviside":
        return _HeavisideStep(p)
    return _SigmoidStep(p, opts.sigmoid_k)


class _SegmentIndex:
    """``torch.searchsorted(r, q, right=True)`` for many queries ``q`` against few sorted
    breakpoints ``r``, exact, through a uniform-grid lookup table.

    A query whose grid cell (and both neighbours, to absorb rounding of the cell index) holds
    no breakpoint takes the table's answer; the others (at most ~3 cells per breakpoint) fall
    back to ``torch.searchsorted``. O(1) per query on well-spread data, O(log |r|) worst case.
    """

    def __init__(self, r):
        self.r = r
        self.table = None
        n = r.numel()
        if n == 0:
            return
        lo, hi = r[0], r[-1]
        cells = min(max(64, _GRID_CELLS_PER_BREAKPOINT * n), 2**22)
        width = (hi - lo) / cells
        if not bool(width > 0) or not bool(torch.isfinite(width)):
            return
        edges = lo + width * torch.arange(-2, cells + 3, dtype=r.dtype, device=r.device)
        at_or_below = torch.searchsorted(r, edges, right=True)  # #r <= edge
        below = torch.searchsorted(r, edges, right=False)  # #r < edge
        # core slot j holds grid cell c = j - 1 (c in [-1, cells]); edges[j] is grid coordinate
        # j - 2, so cell c's neighbourhood (c - 1, c + 2) is (edges[j], edges[j + 3]). The slot
        # is clean when no breakpoint lies in it: then #{r <= q} = #{r <= edges[j]} there.
        k_lo = at_or_below[:-3]
        clean = k_lo == below[3:]
        # -1 marks "look it up"
        core = torch.where(clean, k_lo, torch.full_like(k_lo, -1))
        # two more slots: grid coordinates < -1 (below every breakpoint: 0) and >= cells + 1
        # (above every breakpoint: n)
        self.table = torch.cat([core.new_zeros(1), core, core.new_full((1,), n)])
        self.lo, self.inv_width, self.cells = float(lo), float(1.0 / width), cells

    def __call__(self, q):
        if self.table is None or q.numel() == 0:
            return torch.searchsorted(self.r, q, right=True)
        # slot = floor(grid coordinate) + 2, clamped to [0, cells + 3] (the far slots)
        slot = torch.sub(q, self.lo).mul_(self.inv_width).add_(2.0).clamp_(0, self.cells + 3)
        k = self.table[slot.to(torch.int64)]
        del slot
        missing = torch.nonzero(k < 0).squeeze(1)
        if missing.numel():
            k[missing] = torch.searchsorted(self.r, q[missing], right=True)
        return k


class _LinearStep:
    """f(x) = clamp(x / (2 delta) + 1/2, 0, 1): breakpoints at p_i - delta and p_i + delta.

    Segment k of a query s is the number of breakpoints <= s. Because f is continuous, how
    tied breakpoints are ordered does not change any value.
    """

    f0 = 0.5

    def __init__(self, p, delta):
        m = p.numel()
        self.p, self.delta, self.m = p, delta, m
        r, order = torch.sort(torch.cat([p - delta, p + delta]), stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(2 * m, device=p.device)
        # exclusive prefix index bounds of each positive's window [p_i - delta, p_i + delta]
        self.win_lo = position[:m] + 1
        self.win_hi = position[m:] + 1
        self.r, self.order = r, order
        self.segment = _SegmentIndex(r)
        self.num_segments = 2 * m + 1

    def accumulate(self, q):
        """(sum_j f(q_j - p_i) for each positive i, segment index of each q_j)."""
        if q.numel() == 0:
            return torch.zeros_like(self.p), None
        seg = self.segment(q)
        nseg = self.num_segments
        count = _exclusive_cumsum(torch.bincount(seg, minlength=nseg).double())
        total = _exclusive_cumsum(torch.bincount(seg, weights=q, minlength=nseg))
        lo, hi = self.win_lo, self.win_hi
        in_window = count[hi] - count[lo]
        window_sum = total[hi] - total[lo]
        above = count[-1] - count[hi]
        return above + (window_sum - self.p * in_window) / (2 * self.delta) + 0.5 * in_window, seg

    def coefficients(self, w):
        """Per segment k: (intercept_k, slope_k) with sum_i w_i f(s - p_i) = intercept_k + slope_k s."""
        two_d = 2 * self.delta
        # in breakpoint order: entering the window of i adds w_i * ((s - p_i) / 2d + 1/2),
        # leaving it replaces that with w_i.
        d_slope = torch.cat([w / two_d, -w / two_d])[self.order]
        d_icpt = torch.cat([w * (0.5 - self.p / two_d), w * (0.5 + self.p / two_d)])[self.order]
        return _exclusive_cumsum(d_icpt), _exclusive_cumsum(d_slope)

    def evaluate(self, coefficients, s, seg):
        """sum_i w_i f(s_j - p_i) for each s_j (seg: its segment indices from accumulate)."""
        icpt, slope = coefficients
        seg = seg.long()
        return icpt[seg].addcmul_(slope[seg], s)


class _HeavisideStep:
    """H(x) = 1 if x >= 0 else 0: breakpoints at the positive scores."""

    f0 = 1.0

    def __init__(self, p):
        self.p, self.m = p, p.numel()
        # H(s - p_i) = 1  <=>  #{p <= s} >= #{p <= p_i}
        self.first_above = torch.searchsorted(p, p, right=True)
        self.segment = _SegmentIndex(p)
        self.num_segments = self.m + 1

    def accumulate(self, q):
        if q.numel() == 0:
            return torch.zeros_like(self.p), None
        seg = self.segment(q)
        count = _exclusive_cumsum(torch.bincount(seg, minlength=self.m + 1).double())
        return count[-1] - count[self.first_above], seg

    def coefficients(self, w):
        return _exclusive_cumsum(w)

    def evaluate(self, coefficients, s, seg):
        return coefficients[seg.long()]


class _SigmoidStep:
    """f(x) = 1 / (1 + exp(-x / k)) (Eq. 54): no window, exact in bounded chunks.

    O(|P| * (|P| + |N^|)) time; extra memory per chunk capped at SIGMOID_CHUNK_BYTES.
    """

    f0 = 0.5
    num_segments = 0

    def __init__(self, p, k):
        self.p, self.k = p, k
        # a chunk holds ~3 float64 (rows x |P|) temporaries
        self.rows = max(1, SIGMOID_CHUNK_BYTES // (3 * 8 * max(1, p.numel())))

    def _f(self, q):
        return torch.sigmoid((q[:, None] - self.p[None, :]) / self.k)

    def accumulate(self, q):
        out = torch.zeros_like(self.p)
        for chunk in torch.split(q, self.rows):
            out += self._f(chunk).sum(0)
        return out, None

    def coefficients(self, w):
        return w

    def evaluate(self, w, s, seg):
        return torch.cat([self._f(chunk) @ w for chunk in torch.split(s, self.rows)])


def _exclusive_cumsum(x):
    """[0, x0, x0+x1, ...] (length len(x) + 1), float64 accumulation."""
    out = torch.zeros(x.numel() + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(x.double(), 0, out=out[1:])
    return out
