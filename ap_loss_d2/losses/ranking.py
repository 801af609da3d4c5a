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

For the linear and Heaviside steps, negatives below ``min_P s - delta`` contribute exactly 0, so
``N^`` changes nothing but the work. The sigmoid step (Eq. 54) is non-zero everywhere: it sums
over **all** negatives.

Two kernels, one result
-----------------------
Both compute the same exact values (every oracle test runs on both, extreme logits included);
they differ in how they find the entries near the positives.

* ``"grid"`` (CPU eager): the positives are gathered (``nonzero``), their breakpoints index a
  uniform look-up grid sized on the host, and every entry gets its segment from one table
  look-up. ``O(|N| + (|P| + |N_amb|) log |P|)``, 4 host reads per call (see below), which cost
  nothing on a CPU.
* ``"sorted"`` (CUDA and other accelerators, and inside ``torch.compile``): no host
  synchronisation and only fixed-size work. All entries are sorted once; every breakpoint
  search is a ``searchsorted`` into the sorted scores and every per-positive or per-entry sum a
  difference of two prefix sums over the sorted order. ``O(n log n)`` for ``n`` entries, a
  static graph: it compiles with ``torch.compile(fullgraph=True)`` and can be captured in a
  CUDA graph.

``"auto"`` (the default) picks ``"sorted"`` when the logits are not on the CPU or when
``torch.compiler.is_compiling()``, else ``"grid"``. :func:`ranking_kernel` forces one kernel
for a block of code (``with ranking_kernel("sorted"): ...``). The sigmoid step and ranking
across processes (``process_group`` with more than one process) always use the grid code,
which reads counts on the host.

How the grid kernel is fast and exact at once
---------------------------------------------
For the linear and Heaviside steps, ``f(s - p_i)`` is piecewise linear in ``s``. Each positive
has two breakpoints, rounded *outwards* to the compute dtype (float32 for float16/bfloat16/
float32 logits, float64 for float64 logits) so that "``s`` has passed the breakpoint" is one
exact comparison ``s >= c`` in that dtype: lower ``c = ceil(p_i - delta)``; upper: linear
``s > p_i + delta`` (the smallest value above it), Heaviside ``s >= p_i``. Then

* every entry needs only its segment index ``k`` = number of breakpoints ``<= s``: a uniform
  grid over the breakpoints gives it by one table look-up (cells holding a breakpoint fall back
  to a binary search, ~1/256 of the entries);
* non-negatives are sent to a dummy segment, so one ``index_add_`` gives per-segment counts and
  a second (float64, in chunks) the per-segment score sums; ``b_i`` are window sums of these;
* the gradient of a negative in segment ``k`` is ``A_k + B_k (s - ref_k)`` with ``A_k, B_k >= 0``
  and ``ref_k`` the segment's left breakpoint: three table gathers and one multiply-add, with
  no cancellation (all terms are non-negative), evaluated in the backward.

The sorted kernel uses the same breakpoints (the same exact comparisons) and the same local
references; its gradient is computed in the forward and kept for the backward (one value per
entry in the compute dtype).

Extreme logits: all sums are taken relative to local references (the segment's left breakpoint
for the scores, the left end of each cluster of overlapping windows for the coefficients), never
as differences of global prefix sums of raw scores, and entries outside every window only count.
So every finite input is handled exactly, including ``+-3e38``, spreads of ``1e12`` and
``delta`` from ``1e-3`` to ``1e3`` (tested against the oracle).

Memory (grid kernel): 4 bytes per entry kept for the backward (the int32 segment indices) plus
O(|P|) tables; the element-wise passes run in chunks of 2**20 entries, so the peak extra memory
of forward + backward is ~2.3x the float32 logits, the 1x gradient included
(``python -m ap_loss_d2.benchmark``). The sorted kernel keeps the gradient (4 bytes per entry
for float32 logits) and holds float64/int32 arrays of ``n`` entries during the forward: about
200 bytes per entry at peak (52x the float32 logits, measured on CPU). The sigmoid step is
computed in chunks of negatives against all positives (``O(|P| |N|)``, chunk memory capped by
:data:`SIGMOID_CHUNK_BYTES`).

