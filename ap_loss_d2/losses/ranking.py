"""Exact error-driven AP-loss and AUC-loss (Chen et al., Sec. 3 and Algorithm 1), plain PyTorch.

All entries of one call are ranked together. For positives ``P`` (label 1), negatives ``N``
(label 0, ``-1`` ignored) and the step ``f``: ``a_i = 1 + sum_{k in P, k != i} f(s_k - s_i)``,
``b_i = sum_{j in N} f(s_j - s_i)``, ``prec_i = a_i / (a_i + b_i)``, interpolated as a running
maximum over the positives in ascending score; the gradient is Eq. 14 normalised by ``|P|``,
the value ``1 - mean_i prec_i^interp``. Negatives below ``min_P s - delta`` contribute 0 for
the linear and Heaviside steps; the sigmoid step (Eq. 54) sums over all negatives.

One algorithm (linear and Heaviside steps), explained in docs/losses.md:

1. the positives are sorted; each has two breakpoints, rounded outwards to the compute dtype
   so that "``s`` has passed ``c``" is the exact comparison ``s >= c``;
2. every entry gets its segment ``k`` (breakpoints ``<= s``); this is the only step that
   differs per kernel (``_Piecewise.locate_grid`` / ``locate_sync_free``);
3. per-segment counts and sums of ``s - ref_k`` (``ref_k`` a local reference) give every
   ``b_i`` by window sums; ``a_i`` the same way from the positives;
4. the gradient of an entry in segment ``k`` is ``A_k + B_k (s - ref_k)``; positives get their
   own table rows. Only the int32 ``k`` (4 bytes per entry) is kept for the backward.

Kernels (``kernel=``): ``"grid"`` finds the positives with ``nonzero`` and the segments with a
uniform grid sized on the host (host reads, free on a CPU); ``"sync_free"`` gathers the
positives into ``max_positives`` static slots and searches the same grid's ambiguous cells: no
host read, static shapes (``torch.compile(fullgraph=True)``, CUDA graphs). ``"auto"``:
``"sync_free"`` off the CPU or under ``torch.compile``. The sigmoid step and ranking across
processes always use the grid code. Invalid values and, off the CPU, more positives than
``max_positives`` make the sync-free kernel return NaN (no host read); the grid kernel raises.
Sums are float64, the gradient float32 (float64 for float64 logits) times ``grad_output``.
"""
import math
import numbers
from typing import Optional

import torch

from . import distributed as dist

__all__ = ["ap_loss", "auc_loss", "check_ranking_options", "validate_ranking_inputs",
           "NonFiniteLogitsError", "STEPS", "KERNELS", "MAX_POSITIVES", "SIGMOID_CHUNK_BYTES"]

STEPS = ("linear", "heaviside", "sigmoid")
KERNELS = ("auto", "grid", "sync_free")
#: Default static bound on the positives of one call of the sync-free kernel.
MAX_POSITIVES = 2**16
#: Cap on the temporary memory of one chunk of the sigmoid step (bytes).
SIGMOID_CHUNK_BYTES = 256 * 2**20
_GRID_CELLS_PER_BREAKPOINT = 256
_GRID_MAX_CELLS = 2**21
_CHUNK = 2**20  # entries per chunk of the element-wise passes (bounds their temporaries)
_F64 = torch.float64


class NonFiniteLogitsError(ValueError):
    """The logits given to a ranking loss hold NaN or Inf."""


