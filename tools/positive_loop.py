"""Reference AP-loss in the style of the authors' implementation: a Python loop over positives.

This is the "Loop on Positive Indices" + "Non-Trivial Negative Samples" scheme of Sec. 3.4.4 /
Algorithm 1 of the paper, with the linear (piecewise) step of Eq. 21: one iteration per positive
(ascending score), each vectorised over the positives and the non-trivial negatives ``N^``.
Time ``O(|P| * (|P| + |N^|) + |N|)``, extra memory ``O(|P| + |N^|)``; one host sync per
positive (the interpolation branch is decided in Python, as in the original code).

It returns the same value and gradient as :func:`ap_loss_d2.losses.ap_loss` with
``step="linear"`` and is used as the baseline of ``python -m tools.benchmark``. It needs
only PyTorch.
"""
import torch

__all__ = ["ap_loss_positive_loop"]


def _linear_step(x, delta):
    # Eq. 21: 0 below -delta, x / (2 delta) + 0.5 in [-delta, delta], 1 above delta.
    return torch.clamp(x / (2.0 * delta) + 0.5, 0.0, 1.0)


class _APLossPositiveLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, delta, interpolate, max_positives):
        # float16/bfloat16 are computed in float32; float32/float64 in their own precision.
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        s = logits.detach().reshape(-1).to(work)
        t = targets.reshape(-1)
        grad = torch.zeros_like(s)
        ctx.logits_dtype = logits.dtype
        ctx.shape = logits.shape

        pos_idx = torch.nonzero(t == 1).squeeze(1)
        n_pos = int(pos_idx.numel())
        if n_pos == 0:
            ctx.save_for_backward(grad)
            return s.new_zeros(())

        s_pos = s[pos_idx]
        s_min = s_pos.min()
        # Algorithm 1, lines 4-5: non-trivial negatives s_j >= s_min - delta.
        nhat_idx = torch.nonzero((t == 0) & (s >= s_min - delta)).squeeze(1)
        s_nhat = s[nhat_idx]
        g_pos = torch.zeros_like(s_pos)
        g_nhat = torch.zeros_like(s_nhat)

        order = torch.argsort(s_pos).tolist()  # line 6: ascending
        if max_positives is not None:
            order = order[: int(max_positives)]
        max_prec = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in order:  # line 7
            s_i = s_pos[i]
            # a_i = 1 + sum_{k in P, k != i} f(s_k - s_i) = 0.5 + sum_{k in P} f(s_k - s_i)
            a = 0.5 + _linear_step(s_pos - s_i, delta).sum(dtype=torch.float64)
            f_neg = _linear_step(s_nhat - s_i, delta)  # lines 8-9
            b = f_neg.sum(dtype=torch.float64)
            denom = a + b
            L = f_neg / denom.to(work)
            prec = float(a / denom)  # line 10 (host sync, as in the original code)
            row = b / denom
            if interpolate:
                if prec >= max_prec:  # lines 11-12
                    max_prec = prec
                else:  # lines 13-14
                    scale = (1.0 - max_prec) / (1.0 - prec)
                    L = L * scale
                    row = row * scale
            g_pos[i] = -row  # line 16
            g_nhat += L  # line 17
            loss_sum += row

        grad[pos_idx] = g_pos / n_pos  # line 19
        grad[nhat_idx] = g_nhat / n_pos
        ctx.save_for_backward(grad)
        return (loss_sum / n_pos).to(work)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        g = (grad * grad_output.to(grad.dtype)).to(ctx.logits_dtype).reshape(ctx.shape)
        return g, None, None, None, None


def ap_loss_positive_loop(logits, targets, *, delta=1.0, interpolate=True, max_positives=None):
    """AP-loss with the linear step, computed by a Python loop over the positives.

    Args:
        logits: scores of any shape (all entries are ranked together), floating point.
        targets: same shape; 1 positive, 0 negative, -1 ignored.
        delta: width of the piecewise step (Eq. 21).
        interpolate: interpolated AP (Sec. 3.4.3).
        max_positives: for timing only: process just the first ``max_positives`` positives in
            ascending score (the value and gradient are then partial; still divided by ``|P|``).

    Returns:
        Scalar loss ``1 - AP`` (float32, or float64 for float64 logits); its gradient w.r.t.
        ``logits`` is the error-driven update of Algorithm 1, in the logits' dtype.
    """
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise ValueError("logits must be a floating point tensor")
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.shape != logits.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != targets shape "
                         f"{tuple(targets.shape)}")
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    return _APLossPositiveLoop.apply(logits, targets, float(delta), bool(interpolate),
                                     max_positives)