Precision, AMP
--------------
Sums are float64. The gradient is computed in float32 (float16/bfloat16/float32 logits) or
float64 (float64 logits), **multiplied by ``grad_output`` in that precision** (the loss scale of
a ``GradScaler`` included) and only then cast to the logits' dtype, so scaled float16 gradients
neither underflow nor overflow where the scaled float32 ones are representable. The loss value
is returned in float32 for float16/bfloat16 logits (in the logits' dtype otherwise).

Invalid inputs
--------------
Shapes, dtypes and devices are checked on every call (no host read). Values (NaN/Inf logits,
labels other than 1, 0, -1): the grid kernel reads them on the host with its first read and
raises :class:`NonFiniteLogitsError` / ``ValueError`` naming the count. The sorted kernel makes
no host read: invalid values turn the loss and every gradient entry into NaN on the device, so
Detectron2's trainer stops at its own non-finite loss check ("Loss became infinite or NaN"),
and ``GradScaler`` skips the step. :func:`validate_ranking_inputs` gives the detailed message
at the cost of one host read.

Autograd
--------
The backward is ``once_differentiable``: ``create_graph=True`` / double backward raises. Under
``torch.no_grad()``, ``torch.inference_mode()`` or when the logits do not require grad, only the
loss value is computed (no gradient kept). ``torch.func.vmap`` raises a clear error (all
entries are ranked together, there is no per-sample rule). ``torch.func.grad``/``jacrev`` raise
the same double-backward error.

Host synchronisations per call
------------------------------
Sorted kernel (linear/Heaviside step, one process): none, forward and backward.
Grid kernel (linear/Heaviside step, one process): 1 validation read (min/max of logits and
labels together), 1 ``nonzero`` for the positives, 1 read of the breakpoints' range (to size
the look-up grid), 1 ``nonzero`` for the entries in grid cells holding a breakpoint, plus 1
read of the negative count for AUC: 4 (AP), 5 (AUC); the backward adds none. The sigmoid step
has no grid: validation, the positives' ``nonzero`` and the negatives' ``nonzero``, 3 (AP), 4
(AUC). Ranking across processes adds the collectives of :mod:`ap_loss_d2.losses.distributed`.
"""
import contextlib
import math
import numbers
import struct
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "ap_loss",
    "auc_loss",
    "check_ranking_options",
    "validate_ranking_inputs",
    "ranking_kernel",
    "NonFiniteLogitsError",
    "STEPS",
    "KERNELS",
    "SIGMOID_CHUNK_BYTES",
]

STEPS = ("linear", "heaviside", "sigmoid")
#: Kernels :func:`ranking_kernel` accepts (see the module docstring).
KERNELS = ("auto", "grid", "sorted")
#: Cap on the temporary memory of one chunk of the sigmoid step (bytes).
SIGMOID_CHUNK_BYTES = 256 * 2**20
# Uniform grid cells per breakpoint for the segment look-up table, and the table's size cap.
_GRID_CELLS_PER_BREAKPOINT = 256
_GRID_MAX_CELLS = 2**21
# Entries per chunk of the element-wise passes (bounds their temporary memory).
_CHUNK = 2**20
_kernel = "auto"


class NonFiniteLogitsError(ValueError):
    """The logits given to a ranking loss hold NaN or Inf."""


@contextlib.contextmanager
def ranking_kernel(name: str):
    """Use kernel ``name`` (one of :data:`KERNELS`) for the linear and Heaviside steps of every
    ``ap_loss``/``auc_loss`` call in the block, in this process (all threads); the previous
    choice is restored on exit. ``"auto"``: sorted on accelerators and under
    ``torch.compile``, grid on the CPU otherwise."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"ranking kernel {name!r} is unknown; choose one of {KERNELS}")
    previous, _kernel = _kernel, name
    try:
        yield
    finally:
        _kernel = previous


