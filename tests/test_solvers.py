"""The flow ODE solvers against a closed form. For Gaussian data x_1 ~ N(mu, S) and noise x_0 ~ N(0, I) on
the straight path x_t = (1 - t) x_0 + t x_1, the exact velocity field is known and affine in x:

    v(x, t) = E[x_1 - x_0 | x_t = x] = mu + (t S - (1 - t) I) C_t^-1 (x - t mu),   C_t = (1 - t)^2 I + t^2 S,

and its ODE carries N(0, I) at t = 0 to N(mu, S) at t = 1. Every solver step is then affine in x too, so
a solver's output is y = M x + c exactly: c = solve(0), M's columns = solve(e_i) - c, and the law it gives
noise is N(c, M M^T), with no sampling error to allow for."""

from __future__ import annotations

import pytest
import torch

from imagegen.solvers import euler, flow_times, heun, midpoint

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
A = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-0.3, 0.4, 0.2]], dtype=torch.float64)
S = A @ A.T + 0.05 * torch.eye(3, dtype=torch.float64)


def velocity(x: torch.Tensor, t: float) -> torch.Tensor:          # x: N x 3
    eye = torch.eye(3, dtype=torch.float64)
    c_t = (1 - t) ** 2 * eye + t ** 2 * S
    gain = (t * S - (1 - t) * eye) @ torch.linalg.inv(c_t)
    return MU + (x - t * MU) @ gain.T


def pushed_law(solver, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of what the solver makes of N(0, I)."""
    points = torch.cat([torch.zeros(1, 3), torch.eye(3)]).double()   # 0, e_1, e_2, e_3
    out = solver(velocity, points, steps)
    c, m = out[0], (out[1:] - out[0]).T
    return c, m @ m.T


def error(solver, steps: int) -> float:
    mean, cov = pushed_law(solver, steps)
    return max(float((mean - MU).abs().max()), float((cov - S).abs().max()))


def test_the_velocity_field_is_the_exact_one_at_both_ends():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(velocity(x, 0.0), MU - x)      # from noise x_0 = x: E[x_1] - x
    assert torch.allclose(velocity(x, 1.0), x)           # at data x_1 = x: x - E[x_0]


def test_euler_with_many_steps_and_heun_or_midpoint_with_few_land_on_the_data_law():
    assert error(euler, 1000) < 5e-3                       # measured 2.8e-3
    assert error(heun, 20) < 2e-3 and error(midpoint, 20) < 2e-3   # measured 1.1e-3 and 4.5e-5
    assert error(euler, 4) > 0.05                          # the control: a coarse Euler does not


@pytest.mark.parametrize("solver,order", [(euler, 1), (heun, 2), (midpoint, 2)])
def test_each_solver_converges_at_least_at_its_order(solver, order):
    ratio = error(solver, 40) / error(solver, 80)          # halving the step divides the error by >= 2^order
    assert ratio > 2 ** order * 0.8, ratio                 # measured: Euler 1.97, Heun 4.1, midpoint 8.0
    if solver is euler:
        assert ratio < 2.5                                 # and Euler is first order, no better


def test_solvers_call_the_velocity_once_or_twice_per_step_at_the_right_times():
    seen = []

    def spy(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    x = torch.ones(2, 3)
    assert torch.equal(euler(spy, x, 4), x) and seen == [0.0, 0.25, 0.5, 0.75]
    seen.clear()
    heun(spy, x, 2)
    assert seen == [0.0, 0.5, 0.5, 1.0]
    seen.clear()
    midpoint(spy, x, 2)
    assert seen == [0.0, 0.25, 0.5, 0.75]
    assert flow_times(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="at least 1"):
        flow_times(0)