def check_ranking_options(*, delta, step, sigmoid_k, interpolate=True, kernel="auto",
                          max_positives=MAX_POSITIVES):
    """Raise a TypeError (wrong type) or ValueError (bad value) naming the option and what is
    valid, unless the options of a ranking loss are valid."""
    for name, value in (("delta", delta), ("sigmoid_k", sigmoid_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a Python number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if not isinstance(step, str) or step not in STEPS:
        raise ValueError(f"step={step!r} is not a valid step function; choose one of {STEPS}")
    if not isinstance(interpolate, bool):
        raise TypeError(f"interpolate must be True or False, got {type(interpolate).__name__} "
                        f"{interpolate!r}")
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"ranking kernel {kernel!r} is unknown; choose one of {KERNELS}")
    if isinstance(max_positives, bool) or not isinstance(max_positives, int) or max_positives < 1:
        raise ValueError(f"max_positives must be an integer >= 1, got {max_positives!r}")


def ap_loss(logits: torch.Tensor, targets: torch.Tensor, *, delta: float = 1.0,
            interpolate: bool = True, step: str = "linear", sigmoid_k: float = 0.5,
            kernel: str = "auto", max_positives: int = MAX_POSITIVES,
            stats: Optional[dict] = None, process_group=None) -> torch.Tensor:
    """AP-loss ``1 - AP`` over all entries, with the error-driven update as its gradient.

    Args:
        logits: scores, any shape, float16/bfloat16/float32/float64, any device, finite.
        targets: same shape; 1 positive, 0 negative, -1 ignored (any int or float dtype).
        delta: width of the piecewise step (Eq. 21); interpolate: interpolated AP (3.4.3).
        step: ``"linear"`` (Eq. 21), ``"heaviside"`` (Eq. 4) or ``"sigmoid"`` (Eq. 54, slope
            ``sigmoid_k``).
        kernel: ``"auto"``, ``"grid"`` or ``"sync_free"``; max_positives: the sync-free
            kernel's static bound on the positives of this call.
        stats: ``None`` or a dict, filled with ``num_pos`` and ``num_neg_nontrivial``
            (negatives with ``s >= min_P s - delta``): Python ints on the CPU in eager mode,
            else 0-dim int64 tensors on the logits' device.
        process_group: a ``torch.distributed`` group whose processes' entries are ranked
            together (:mod:`ap_loss_d2.losses.distributed`); ``None`` ranks locally.

    Returns a 0-dim tensor in the logits' dtype (float32 for half precision), 0 without
    positives, whose backward gives the error-driven update of Algorithm 1.
    """
    return _apply(logits, targets, "ap", delta, interpolate, step, sigmoid_k, kernel,
                  max_positives, stats, process_group)


def auc_loss(logits: torch.Tensor, targets: torch.Tensor, *, delta: float = 1.0,
             step: str = "linear", sigmoid_k: float = 0.5, kernel: str = "auto",
             max_positives: int = MAX_POSITIVES, stats: Optional[dict] = None,
             process_group=None) -> torch.Tensor:
    """AUC-loss ``1 - AUC`` with the error-driven update (Eq. 7): ``L'_ij = f(s_j - s_i) / |N|``
    with ``|N|`` all negatives. Arguments and result as :func:`ap_loss` (no interpolation)."""
    return _apply(logits, targets, "auc", delta, False, step, sigmoid_k, kernel, max_positives,
                  stats, process_group)


def _apply(logits, targets, kind, delta, interpolate, step, sigmoid_k, kernel, max_positives,
           stats, group):
    check_ranking_options(delta=delta, step=step, sigmoid_k=sigmoid_k, interpolate=interpolate,
                          kernel=kernel, max_positives=max_positives)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (filled by the loss) or None, got "
                        f"{type(stats).__name__}")
    _check_static(logits, targets)
    if kernel == "auto":  # the sigmoid step and ranking across processes: grid code only
        kernel = "grid" if logits.device.type == "cpu" and not torch.compiler.is_compiling() \
            else "sync_free"
    sync_free = kernel == "sync_free" and step != "sigmoid" and dist.group_size(group) == 1
    if not sync_free:
        targets = validate_ranking_inputs(logits, targets)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    spec = (kind, step, float(delta), interpolate, float(sigmoid_k), sync_free,
            min(max_positives, logits.numel()), need_grad)
    loss, n_pos, n_neg = _RankingLoss.apply(logits, targets, spec, group)[:3]
    if stats is not None:
        stats.update(num_pos=_count_value(n_pos), num_neg_nontrivial=_count_value(n_neg))
    return loss