def check_ranking_options(*, delta, step, sigmoid_k, interpolate=True):
    """Raise a TypeError (wrong type) or ValueError (bad value) naming the option and what is
    valid, unless the options of a ranking loss are valid: ``delta`` and ``sigmoid_k`` finite
    numbers > 0, ``step`` one of :data:`STEPS`, ``interpolate`` a bool."""
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
            bfloat16, float32 or float64, any device; any finite values.
        targets: same shape as ``logits``; 1 positive, 0 negative, -1 ignored (any int or
            float dtype).
        delta: width of the piecewise step (Eq. 21); negatives scoring below
            ``min(positive scores) - delta`` are trivial (no loss, zero gradient) for the
            linear and Heaviside steps.
        interpolate: use interpolated AP (Sec. 3.4.3).
        step: ``"linear"`` (Eq. 21), ``"heaviside"`` (Eq. 4) or ``"sigmoid"`` (Eq. 54, over
            all negatives).
        sigmoid_k: slope parameter ``k`` of the sigmoid step.
        stats: ``None`` or a dict, filled with ``num_pos`` and ``num_neg_nontrivial`` (``N^``
            as defined above; global when ranking across processes). Python ints on the CPU
            in eager mode; elsewhere 0-dim int64 tensors on the logits' device (no host read
            for them), except the grid kernel's ``num_pos``, which it reads anyway.
        process_group: a ``torch.distributed`` group to rank the entries of all its processes
            together (see :mod:`ap_loss_d2.losses.distributed`); ``None`` ranks locally.

    Returns:
        A 0-dim tensor: in the logits' dtype, float32 for float16/bfloat16 logits. Its
        backward gives the error-driven update (Eq. 9/14) of Algorithm 1 times the incoming
        gradient (computed in float32/float64, cast to the logits' dtype last). With no
        positives the loss is 0 and every gradient 0.

    Raises:
        TypeError / ValueError for invalid options (:func:`check_ranking_options`), a ``stats``
        that is not a dict, or inputs of the wrong shape, dtype or device; the grid kernel
        also for NaN/Inf logits and invalid labels (the sorted kernel returns NaN instead,
        see the module docstring).

    Complexity: see the module docstring.
    """
    opts = _Options(delta, interpolate, step, sigmoid_k, stats, process_group)
    return _apply(logits, targets, "ap", opts)


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
    negative ``j``: ``sum_i L'_ij / |P|``. Arguments, shapes, dtypes, errors and complexity as
    :func:`ap_loss` (there is no interpolation for AUC).
    """
    opts = _Options(delta, False, step, sigmoid_k, stats, process_group)
    return _apply(logits, targets, "auc", opts)


class _Options:
    def __init__(self, delta, interpolate, step, sigmoid_k, stats, process_group):
        check_ranking_options(delta=delta, step=step, sigmoid_k=sigmoid_k,
                              interpolate=interpolate)
        if stats is not None and not isinstance(stats, dict):
            raise TypeError(f"stats must be a dict (filled by the loss) or None, got "
                            f"{type(stats).__name__}")
        self.delta = float(delta)
        self.interpolate = interpolate
        self.step = step
        self.sigmoid_k = float(sigmoid_k)
        self.stats = stats
        self.process_group = process_group
        self.state = None  # forward -> setup_context hand-over (one call)


def _use_sorted(logits, opts):
    if opts.step == "sigmoid":
        return False
    if opts.process_group is not None:
        from .distributed import group_size

        if group_size(opts.process_group) > 1:
            return False
    if _kernel != "auto":
        return _kernel == "sorted"
    return logits.device.type != "cpu" or torch.compiler.is_compiling()


def _apply(logits, targets, kind, opts):
    _check_static(logits, targets)
    if _use_sorted(logits, opts):
        return _apply_sorted(logits, targets, kind, opts)
    targets = _validate(logits, targets)  # float labels come back as int8 codes
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = _RankingLoss.apply(logits, targets, kind, opts)
        n_pos, n_neg = opts.state["counts"]
    else:  # no_grad / inference_mode / constant logits: the value only
        loss, _, n_pos, n_neg = _forward(logits.detach(), targets.detach(), kind, opts, False)
    _fill_stats(opts, n_pos, n_neg)
    return loss


def _fill_stats(opts, n_pos, n_neg):
    if opts.stats is not None:
        opts.stats.update(num_pos=_count_value(n_pos), num_neg_nontrivial=_count_value(n_neg))


def _count_value(n):
    """A count as a Python int when that needs no device read, else a 0-dim int64 tensor."""
    if not isinstance(n, torch.Tensor):
        return int(n)
    if n.device.type == "cpu" and not torch.compiler.is_compiling():
        return int(n)
    return n.to(torch.int64)


class _RankingLoss(torch.autograd.Function):
    @staticmethod
    def forward(logits, targets, kind, opts):
        loss, state, n_pos, n_neg = _forward(logits.detach(), targets.detach(), kind, opts, True)
        state["counts"] = (n_pos, n_neg)
        opts.state = state
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _, _, opts = inputs
        state, opts.state = opts.state, {"counts": opts.state["counts"]}
        ctx.state = state
        ctx.logits_dtype = logits.dtype
        ctx.shape = logits.shape
        ctx.save_for_backward(logits)

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_double_backward()
        return _RankingLoss._backward_once(ctx, grad_output)

    @staticmethod
    @once_differentiable
    def _backward_once(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        grad = _backward(ctx.state, logits.detach(), grad_output)
        ctx.state = None
        return grad, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        _refuse_vmap()


def _refuse_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError(
            "ap_loss/auc_loss support no double backward: create_graph=True (e.g. for a "
            "gradient penalty) and torch.func.grad/jacrev would differentiate the "
            "error-driven update, which has no derivative here. Use loss.backward() or "
            "torch.autograd.grad without create_graph for the ranking loss."
        )


def _refuse_vmap():
    raise RuntimeError(
        "ap_loss/auc_loss do not support torch.func.vmap: all entries are ranked together "
        "(there is no per-sample rule). Call the loss once per sample in a Python loop, "
        "or once on the whole batch."
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def validate_ranking_inputs(logits, targets):
    """Raise a ValueError naming the problem unless ``logits``/``targets`` are valid inputs of a
    ranking loss: same shape and device, floating logits without NaN/Inf
    (:class:`NonFiniteLogitsError`, with their count), labels in {1, 0, -1}.

    One pass over each tensor (min/max) and one host read in the valid case."""
    _validate(logits, targets)


def _validate(logits, targets):
    """validate_ranking_inputs; returns the targets (float targets converted to int8)."""
    _check_static(logits, targets)
    if logits.numel() == 0:
        return targets
    try:
        return _check_values(logits, targets)
    except RuntimeError as e:  # functorch-wrapped tensors have no storage to read
        raise RuntimeError(
            "ap_loss/auc_loss need concrete tensors: they rank all entries together and read "
            "counts on the host, so torch.func transforms (vmap, grad, jacrev, ...) are not "
            "supported (for vmap there is no per-sample rule: all entries are ranked together). "
            "Call the loss on ordinary tensors and use loss.backward() / torch.autograd.grad."
        ) from e


def _check_static(logits, targets):
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
    if targets.dtype == torch.bool:
        raise ValueError("targets must hold 1 (positive), 0 (negative), -1 (ignored); got a bool tensor")
    if targets.is_complex():
        raise ValueError(f"targets must be an int or float tensor, got {targets.dtype}")


def _check_values(logits, targets):
    x = logits.detach()
    t = targets.detach()
    xmin, xmax = torch.aminmax(x)
    tmin, tmax = torch.aminmax(t)
    vals = [xmin.double(), xmax.double(), tmin.double(), tmax.double()]
    code = t
    if t.is_floating_point():
        # inside [-1, 1], labels other than -1, 0, 1 are those that do not survive the cast
        code = t.to(torch.int8)
        vals.append(torch.count_nonzero(code != t).double())
    vals = torch.stack(vals).tolist()  # the one host read
    if not (math.isfinite(vals[0]) and math.isfinite(vals[1])):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteLogitsError(f"{bad} of {x.numel()} logits are NaN or Inf")
    out_of_range = not (vals[2] >= -1 and vals[3] <= 1)
    if out_of_range or (len(vals) > 4 and vals[4] > 0):
        invalid = (t != 0) & (t != 1) & (t != -1)
        values = torch.unique(t[invalid])[:10].tolist()
        raise ValueError(
            f"targets must be 1 (positive), 0 (negative) or -1 (ignored); found "
            f"{int(invalid.sum())} other labels, e.g. {values}"
        )
    return code


# ---------------------------------------------------------------------------------------------
# Forward / backward
# ---------------------------------------------------------------------------------------------
def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _forward(logits, targets, kind, opts, need_grad):
    """(loss in the loss dtype, state for the backward or None, |P|, |N^|)."""
    from . import distributed as dist_utils

    group = opts.process_group
    cd = _compute_dtype(logits.dtype)
    x = logits.reshape(-1)
    if x.dtype != cd:
        x = x.to(cd)  # exact upcast of half precision
    t = targets.reshape(-1)
    if t.is_floating_point():
        t = t.to(torch.int8)  # validated: exactly -1, 0, 1
    out_dtype = _loss_dtype(logits.dtype)

    pos_idx = torch.nonzero(t == 1).squeeze(1)
    p_all, offset = dist_utils.gather_positive_scores(x[pos_idx].double(), group)
    m = p_all.numel()
    state = {"m": 0, "pos_idx": pos_idx}
    if m == 0:
        return torch.zeros((), dtype=out_dtype, device=x.device), state, 0, 0
    p, order = torch.sort(p_all, stable=True)
    # the positives of this process in the sorted order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(m, device=order.device)
    mine = inverse[offset : offset + pos_idx.numel()]

    if opts.step == "sigmoid":
        kernel = _SigmoidStep(p, opts, x, t)
    else:
        kernel = _PiecewiseStep(p, opts, x, t, cd)
    b, n_neg = kernel.negative_sums()
    b = dist_utils.all_reduce_sum(b, group)
    if opts.stats is not None:
        n_neg = dist_utils.all_reduce_sum(n_neg, group)

    if kind == "ap":
        a = (1.0 - kernel.f0) + kernel.positive_sums()
        denom = a + b
        prec = a / denom
        prec_interp = torch.cummax(prec, 0).values if opts.interpolate else prec
        scale = torch.where(prec < prec_interp, (1 - prec_interp) / (1 - prec), torch.ones_like(prec))
        w = scale / denom
        loss = 1 - prec_interp.mean()
        g_pos = -(1 - prec_interp) / m
    else:  # auc
        n_all_neg = dist_utils.all_reduce_count(int(kernel.num_all_negatives()), group, x.device)
        if n_all_neg == 0:
            w = torch.zeros_like(p)
            loss = torch.zeros((), dtype=torch.float64, device=x.device)
            g_pos = torch.zeros_like(p)
        else:
            w = torch.full_like(p, 1.0 / n_all_neg)
            loss = b.sum() / (n_all_neg * m)
            g_pos = -b / (n_all_neg * m)
    loss = loss.to(out_dtype)
    if not need_grad:
        return loss, None, m, n_neg
    state.update(m=m, kernel=kernel, coefficients=kernel.coefficients(w / m),
                 g_pos=g_pos[mine])
    return loss, state, m, n_neg


def _backward(state, logits, grad_output):
    cd = _compute_dtype(logits.dtype)
    go = grad_output.to(torch.float64)
    if state["m"] == 0:
        return torch.zeros_like(logits)
    flat = state["kernel"].evaluate(state["coefficients"], go)  # compute dtype, flat, x go
    pos_idx = state["pos_idx"]
    if pos_idx.numel():
        flat.index_copy_(0, pos_idx, (state["g_pos"] * go).to(cd))
    return flat.view(logits.shape).to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# Sorted kernel: no host synchronisation, fixed-size work
# ---------------------------------------------------------------------------------------------
def _apply_sorted(logits, targets, kind, opts):
    # through the Function even without gradient: torch.func.vmap then raises its clear error
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, n_pos, n_neg = _SortedRankingLoss.apply(logits, targets, kind, opts.delta,
                                                     opts.interpolate, opts.step == "linear",
                                                     need_grad)
    _fill_stats(opts, n_pos, n_neg)
    return loss


class _SortedRankingLoss(torch.autograd.Function):
    @staticmethod
    def forward(logits, targets, kind, delta, interpolate, linear, need_grad):
        return _sorted_forward(logits.detach(), targets.detach(), kind, delta, interpolate,
                               linear, need_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad, n_pos, n_neg = output
        ctx.mark_non_differentiable(*(o for o in (grad, n_pos, n_neg) if o is not None))
        ctx.save_for_backward(grad)
        ctx.logits_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad_output, *_):
        _refuse_double_backward()
        (grad,) = ctx.saved_tensors
        return ((grad * grad_output.to(grad.dtype)).to(ctx.logits_dtype),) + (None,) * 6

    @staticmethod
    def vmap(info, in_dims, *args):
        _refuse_vmap()


def _exclusive_prefix(x):
    """[0, x0, x0+x1, ...] (length len(x) + 1), in x's dtype."""
    return torch.nn.functional.pad(torch.cumsum(x, 0), (1, 0))


def _sorted_forward(logits, targets, kind, delta, interpolate, linear, need_grad):
    """(loss, gradient in the compute dtype with the logits' shape or None, |P|, |N^|), the
    counts as 0-dim int64 tensors; no host read. Linear/Heaviside steps.

    Shapes: logits, targets (*) (any, same); n = logits.numel(). Positions below refer to the
    ascending order of the scores; every array is of size n or n + 1 (prefix sums)."""
    cd = _compute_dtype(logits.dtype)
    out_dtype = _loss_dtype(logits.dtype)
    f64, device = torch.float64, logits.device
    if logits.numel() == 0:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        grad = torch.zeros(logits.shape, dtype=cd, device=device) if need_grad else None
        return torch.zeros((), dtype=out_dtype, device=device), grad, zero, zero
    x = logits.reshape(-1).to(cd)  # exact upcast of half precision
    t = targets.reshape(-1)
    code = t.to(torch.int8)
    # invalid values poison the result instead of a host read (module docstring)
    bad = (~torch.isfinite(x)).any() | (t < -1).any() | (t > 1).any()
    if t.is_floating_point():
        bad = bad | (code != t).any()

    v, perm = torch.sort(x)
    label = code[perm]
    pos, neg = label == 1, label == 0
    vd = v.to(f64)
    zero, ninf = 0.0, -math.inf  # where() fill values
    count_pos = _exclusive_prefix(pos.to(f64))  # positives before each position
    count_neg = _exclusive_prefix(neg.to(f64))
    m = count_pos[-1]
    m_safe = m.clamp_min(1)
    # breakpoints of every position (used where it holds a positive), exact in the compute dtype
    lower = _round_up(*_two_sum(vd, -delta), cd)
    upper = _round_above(*_two_sum(vd, delta), cd) if linear else vd
    # per position: the breakpoints of the last positive at or before it (non-decreasing)
    upper_fill = torch.cummax(torch.where(pos, upper, ninf), 0).values
    # queries per entry: #positives whose upper (lower) breakpoint it has passed, as positions
    q_up = torch.searchsorted(upper_fill.to(cd), v, right=True, out_int32=True)
    # queries per positive: the first positions at or above its breakpoints
    hi = torch.searchsorted(v, upper.to(cd), out_int32=True)
    del upper
    if linear:
        lower_fill = torch.cummax(torch.where(pos, lower, ninf), 0).values
        q_low = torch.searchsorted(lower_fill.to(cd), v, right=True, out_int32=True)
        del lower_fill
        inside = count_pos[q_low] > count_pos[q_up]  # inside some positive's window
        # clusters of overlapping windows; reference: the lower breakpoint of the first one
        prev_upper = torch.nn.functional.pad(upper_fill[:-1], (1, 0), value=ninf)
        start = pos & (lower >= prev_upper)
        del prev_upper
        ref_fill = torch.cummax(torch.where(start, lower, ninf), 0).values
        ref = torch.where(inside, ref_fill[(q_low - 1).clamp_min(0)], zero)
        local = torch.where(inside, vd - ref, zero)  # entry relative to its cluster
        del ref
        local_pos = torch.where(pos, vd - ref_fill, zero)  # positive relative to its cluster
        del ref_fill
        lo = torch.searchsorted(v, lower.to(cd), out_int32=True)
    del upper_fill

    def sums(counts, mask):
        """sum over the entries of ``mask`` of f(s - p) for the positive p at each position."""
        above = counts[-1] - counts[hi]
        if not linear:
            return above
        e = _exclusive_prefix(torch.where(mask, local, zero))
        n_win = counts[hi] - counts[lo]
        s_win = (e[hi] - e[lo]) - local_pos * n_win
        return above + s_win / (2 * delta) + 0.5 * n_win

    b = sums(count_neg, neg)
    if kind == "ap":
        f0 = 0.5 if linear else 1.0
        a = (1.0 - f0) + sums(count_pos, pos)
        denom = torch.where(pos, a + b, 1.0)
        prec = torch.where(pos, a / denom, zero)
        prec_interp = torch.cummax(prec, 0).values if interpolate else prec
        loss = torch.where(pos, 1 - prec_interp, zero).sum() / m_safe
        scale = torch.where(prec < prec_interp, (1 - prec_interp) / (1 - prec), 1.0)
        w = torch.where(pos, scale / denom, zero)
        g_pos = -(1 - prec_interp) / m_safe
    else:
        n_all = count_neg[-1]
        n_all_safe = n_all.clamp_min(1)
        b = torch.where(pos & (n_all > 0), b, zero)
        w = torch.where(pos, 1.0 / n_all_safe, zero)
        loss = b.sum() / (n_all_safe * m_safe)
        g_pos = -b / (n_all_safe * m_safe)
    lowest = torch.where(pos, lower, math.inf).min()
    del lower
    n_neg = (neg & (vd >= lowest)).sum()
    nan = torch.full((), math.nan, dtype=f64, device=device)
    loss = torch.where(bad, nan, loss).to(out_dtype)
    if not need_grad:
        return loss, None, m.to(torch.int64), n_neg
    # gradient of a negative: sum_i w_i f(s - p_i) / |P|, over the passed and the open windows
    cum_w = _exclusive_prefix(w)
    g = cum_w[q_up]
    if linear:
        cum_wp = _exclusive_prefix(w * local_pos)
        w_open = cum_w[q_low] - g
        win = 0.5 * w_open + (local * w_open - (cum_wp[q_low] - cum_wp[q_up])) / (2 * delta)
        g = g + torch.where(inside, win.clamp_min(0), zero)
    g = torch.where(neg, g / m_safe, torch.where(pos, g_pos, zero))
    g = torch.where(bad, nan, g).to(cd)
    grad = torch.empty_like(g).scatter_(0, perm, g).view(logits.shape)
    return loss, grad, m.to(torch.int64), n_neg


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def _two_sum(a, b):
    """(fl(a + b), exact error): a + b == s + e exactly (Knuth's TwoSum, float64)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _round_up(r, e, dtype):
    """Smallest value of ``dtype`` >= the exact ``r + e`` (float64 pair from _two_sum)."""
    c = r.to(dtype)
    up = torch.nextafter(c, torch.full_like(c, math.inf))
    # c - r is exact (c is r rounded to dtype, or r itself)
    return torch.where(c.double() - r < e, up, c).double()


def _round_above(r, e, dtype):
    """Smallest value of ``dtype`` > the exact ``r + e``."""
    c = r.to(dtype)
    up = torch.nextafter(c, torch.full_like(c, math.inf))
    return torch.where(c.double() - r <= e, up, c).double()


def _as_dtype(v, dtype):
    """The Python float ``v`` rounded to ``dtype`` (float32 or float64), on the host."""
    if dtype == torch.float64:
        return float(v)
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.inf


def _count(k, n):
    """bincount(k, minlength=n) for 0 <= k < n, without bincount's min/max pass."""
    ones = torch.ones(1, dtype=torch.int64, device=k.device).expand(k.numel())
    return torch.zeros(n, dtype=torch.int64, device=k.device).index_add_(0, k, ones)


def _exclusive_cumsum(x):
    """[0, x0, x0+x1, ...] (length len(x) + 1), float64 accumulation."""
    out = torch.zeros(x.numel() + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(x.double(), 0, out=out[1:])
    return out


class _SegmentIndex:
    """Exact ``#{c <= q}`` (sorted breakpoints ``c`` in the queries' dtype) for many queries.

    A uniform grid: the cell of a value is ``trunc(clamp((v - lo) * inv_w, 0, cells - 1))``,
    computed with the same (monotone) float ops for breakpoints and queries. A query in a cell
    without breakpoint takes the number of breakpoints in lower cells from a table; the others
    are binary-searched (one ``nonzero``).
    """

    def __init__(self, c, lo, hi):
        self.c = c
        self.table = None
        n = c.numel()
        span = hi - lo
        if not (math.isfinite(span) and span > 0):
            return
        cells = min(max(64, _GRID_CELLS_PER_BREAKPOINT * n), _GRID_MAX_CELLS)
        inv_w = cells / span
        # rounded to the query dtype once, so that every op below is an exact IEEE op there
        lo_t, inv_t = _as_dtype(lo, c.dtype), _as_dtype(inv_w, c.dtype)
        if not (math.isfinite(inv_t) and inv_t > 0):
            return
        self.lo, self.inv_w, self.cells = lo_t, inv_t, cells
        cell_of_c = self._cells(c).long()
        occupied = torch.bincount(cell_of_c, minlength=cells)
        below = torch.zeros(cells, dtype=torch.int64, device=c.device)
        torch.cumsum(occupied[:-1], 0, out=below[1:])
        table = torch.where(occupied > 0, torch.full_like(below, -1), below)
        self.table = table.to(torch.int32)

    def _cells(self, v):
        u = torch.sub(v, self.lo)
        u.mul_(self.inv_w).clamp_(0, self.cells - 1)
        return u.to(torch.int32)

    def __call__(self, q):
        """int32 segment index of each query (in chunks: small temporaries)."""
        if self.table is None:
            return torch.searchsorted(self.c, q, right=True, out_int32=True)
        k = torch.empty(q.numel(), dtype=torch.int32, device=q.device)
        for i in range(0, q.numel(), _CHUNK):
            torch.index_select(self.table, 0, self._cells(q[i : i + _CHUNK]), out=k[i : i + _CHUNK])
        amb = torch.nonzero(k < 0).squeeze(1)
        if amb.numel():
            k.index_copy_(0, amb, torch.searchsorted(self.c, q.index_select(0, amb), right=True,
                                                     out_int32=True))
        return k


class _PiecewiseStep:
    """Linear (Eq. 21) and Heaviside (Eq. 4) steps: every entry ranked through its segment."""

    def __init__(self, p, opts, x, t, cd):
        self.linear = opts.step == "linear"
        self.f0 = 0.5 if self.linear else 1.0
        self.delta = opts.delta
        self.p, self.m, self.x, self.cd = p, p.numel(), x, cd
        m, delta = self.m, opts.delta
        # breakpoints: "passed" <=> x >= c (exact comparisons in the compute dtype)
        # outward rounding of the exact p - delta, p + delta (float64 TwoSum, then the dtype)
        lower = _round_up(*_two_sum(p, torch.full_like(p, -delta)), cd)
        upper = (_round_above(*_two_sum(p, torch.full_like(p, delta)), cd) if self.linear
                 else _round_up(p, torch.zeros_like(p), cd))
        c, border = torch.sort(torch.cat([lower, upper]), stable=True)
        position = torch.empty_like(border)
        position[border] = torch.arange(2 * m, device=p.device)
        self.pos_lo, self.pos_hi = position[:m], position[m:]
        self.c, self.border = c, border
        nb = 2 * m
        self.num_segments = nb + 1
        self.dummy = nb + 1
        # segment k >= 1 has left breakpoint c[k - 1]; open windows: +1 at lower, -1 at upper
        ev = torch.cat([torch.ones(m, dtype=torch.int64, device=p.device),
                        -torch.ones(m, dtype=torch.int64, device=p.device)])[border]
        n_open = torch.cumsum(ev, 0)  # open windows in segment k + 1
        self.open = torch.cat([n_open.new_zeros(1), n_open]) > 0  # per segment 0..nb
        # clusters of overlapping windows: each starts at a lower breakpoint with 0 open before
        start = (ev > 0) & (torch.cat([n_open.new_zeros(1), n_open[:-1]]) == 0)
        # cluster reference of each breakpoint: c at the latest start (no boolean indexing:
        # that would be a host synchronisation)
        first = torch.where(start, torch.arange(nb, device=p.device), torch.zeros_like(border))
        self.R_bp = c[torch.cummax(first, 0).values]
        self.ref = torch.cat([torch.zeros(1, dtype=torch.float64, device=p.device), c])  # per seg
        self.R_seg = torch.cat([torch.zeros(1, dtype=torch.float64, device=p.device), self.R_bp])
        self.R_seg = torch.where(self.open, self.R_seg, torch.zeros_like(self.R_seg))
        # cluster reference of each positive's window
        self.R_pos = self.R_bp[self.pos_lo]

        # one host read: the grid's range and the breakpoints' magnitude
        lo_c, hi_c, self.scale = torch.stack([c[0], c[-1], c.abs().max()]).tolist()
        # segment of every entry; non-negatives go to the dummy segment
        c_cd = c.to(cd)
        self.c_cd = c_cd
        k = _SegmentIndex(c_cd, lo_c, hi_c)(x)
        k.masked_fill_(t != 0, self.dummy)
        self.k = k

    # -- per-positive sums --------------------------------------------------------------------
    def _sums(self, count, local_sum):
        """sum_j f(q_j - p_i) for each positive from per-segment counts and sums of
        (q - ref_k) (segments 0..nb)."""
        lo, hi = self.pos_lo + 1, self.pos_hi + 1
        cc = _exclusive_cumsum(count)
        above = cc[-1] - cc[hi]
        if not self.linear:
            return above
        # E_k = sum_j (q_j - R_c) over open segments (relative to the cluster reference)
        e = torch.where(self.open, local_sum + count * (self.ref - self.R_seg),
                        torch.zeros_like(local_sum))
        ce = _exclusive_cumsum(e)
        n_win = cc[hi] - cc[lo]
        s_win = (ce[hi] - ce[lo]) - (self.p - self.R_pos) * n_win
        return above + s_win / (2 * self.delta) + 0.5 * n_win

    def negative_sums(self):
        """(b_i for each positive over this process's negatives, |N^| (0-dim tensor))."""
        nseg = self.num_segments + 1  # + dummy
        count = _count(self.k, nseg).double()
        self.count = count
        if self.linear:
            local = self._local_sums(nseg)
        else:
            local = torch.zeros_like(count)
        b = self._sums(count[:-1], local[:-1])
        n_neg = count[1:-1].sum()
        return b, n_neg

    def _local_sums(self, nseg):
        """Per segment, sum of (x - ref_k) over its entries, float64 and exact to rounding."""
        x, k = self.x, self.k
        ref = torch.where(self.open, self.ref, torch.zeros_like(self.ref))
        ref_d = torch.cat([ref, ref.new_zeros(1)])
        # raw sums are exact enough when every open segment's values are small relative to
        # delta (|x| <= 2**12 delta): then only the per-segment subtraction follows
        direct = self.scale <= 2.0**12 * self.delta
        out = torch.zeros(nseg, dtype=torch.float64, device=x.device)
        for i in range(0, x.numel(), _CHUNK):
            xs = x[i : i + _CHUNK].double()  # (the logits themselves when float64)
            ks = k[i : i + _CHUNK]
            if not direct:
                xs = xs - ref_d.index_select(0, ks)  # never in place
            out.index_add_(0, ks, xs)
        if direct:
            out -= self.count * ref_d
        return out

    def num_all_negatives(self):
        return self.count[:-1].sum()

    def positive_sums(self):
        """sum_k f(p_k - p_i) over all positives k (self included)."""
        q = self.p.to(self.cd)  # exact: the positives are values of the compute dtype
        k = torch.searchsorted(self.c_cd, q, right=True)
        nseg = self.num_segments
        count = torch.bincount(k, minlength=nseg).double()
        local = torch.bincount(k, weights=self.p - self.ref[k], minlength=nseg)
        return self._sums(count, local)

    # -- gradient ------------------------------------------------------------------------------
    def coefficients(self, w):
        """Per segment (and the dummy): A_k, B_k, ref_k with gradient A_k + B_k (x - ref_k)."""
        m = self.m
        zeros = torch.zeros_like(w)
        # passed upper breakpoints: + w_i
        U = _exclusive_cumsum(torch.cat([zeros, w])[self.border])
        if self.linear:
            two_d = 2 * self.delta
            W = _exclusive_cumsum(torch.cat([w, -w])[self.border])
            W = torch.where(self.open, W.clamp_min(0), torch.zeros_like(W))
            wp = w * (self.p - self.R_pos)
            Q = _exclusive_cumsum(torch.cat([wp, -wp])[self.border])
            O = W * (self.ref - self.R_seg) - Q  # sum_open w_i (ref_k - p_i)
            A = U + 0.5 * W + O / two_d
            A = torch.where(self.open, A.clamp_min(0), U)
            B = W / two_d
        else:
            A, B = U, torch.zeros_like(U)
        ref = torch.where(self.open, self.ref, torch.zeros_like(self.ref)) if self.linear \
            else torch.zeros_like(self.ref)
        pad = torch.zeros(1, dtype=torch.float64, device=w.device)
        del m
        return torch.cat([A, pad]), torch.cat([B, pad]), torch.cat([ref, pad])

    def evaluate(self, coefficients, go):
        A, B, ref = coefficients
        cd, k, x = self.cd, self.k, self.x
        A_t = (A * go).to(cd)
        B_t, R_t = (B * go).to(cd), ref.to(cd)
        out = torch.empty(x.numel(), dtype=cd, device=x.device)
        for i in range(0, x.numel(), _CHUNK):  # chunks: temporaries stay small
            ks, o = k[i : i + _CHUNK], out[i : i + _CHUNK]
            torch.index_select(A_t, 0, ks, out=o)
            if self.linear:
                d = R_t.index_select(0, ks)
                torch.sub(x[i : i + _CHUNK], d, out=d)
                o.addcmul_(B_t.index_select(0, ks), d)
        return out


class _SigmoidStep:
    """f(x) = 1 / (1 + exp(-x / k)) (Eq. 54) over all negatives: no window, exact in bounded
    chunks, float64. O(|P| * (|P| + |N|)) time; extra memory per chunk capped at
    SIGMOID_CHUNK_BYTES.
    """

    f0 = 0.5

    def __init__(self, p, opts, x, t):
        self.p, self.k = p, opts.sigmoid_k
        self.x = x
        self.rows = max(1, SIGMOID_CHUNK_BYTES // (3 * 8 * max(1, p.numel())))
        neg = t == 0
        self.n_all = neg.sum()
        thr = p[0] - opts.delta
        # N^ as float64 comparison (exact for every input dtype)
        nontrivial = neg & (x.double() >= thr) if x.dtype != torch.float64 else neg & (x >= thr)
        self.n_nontrivial = nontrivial.sum()
        self.idx = torch.nonzero(neg).squeeze(1)
        self.s = x.index_select(0, self.idx).double()

    def _f(self, q):
        return torch.sigmoid((q[:, None] - self.p[None, :]) / self.k)

    def _acc(self, q):
        out = torch.zeros_like(self.p)
        for chunk in torch.split(q, self.rows):
            out += self._f(chunk).sum(0)
        return out

    def negative_sums(self):
        return self._acc(self.s), self.n_nontrivial

    def positive_sums(self):
        return self._acc(self.p)

    def num_all_negatives(self):
        return self.n_all

    def coefficients(self, w):
        return w

    def evaluate(self, w, go):
        cd = self.x.dtype
        flat = torch.zeros(self.x.numel(), dtype=cd, device=self.x.device)
        if self.idx.numel():
            g = torch.cat([self._f(chunk) @ w for chunk in torch.split(self.s, self.rows)])
            flat.index_copy_(0, self.idx, (g * go).to(cd))
        return flat
