"""Appendix A2: gradient descent on the smoothed AP-loss stalls at 1/6, the error-driven update
reaches AP-loss 0 in finitely many steps (studies.a2_example)."""
import json
import math

import pytest
import torch

from studies.a2_example import (
    exact_ap_loss,
    exact_ap_loss_trajectory,
    main,
    run_a2,
    smoothed_ap_loss,
)


def smoothed_ap_loss_eq35(theta1: float, theta2: float) -> float:
    """The oracle: Eq. 35 of the paper written out (k = 1)."""

    def S(x):
        return 1.0 / (1.0 + math.exp(-x))

    a = S(-theta1) / (1 + S(-theta1) + S(theta2 - 4 * theta1))
    b = S(3 * theta1 - theta2) / (1 + S(4 * theta1 - theta2) + S(3 * theta1 - theta2))
    return 0.5 * (a + b)


@pytest.mark.parametrize("theta", [(3.0, 1.0), (10.0, 5.0), (0.1, 1.0), (-1.0, 2.0), (0.0, 0.0)])
def test_smoothed_loss_is_eq35(theta):
    value = smoothed_ap_loss(torch.tensor(theta, dtype=torch.float64))
    assert value.item() == pytest.approx(smoothed_ap_loss_eq35(*theta), rel=1e-12)


def test_eq36_at_the_start():
    """dF/dtheta_1 < dF/dtheta_2 < 0 for theta_1 > theta_2 > 0, theta_1 large enough."""
    for theta in [(3.0, 1.0), (5.0, 2.0), (10.0, 5.0)]:
        th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(smoothed_ap_loss(th), th)
        assert g[0] < g[1] < 0, (theta, g)


def test_exact_trajectory_matches_ap_loss():
    thetas = torch.tensor(
        [[3.0, 1.0], [0.5, 2.0], [0.0, 1.0], [1.0, 3.0], [-1.0, 0.0], [0.2, 0.6]],
        dtype=torch.float64,
    )  # incl. exact ties (H(0) = 1 counts them)
    ref = torch.tensor([exact_ap_loss(th) for th in thetas], dtype=torch.float64)
    torch.testing.assert_close(exact_ap_loss_trajectory(thetas), ref, rtol=0, atol=1e-15)


def test_gradient_descent_stalls_error_driven_converges():
    out = run_a2((3.0, 1.0), lr=1.0, gd_steps=3000)
    gd, ed = out["gradient_descent"], out["error_driven"]
    # (a) theta_1 > theta_2 at every step, both increasing, F decreasing towards 1/6 from above
    theta = torch.tensor(gd["theta"])
    assert theta.shape == (3001, 2)
    assert bool((theta[:, 0] > theta[:, 1]).all()) and gd["theta1_gt_theta2_every_step"]
    assert bool((theta[1:] >= theta[:-1]).all())
    F = torch.tensor(gd["F"])
    assert bool((F[1:] <= F[:-1]).all()) and bool((F > 1 / 6).all())
    assert gd["final_F"] == pytest.approx(1 / 6, abs=1e-3)
    assert gd["final_F"] == pytest.approx(smoothed_ap_loss_eq35(*gd["final_theta"]), rel=1e-12)
    # the exact AP-loss never moves: the second positive stays below the negative
    assert max(abs(v - 1 / 6) for v in gd["exact_ap_loss"]) < 1e-12
    # (b) the error-driven update reaches exact AP-loss 0 after finitely many steps
    n = ed["steps_to_zero"]
    assert n is not None and 0 < n < 100
    assert ed["final_exact_ap_loss"] == 0.0 and ed["exact_ap_loss"][-1] == 0.0
    assert all(v > 0 for v in ed["exact_ap_loss"][:-1])
    t1, t2 = ed["final_theta"]
    assert 0 < t1 < t2 / 3  # both positives strictly above the negative
    assert exact_ap_loss(torch.tensor(ed["final_theta"], dtype=torch.float64)) == 0.0


@pytest.mark.parametrize(
    "start,step", [((10.0, 5.0), "heaviside"), ((3.0, 1.0), "linear"), ((10.0, 5.0), "linear")]
)
def test_error_driven_other_settings(start, step):
    out = run_a2(start, lr=1.0, gd_steps=1, ed_step=step)
    ed = out["error_driven"]
    assert ed["steps_to_zero"] is not None and ed["final_exact_ap_loss"] == 0.0


def test_cli_writes_table_json_png(tmp_path, capsys):
    main(["--gd-steps", "20", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "AP-loss 0 reached after" in printed and "| step |" in printed
    data = json.loads((tmp_path / "a2_example.json").read_text())
    assert len(data["gradient_descent"]["F"]) == 21
    png = (tmp_path / "a2_example.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