def _count_value(n):
    """A count as a Python int when that needs no device read, else a 0-dim int64 tensor."""
    host = not isinstance(n, torch.Tensor) or (n.is_cpu and not torch.compiler.is_compiling())
    return int(n) if host else n.to(torch.int64)


class _RankingLoss(torch.autograd.Function):
    """Outputs: loss, |P|, |N^|, then the tensors the backward needs (non-differentiable)."""

    @staticmethod
    def forward(logits, targets, spec, group):
        return _forward(logits.detach(), targets.detach(), spec, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(o for o in output[1:] if isinstance(o, torch.Tensor)))
        ctx.set_materialize_grads(False)  # no zero gradients for the state outputs
        ctx.save_for_backward(inputs[0], *output[3:])
        ctx.spec = inputs[2]

    @staticmethod
    def backward(ctx, grad_output, *_):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ap_loss/auc_loss support no double backward: create_graph=True (e.g. for a "
                "gradient penalty) and torch.func.grad/jacrev would differentiate the "
                "error-driven update, which has no derivative here. Use loss.backward() or "
                "torch.autograd.grad without create_graph for the ranking loss.")
        x, *state = ctx.saved_tensors
        if not state:  # no positives
            return torch.zeros_like(x), None, None, None
        go, xf = grad_output.to(_F64), x.detach().reshape(-1).to(_compute_dtype(x.dtype))
        if ctx.spec[1] == "sigmoid":
            flat = _Sigmoid.evaluate(xf, ctx.spec[4], go, *state)
        else:
            flat = _Piecewise.evaluate(xf, ctx.spec[1] == "linear", go, *state)
        return flat.view(x.shape).to(x.dtype), None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(
            "ap_loss/auc_loss do not support torch.func.vmap: all entries are ranked together "
            "(there is no per-sample rule). Call the loss once per sample in a Python loop, "
            "or once on the whole batch.")


def validate_ranking_inputs(logits, targets):
    """Raise a ValueError naming the problem unless ``logits``/``targets`` are valid inputs of a
    ranking loss: same shape and device, floating logits without NaN/Inf
    (:class:`NonFiniteLogitsError`, with their count), labels in {1, 0, -1}. One host read.
    Returns the targets (float labels as int8 codes)."""
    _check_static(logits, targets)
    if logits.numel() == 0:
        return targets
    x, t = logits.detach(), targets.detach()
    try:
        vals = torch.stack(_value_range(x, t)).tolist()  # the one host read
    except RuntimeError as e:  # functorch-wrapped tensors have no storage to read
        raise RuntimeError(
            "ap_loss/auc_loss need concrete tensors: they rank all entries together and read "
            "counts on the host, so torch.func transforms (vmap, grad, jacrev, ...) are not "
            "supported (for vmap there is no per-sample rule: all entries are ranked together). "
            "Call the loss on ordinary tensors and use loss.backward() / torch.autograd.grad."
        ) from e
    if not (math.isfinite(vals[0]) and math.isfinite(vals[1])):
        raise NonFiniteLogitsError(f"{int((~torch.isfinite(x)).sum())} of {x.numel()} logits "
                                   "are NaN or Inf")
    if not (vals[2] >= -1 and vals[3] <= 1) or (len(vals) > 4 and vals[4] > 0):
        invalid = (t != 0) & (t != 1) & (t != -1)
        raise ValueError(f"targets must be 1 (positive), 0 (negative) or -1 (ignored); found "
                         f"{int(invalid.sum())} other labels, e.g. "
                         f"{torch.unique(t[invalid])[:10].tolist()}")
    return t.to(torch.int8) if t.is_floating_point() else t


def _check_static(logits, targets):
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ValueError("logits and targets must be tensors")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have the same shape, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but targets on {targets.device}")
    if targets.dtype == torch.bool:
        raise ValueError("targets must hold 1 (positive), 0 (negative), -1 (ignored); got a bool tensor")
    if targets.is_complex():
        raise ValueError(f"targets must be an int or float tensor, got {targets.dtype}")


