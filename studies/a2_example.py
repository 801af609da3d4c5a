"""The paper's Appendix A2: gradient descent fails on the sigmoid-smoothed AP-loss, the
error-driven update does not.

Details: docs/studies.md#studiesa2_example."""
import math
import os
from typing import Dict, Optional, Sequence

import torch

from ap_loss_d2.losses import ap_loss
from ap_loss_d2.losses.alternatives import smoothed_ap
from .common import save_figure, study_argument_parser, subplots, write_json

#: The three samples (rows) and their labels (1 positive, 0 negative).
FEATURES = ((0.0, 0.0), (1.0, 0.0), (-3.0, 1.0))
LABELS = (0, 1, 1)
#: theta_1 > theta_2 > 0, large enough for Eq. 36, small enough for a visible plateau, and the
#: error-driven trajectory (lr 1) off exact score ties (why: docs/studies.md).
DEFAULT_THETA0 = (3.0, 1.0)


def _data(dtype=torch.float64):
    return torch.tensor(FEATURES, dtype=dtype), torch.tensor(LABELS)


def smoothed_ap_loss(theta: torch.Tensor, sigmoid_k: float = 1.0) -> torch.Tensor:
    """``F(theta)`` of Eq. 32 (= 1 - smoothed AP) for the A2 samples; differentiable."""
    f, t = _data(theta.dtype)
    return 1.0 - smoothed_ap(f @ theta, t, sigmoid_k=sigmoid_k)


def exact_ap_loss(theta: torch.Tensor) -> float:
    """``1 - AP`` (Heaviside step, not interpolated) of the scores ``f . theta``, by ap_loss."""
    f, t = _data(theta.dtype)
    return float(ap_loss(f @ theta.detach(), t, step="heaviside", interpolate=False))


def exact_ap_loss_trajectory(thetas: torch.Tensor) -> torch.Tensor:
    """:func:`exact_ap_loss` (H(0) = 1) of each row of ``thetas`` (T, 2), vectorised."""
    f, t = _data(thetas.dtype)
    s = thetas @ f.T  # (T, 3)
    above = (s[:, None, :] >= s[:, :, None]).double()  # [T, i, k] = H(s_k - s_i)
    above = above - torch.eye(3, dtype=above.dtype)  # k != i
    pos = t == 1
    num = 1 + above[:, :, pos].sum(-1)
    den = 1 + above.sum(-1)
    return 1 - (num / den)[:, pos].mean(1)


def run_a2(theta0: Sequence[float] = DEFAULT_THETA0, *, lr: float = 1.0, gd_steps: int = 5000,
           sigmoid_k: float = 1.0, ed_lr: Optional[float] = None, ed_step: str = "heaviside",
           ed_delta: float = 1.0, ed_max_steps: int = 10000) -> Dict[str, dict]:
    """Gradient descent on ``F`` (``gd_steps``, step ``lr``) and the error-driven update
    (``ed_step`` of :func:`ap_loss`, step ``ed_lr`` or ``lr``, until the exact AP-loss is 0 or
    ``ed_max_steps``) from ``theta0``: their trajectories (fields: docs/studies.md)."""
    if ed_step not in ("heaviside", "linear"):
        raise ValueError(f"ed_step must be 'heaviside' or 'linear', got {ed_step!r}")
    ed_lr = lr if ed_lr is None else ed_lr
    f, t = _data()

    def descend(loss_fn, step_size, max_steps, record):
        """Plain SGD on ``loss_fn(theta)`` from ``theta0``; ``record(theta, loss)`` per step,
        True to stop. Returns the number of steps taken."""
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        for step in range(max_steps + 1):
            value = loss_fn(theta)
            if record(theta.detach(), value) or step == max_steps:
                return step
            (grad,) = torch.autograd.grad(value, theta)
            with torch.no_grad():
                theta -= step_size * grad

    gd_theta, gd_f = [], []
    descend(lambda th: smoothed_ap_loss(th, sigmoid_k), lr, gd_steps,
            lambda th, v: gd_theta.append(th.tolist()) or gd_f.append(float(v)))
    gd_exact = exact_ap_loss_trajectory(torch.tensor(gd_theta, dtype=torch.float64)).tolist()
    # the error-driven update: ap_loss's backward through s = f . theta
    ed_theta, ed_exact, ed_surrogate = [], [], []

    def record_ed(th, v):
        ed_theta.append(th.tolist())
        ed_exact.append(exact_ap_loss(th))
        ed_surrogate.append(float(v))
        return ed_exact[-1] == 0.0

    steps = descend(lambda th: ap_loss(f @ th, t, step=ed_step, delta=ed_delta, interpolate=False), ed_lr,
                    ed_max_steps, record_ed)
    return {
        "settings": dict(theta0=list(map(float, theta0)), lr=lr, gd_steps=gd_steps, sigmoid_k=sigmoid_k,
                         ed_lr=ed_lr, ed_step=ed_step, ed_delta=ed_delta, ed_max_steps=ed_max_steps),
        "gradient_descent": dict(theta=gd_theta, F=gd_f, exact_ap_loss=gd_exact, final_F=gd_f[-1],
                                 final_theta=gd_theta[-1],
                                 theta1_gt_theta2_every_step=all(a > b for a, b in gd_theta)),
        "error_driven": dict(theta=ed_theta, exact_ap_loss=ed_exact, surrogate_loss=ed_surrogate,
                             steps_to_zero=steps if ed_exact[-1] == 0.0 else None, final_theta=ed_theta[-1],
                             final_exact_ap_loss=ed_exact[-1]),
    }