def _value_range(x, t):
    """float64 [min, max] of the logits and of the labels, and the count of float labels that
    are not integers (0-dim tensors; no host read)."""
    vals = [*torch.aminmax(x), *torch.aminmax(t)]
    if t.is_floating_point():  # inside [-1, 1], other labels do not survive the cast
        vals.append(torch.count_nonzero(t.to(torch.int8) != t))
    return [v.double() for v in vals]


def _invalid(x, t):
    """0-dim bool: NaN/Inf logits or invalid labels (no host read)."""
    xmin, xmax, tmin, tmax, *frac = _value_range(x, t)
    return ~(xmin.isfinite() & xmax.isfinite()) | (tmin < -1) | (tmax > 1) | (sum(frac) > 0)


def _forward(logits, targets, spec, group):
    """(loss, |P|, |N^|, *state for the backward)."""
    kind, step, delta, interpolate, sigmoid_k, sync_free, bound, need_grad = spec
    cd = _compute_dtype(logits.dtype)
    out_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    device = logits.device
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if logits.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=device), zero, zero
    x = logits.reshape(-1).to(cd)  # exact upcast of half precision
    t = targets.reshape(-1)
    bad = _invalid(x, t) if sync_free else None
    if t.is_floating_point():
        t = t.to(torch.int8)

    if sync_free:
        p, m = _positives_static(x, t, bound)
        valid = torch.arange(bound, device=device) < m
        if device.type == "cpu" and not torch.compiler.is_compiling() and int(m) > bound:
            raise ValueError(
                f"ap_loss/auc_loss kernel='sync_free': {int(m)} positives exceed its static "
                f"bound max_positives={bound}; pass max_positives={int(m)} or more, use "
                f"kernel='grid', or rank fewer images together (MODEL.CLS_LOSS.KERNEL, "
                f"MODEL.CLS_LOSS.IMAGES_PER_RANKING_SET)")
        bad = bad | (m > bound)
    else:
        pos_idx = torch.nonzero(t == 1).squeeze(1)
        p, offset = dist.gather_positive_scores(x[pos_idx].double(), group)
        m = p.numel()
        if m == 0:
            return torch.zeros((), dtype=out_dtype, device=device), 0, zero
        valid = None
    p, order = torch.sort(p, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=device))
    mine = None if sync_free else rank[offset : offset + pos_idx.numel()]
    m_safe = m.clamp_min(1).double() if sync_free else float(m)

    if step == "sigmoid":
        kernel = _Sigmoid(p, sigmoid_k, x, t, delta)
    else:
        kernel = _Piecewise(p, valid, delta, step == "linear", cd)
        if sync_free:
            kernel.locate_sync_free(x, t, rank)
        else:
            kernel.locate_grid(x, t, pos_idx, mine)
    b, n_neg = kernel.negative_sums()
    b = dist.all_reduce_sum(b, group)
    n_neg = dist.all_reduce_sum(n_neg, group)
    keep = (lambda v: v) if valid is None else (lambda v: torch.where(valid, v, 0.0))
    if kind == "ap":
        a = (1.0 - kernel.f0) + kernel.positive_sums()
        denom = keep(a + b) + (0.0 if valid is None else (~valid).double())
        prec = keep(a / denom)
        prec_interp = torch.cummax(prec, 0).values if interpolate else prec
        scale = torch.where(prec < prec_interp, (1 - prec_interp) / (1 - prec), 1.0)
        w = keep(scale / denom)
        loss = keep(1 - prec_interp).sum() / m_safe
        g_pos = -(1 - prec_interp) / m_safe
    else:
        n_all = kernel.n_all
        if sync_free:
            n_safe = n_all.clamp_min(1).double()
            w = torch.where(valid & (n_all > 0), 1.0 / n_safe, 0.0)
        else:
            n_all = dist.all_reduce_count(int(n_all), group, device)
            n_safe = max(n_all, 1)
            w = torch.full_like(p, 1.0 / n_safe if n_all else 0.0)
        b = w * keep(b)  # 0 without negatives
        loss = b.sum() / m_safe
        g_pos = -b / m_safe
    if bad is not None:
        loss = torch.where(bad, math.nan, loss)
    loss = loss.to(out_dtype)
    n_pos = m.long() if sync_free else torch.tensor(m)
    if not need_grad:
        return loss, n_pos, n_neg
    if step == "sigmoid":
        return (loss, n_pos, n_neg, kernel.idx, kernel.s, p, w / m_safe, pos_idx, g_pos[mine])
    A, B, ref = kernel.coefficients(w / m_safe, g_pos, bad)
    return loss, n_pos, n_neg, kernel.k, A, B, ref


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positives_static(x, t, bound):
    """(positive scores in ``bound`` slots, +inf after the m-th; m as a 0-dim tensor)."""
    slots = torch.zeros(bound + 1, dtype=_F64, device=x.device)  # the last: overflow
    m = torch.zeros((), dtype=torch.int32, device=x.device)
    for i in range(0, x.numel(), _CHUNK):
        pos = t[i : i + _CHUNK] == 1
        r = torch.cumsum(pos, 0, dtype=torch.int32) + m
        slot = torch.where(pos, (r - 1).clamp_max(bound), bound)
        slots.index_add_(0, slot, torch.where(pos, x[i : i + _CHUNK].double(), 0.0))
        m = r[-1]
    p = torch.where(torch.arange(bound, device=x.device) < m, slots[:-1], math.inf)
    return p, m


def _two_sum(a, b):
    """(fl(a + b), exact error): a + b == s + e exactly (Knuth's TwoSum, float64)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _round_up(r, e, dtype, strict=False):
    """Smallest value of ``dtype`` >= (> if ``strict``) the exact ``r + e``, as float64."""
    c = r.to(dtype)
    up = torch.nextafter(c, torch.full_like(c, math.inf))
    d = c.double() - r  # exact
    return torch.where(d <= e if strict else d < e, up, c).double()


def _as_dtype(v, dtype):
    """The Python float ``v`` rounded to ``dtype`` (float32 or float64), on the host."""
    return float(torch.tensor(v, dtype=dtype))


def _count(k, n):
    """bincount(k, minlength=n) for 0 <= k < n without a host read."""
    ones = torch.ones(1, dtype=torch.int64, device=k.device).expand(k.numel())
    return torch.zeros(n, dtype=torch.int64, device=k.device).index_add_(0, k, ones)


def _exclusive_cumsum(x):
    """[0, x0, x0+x1, ...] (length len(x) + 1), float64."""
    return torch.nn.functional.pad(torch.cumsum(x.double(), 0), (1, 0))


class _Piecewise:
    """Linear (Eq. 21) and Heaviside (Eq. 4) steps through the positives' breakpoints.

    ``p``: the positives' scores, float64, ascending; with ``valid`` (sync-free) the slots
    after the m-th hold +inf and are masked out. Segment ``k`` (0..2M) holds the entries with
    ``k`` breakpoints ``<= s``; rows ``2M + 1`` (dummy: ignored entries) and ``2M + 2 + r``
    (the positive of rank ``r``) follow in the coefficient tables."""

    def __init__(self, p, valid, delta, linear, cd):
        self.linear, self.f0, self.delta, self.cd = linear, 0.5 if linear else 1.0, delta, cd
        self.valid, self.m = valid, p.numel()
        pf = p if valid is None else torch.where(valid, p, 0.0)
        lower = _round_up(*_two_sum(pf, torch.full_like(pf, -delta)), cd)
        upper = _round_up(*_two_sum(pf, torch.full_like(pf, delta)), cd, True) if linear else pf
        if valid is not None:
            lower, upper = (torch.where(valid, v, math.inf) for v in (lower, upper))
        m, dev = p.numel(), p.device
        c, border = torch.sort(torch.cat([lower, upper]), stable=True)
        position = torch.empty_like(border).scatter_(0, border, torch.arange(2 * m, device=dev))
        self.pos_lo, self.pos_hi = position[:m] + 1, position[m:] + 1  # segments after them
        self.p, self.c, self.border = p, c, border
        self.dummy = 2 * m + 1
        # open windows per segment (+1 at a lower breakpoint, -1 at an upper one)
        ev = torch.where(border < m, 1, -1)
        n_open = torch.nn.functional.pad(torch.cumsum(ev, 0), (1, 0))
        self.open = n_open > 0
        # clusters of overlapping windows start at a lower breakpoint with none open before;
        # the cluster's reference is that breakpoint (a local origin: sums never cancel)
        start = (ev > 0) & (n_open[:-1] == 0)
        first = torch.where(start, torch.arange(2 * m, device=dev), 0)
        r_bp = c[torch.cummax(first, 0).values]
        ref = torch.nn.functional.pad(c, (1, 0))
        r_seg = torch.nn.functional.pad(r_bp, (1, 0))
        finite = self.open & torch.isfinite(ref) & torch.isfinite(r_seg)
        self.ref = torch.where(finite, ref, 0.0)  # segments past +inf hold no entry
        self.r_seg = torch.where(finite, r_seg, 0.0)
        self.r_pos = r_bp[position[:m]]

    def locate_sync_free(self, x, t, rank):
        """The row (int32) of every entry into ``self.k``, no host read: negatives by the
        breakpoints (a grid, its ambiguous cells searched), positives to their own rows,
        ignored entries to the dummy row. ``rank``: of each positive slot."""
        self.x, c_cd, nb = x, self.c.to(self.cd), 2 * self.m
        cells = min(max(64, _GRID_CELLS_PER_BREAKPOINT * nb), _GRID_MAX_CELLS, max(64, x.numel()))
        lo = self.c[0]
        hi = torch.where(torch.isfinite(self.c), self.c, lo).max()
        lo = torch.where(torch.isfinite(lo), lo, 0.0)
        inv = cells / (hi - lo)
        inv = torch.where(torch.isfinite(inv), inv, 1.0).clamp(1e-30, 1e30).to(self.cd)
        lo = lo.to(self.cd)
        table = _grid_table(c_cd, lo, inv, cells)
        rows = torch.cat([self.dummy + 1 + rank, rank.new_full((1,), self.dummy)]).int()
        k = torch.empty(x.numel(), dtype=torch.int32, device=x.device)
        before = torch.zeros((), dtype=torch.int32, device=x.device)
        for i in range(0, x.numel(), _CHUNK):
            xs, ts = x[i : i + _CHUNK], t[i : i + _CHUNK]
            cell = _cells(xs, lo, inv, cells).nan_to_num_().to(torch.int32)
            kk = table.index_select(0, cell)
            amb = kk < 0
            found = torch.searchsorted(c_cd, torch.where(amb, xs, -math.inf), right=True,
                                       out_int32=True)
            r = torch.cumsum(ts == 1, 0, dtype=torch.int32) + before
            before = r[-1]
            positive = rows.index_select(0, (r - 1).clamp(0, self.m))
            k[i : i + _CHUNK] = torch.where(ts == 0, torch.where(amb, found, kk),
                                            torch.where(ts == 1, positive, self.dummy))
        self.k, self.direct = k, False

    def locate_grid(self, x, t, pos_idx, mine):
        """As :meth:`locate_sync_free`, with host reads: one sizes the grid and tells whether
        raw sums are exact enough, one ``nonzero`` finds the ambiguous entries."""
        self.x, c_cd, nb = x, self.c.to(self.cd), 2 * self.m
        finite = torch.where(torch.isfinite(self.c), self.c, self.c[0])
        lo, hi, scale = torch.stack([self.c[0], finite.max(), self.c.abs().max()]).tolist()
        self.direct = scale <= 2.0**12 * self.delta
        cells = min(max(64, _GRID_CELLS_PER_BREAKPOINT * nb), _GRID_MAX_CELLS)
        inv = _as_dtype(cells / (hi - lo), self.cd) if hi > lo else 0.0
        if math.isfinite(inv) and inv > 0:
            lo = _as_dtype(lo, self.cd)
            table = _grid_table(c_cd, lo, inv, cells)
            k = torch.empty(x.numel(), dtype=torch.int32, device=x.device)
            for i in range(0, x.numel(), _CHUNK):
                torch.index_select(table, 0, _cells(x[i : i + _CHUNK], lo, inv, cells).int(),
                                   out=k[i : i + _CHUNK])
            amb = torch.nonzero(k < 0).squeeze(1)
            if amb.numel():
                k.index_copy_(0, amb, torch.searchsorted(c_cd, x.index_select(0, amb),
                                                         right=True, out_int32=True))
        else:  # all breakpoints equal, or a range the dtype cannot scale
            k = torch.searchsorted(c_cd, x, right=True, out_int32=True)
        k.masked_fill_(t != 0, self.dummy)
        k.index_copy_(0, pos_idx, (self.dummy + 1 + mine).int())
        self.k = k

    def _ref_rows(self):
        """ref per row of the tables (segments, dummy, positives)."""
        return torch.nn.functional.pad(self.ref, (0, 1 + self.m))

    def negative_sums(self):
        """(b_i of each positive over this process's negatives, |N^| as a 0-dim tensor)."""
        rows = 2 * self.m + 2 + self.m
        count = _count(self.k, rows).double()
        local = torch.zeros(rows, dtype=_F64, device=self.k.device)
        if self.linear:
            ref = self._ref_rows()
            for i in range(0, self.k.numel(), _CHUNK):
                ks = self.k[i : i + _CHUNK]
                xs = self.x[i : i + _CHUNK].double()
                local.index_add_(0, ks, xs if self.direct else xs - ref.index_select(0, ks))
            if self.direct:
                local = local - count * ref
        self.count = count[: self.dummy]
        self.n_all = self.count.sum().long()  # every negative (AUC's |N|)
        return self._sums(self.count, local[: self.dummy]), self.count[1:].sum().long()

    def positive_sums(self):
        """sum_k f(p_k - p_i) over all positives k (self included)."""
        k = torch.searchsorted(self.c.to(self.cd), self.p.to(self.cd), right=True)
        if self.valid is not None:
            k = torch.where(self.valid, k, self.dummy)
        count = _count(k, self.dummy + 1).double()
        local = torch.zeros(self.dummy + 1, dtype=_F64, device=k.device).index_add_(
            0, k, torch.where(k < self.dummy, self.p - self.ref[k.clamp_max(self.dummy - 1)], 0.0))
        return self._sums(count[:-1], local[:-1])

    def _sums(self, count, local):
        """sum_j f(q_j - p_i) for each positive i from per-segment counts and sums of
        (q - ref_k)."""
        lo, hi = self.pos_lo, self.pos_hi
        cc = _exclusive_cumsum(count)
        above = cc[-1] - cc[hi]
        if not self.linear:
            return above
        e = torch.where(self.open, local + count * (self.ref - self.r_seg), 0.0)
        ce = _exclusive_cumsum(e)
        n_win = cc[hi] - cc[lo]
        s_win = (ce[hi] - ce[lo]) - (self.p - self.r_pos) * n_win
        return above + s_win / (2 * self.delta) + 0.5 * n_win

    def coefficients(self, w, g_pos, bad):
        """Tables (A, B, ref) over the rows: the gradient of an entry in row k is
        A_k + B_k (x - ref_k); positives' rows hold their gradient in A."""
        keep = (lambda v: v) if self.valid is None else (lambda v: torch.where(self.valid, v, 0.0))
        zeros = torch.zeros_like(w)
        U = _exclusive_cumsum(torch.cat([zeros, w])[self.border])  # passed upper breakpoints
        if self.linear:
            W = _exclusive_cumsum(torch.cat([w, -w])[self.border])
            W = torch.where(self.open, W.clamp_min(0), 0.0)
            wp = keep(w * (self.p - self.r_pos))
            Q = _exclusive_cumsum(torch.cat([wp, -wp])[self.border])
            A = U + 0.5 * W + (W * (self.ref - self.r_seg) - Q) / (2 * self.delta)
            A = torch.where(self.open, A.clamp_min(0), U)
            B = W / (2 * self.delta)
        else:
            A, B = U, torch.zeros_like(U)
        pad = torch.zeros(1, dtype=_F64, device=w.device)
        A = torch.cat([A, pad, keep(g_pos)])
        if bad is not None:
            A = torch.where(bad, math.nan, A)
        return A, torch.cat([B, pad, torch.zeros_like(w)]), self._ref_rows()

    @staticmethod
    def evaluate(x, linear, go, k, A, B, ref):
        cd = x.dtype
        A_t, B_t, R_t = (A * go).to(cd), (B * go).to(cd), ref.to(cd)
        out = torch.empty(x.numel(), dtype=cd, device=x.device)
        for i in range(0, x.numel(), _CHUNK):  # chunks: temporaries stay small
            ks, o = k[i : i + _CHUNK], out[i : i + _CHUNK]
            torch.index_select(A_t, 0, ks, out=o)
            if linear:
                d = R_t.index_select(0, ks)
                o.addcmul_(B_t.index_select(0, ks), torch.sub(x[i : i + _CHUNK], d, out=d))
        return out


def _cells(v, lo, inv, cells):
    """Uniform-grid cell of each value, as float (monotone in ``v``: the same ops for the
    breakpoints and the entries, exact IEEE operations in their dtype)."""
    return torch.sub(v, lo).mul_(inv).clamp_(0, cells - 1)


def _grid_table(c, lo, inv, cells):
    """int32 per cell: the breakpoints in lower cells, or -1 where the cell holds one (then
    the entry's segment is searched)."""
    occupied = _count(_cells(c, lo, inv, cells).long(), cells)
    below = torch.nn.functional.pad(torch.cumsum(occupied[:-1], 0), (1, 0))
    return torch.where(occupied > 0, -1, below).to(torch.int32)


class _Sigmoid:
    """f(x) = 1 / (1 + exp(-x / k)) (Eq. 54) over all negatives, in float64 chunks of at most
    SIGMOID_CHUNK_BYTES: O(|P| (|P| + |N|)) time."""

    f0 = 0.5

    def __init__(self, p, k, x, t, delta):
        self.p, self.k, neg = p, k, t == 0
        self.n_all, self.n_nontrivial = neg.sum(), (neg & (x.double() >= p[0] - delta)).sum()
        self.idx = torch.nonzero(neg).squeeze(1)
        self.s = x.index_select(0, self.idx).double()

    @staticmethod
    def _acc(q, p, k, w=None):
        """sum_j f(q_j - p_i) per positive i, or with ``w`` sum_i w_i f(q_j - p_i) per q_j."""
        rows, total, parts = max(1, SIGMOID_CHUNK_BYTES // (3 * 8 * max(1, p.numel()))), 0, []
        for c in torch.split(q, rows):
            f = torch.sigmoid((c[:, None] - p[None, :]) / k)
            if w is None:
                total = total + f.sum(0)
            else:
                parts.append(f @ w)
        if w is None:
            return total + torch.zeros_like(p)
        return torch.cat(parts) if parts else q

    def negative_sums(self):
        return self._acc(self.s, self.p, self.k), self.n_nontrivial

    def positive_sums(self):
        return self._acc(self.p, self.p, self.k)

    @staticmethod
    def evaluate(x, k, go, idx, s, p, w, pos_idx, g_pos):
        flat = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
        flat.index_copy_(0, idx, (_Sigmoid._acc(s, p, k, w) * go).to(x.dtype))
        return flat.index_copy_(0, pos_idx, (g_pos * go).to(x.dtype))