def format_table(result: dict, rows: int = 8) -> str:
    """A small markdown table of both trajectories at a few steps."""
    gd, ed = result["gradient_descent"], result["error_driven"]
    n_gd = len(gd["F"]) - 1
    steps = sorted({0, n_gd} | {min(n_gd, 10 ** e) for e in range(0, int(math.log10(max(n_gd, 1))) + 1)})
    steps = steps[: rows - 1] + [n_gd] if len(steps) > rows else steps
    lines = ["Gradient descent on the smoothed AP-loss F (Eq. 35):", "",
             "| step | theta_1 | theta_2 | F (smoothed) | 1 - AP (exact) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {gd['theta'][s][0]:.4f} | {gd['theta'][s][1]:.4f} | {gd['F'][s]:.6f} | "
              f"{gd['exact_ap_loss'][s]:.6f} |" for s in steps]
    lines += ["", f"final F = {gd['final_F']:.6f} (1/6 = {1 / 6:.6f}), theta_1 > theta_2 at every step: "
              f"{gd['theta1_gt_theta2_every_step']}", "",
              f"Error-driven update (step {result['settings']['ed_step']!r}):", "",
              "| step | theta_1 | theta_2 | 1 - AP (exact) |", "|---:|---:|---:|---:|"]
    lines += [f"| {s} | {th[0]:.4f} | {th[1]:.4f} | {v:.6f} |"
              for s, (th, v) in enumerate(zip(ed["theta"], ed["exact_ap_loss"]))]
    zero = ed["steps_to_zero"]
    lines += ["", f"AP-loss 0 reached after {zero} steps" if zero is not None else "AP-loss 0 not reached"]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Both loss curves against the step (log scale on x), PNG at ``path``."""
    gd, ed = result["gradient_descent"], result["error_driven"]
    fig, ax = subplots(figsize=(6.4, 4.0))
    x_gd = range(1, len(gd["F"]) + 1)
    ax.plot(x_gd, gd["F"], label="gradient descent: smoothed AP-loss F")
    ax.plot(x_gd, gd["exact_ap_loss"], "--", label="gradient descent: exact 1 - AP")
    ax.step(range(1, len(ed["exact_ap_loss"]) + 1), ed["exact_ap_loss"], where="post",
            label="error-driven update: exact 1 - AP")
    ax.axhline(1 / 6, color="gray", lw=0.8, ls=":", label="1/6")
    ax.set(xscale="log", xlabel="step + 1", ylabel="loss", title="Appendix A2: linear model, 3 separable samples")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def parse_args(argv=None):
    parser = study_argument_parser("a2_example", __doc__.split("\n")[0], opts=False)
    parser.add_argument("--theta0", type=float, nargs=2, default=list(DEFAULT_THETA0))
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gd-steps", type=int, default=5000)
    parser.add_argument("--sigmoid-k", type=float, default=1.0)
    parser.add_argument("--ed-step", choices=("heaviside", "linear"), default="heaviside")
    parser.add_argument("--ed-lr", type=float, default=None, help="default: --lr")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = run_a2(args.theta0, lr=args.lr, gd_steps=args.gd_steps, sigmoid_k=args.sigmoid_k, ed_lr=args.ed_lr,
                    ed_step=args.ed_step)
    print(format_table(result))
    write_json(os.path.join(args.output_dir, "a2_example.json"), result)
    png = os.path.join(args.output_dir, "a2_example.png")
    plot(result, png)
    print(f"wrote {png} and a2_example.json")
    return result


if __name__ == "__main__":
    main()
