"""The flow ODE solvers against a closed form. For Gaussian data x_1 ~ N(mu, S) and noise x_0 ~ N(0, I) on
the straight path x_t = (1 - t) x_0 + t x_1, the exact velocity field is known and affine in x:

    v(x, t) = E[x_1 - x_0 | x_t = x] = mu + (t S - (1 - t) I) C_t^-1 (x - t mu),   C_t = (1 - t)^2 I + t^2 S,

and its ODE carries N(0, I) at t = 0 to N(mu, S) at t = 1. Every solver step is then affine in x too, so
a solver's output is y = M x + c exactly: c = solve(0), M's columns = solve(e_i) - c, and the law it gives
noise is N(c, M M^T), with no sampling error to allow for."""

from __future__ import annotations

import pytest
import torch

from imagegen.paths import STRAIGHT
from imagegen.solvers import (adaptive, euler, flow_log_likelihood, flow_repaint, flow_times, heun, midpoint,
                              power_times)

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
A = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-0.3, 0.4, 0.2]], dtype=torch.float64)
S = A @ A.T + 0.05 * torch.eye(3, dtype=torch.float64)


def exact_velocity(mu: torch.Tensor, cov: torch.Tensor):
    """The exact velocity field (above) of Gaussian data N(mu, cov) in len(mu) dimensions."""
    def v(x: torch.Tensor, t: float) -> torch.Tensor:              # x: N x len(mu)
        eye = torch.eye(len(mu), dtype=torch.float64)
        c_t = (1 - t) ** 2 * eye + t ** 2 * cov
        gain = (t * cov - (1 - t) * eye) @ torch.linalg.inv(c_t)
        return mu + (x - t * mu) @ gain.T
    return v


velocity = exact_velocity(MU, S)


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
    seen.clear()
    heun(spy, x, power_times(2, 3.0))                     # a grid given as a list is stepped as given
    assert seen == [0.0, 0.125, 0.125, 1.0]
    for bad in ([0.0, 0.5], [-0.2, 1.0], [0.0, 0.6, 0.4, 1.0], [1.0]):
        with pytest.raises(ValueError, match="increase to 1"):
            euler(spy, x, bad)
    seen.clear()
    euler(spy, x, [0.6, 0.8, 1.0])                         # part of the way, as SDEdit starts
    assert seen == [0.6, 0.8]


def test_the_adaptive_solver_lands_on_the_data_law_and_its_tolerance_buys_accuracy():
    def law(**tol):
        calls = []
        mean, cov = pushed_law(lambda v, x, steps: (lambda r: calls.append(r[1]) or r[0])(adaptive(v, x, **tol)), None)
        return max(float((mean - MU).abs().max()), float((cov - S).abs().max())), calls[0]

    err, calls = law()                                     # the default tolerance, 1e-5
    assert err < 1e-3 and calls < 100, (err, calls)        # measured 2.7e-4 in 38 calls
    tight, tight_calls = law(rtol=1e-7, atol=1e-7)
    assert tight < 1e-5 and tight_calls > calls, (tight, tight_calls)   # measured 3.5e-7 in 74 calls


def test_flow_repaint_with_the_exact_velocity_of_one_image_keeps_and_recovers_it():
    """For data that is a single image x1, the exact velocity is (x1 - x) / (1 - t): every Euler step
    stays on the straight path, so inpainting must return x1 everywhere, whatever the resampling."""
    gen = torch.Generator().manual_seed(0)
    x1 = torch.rand(2, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    mask[:, :, :2] = 1
    noise = lambda: torch.randn(x1.shape, generator=gen, dtype=torch.float64)   # noqa: E731
    v = lambda x, t: (x1 - x) / (1 - t)                                           # noqa: E731
    for resample in (1, 3):
        out = flow_repaint(v, noise(), 5, known=x1, mask=mask, resample=resample, noise=noise)
        assert torch.allclose(out, x1, atol=1e-9), resample


def test_going_back_along_the_path_gives_the_marginal_of_the_earlier_time():
    """STRAIGHT.back_to(x_t', t', t) of points on the path at t' is distributed as the path at t: mean t x1 and
    standard deviation 1 - t, for a fixed x1."""
    gen = torch.Generator().manual_seed(1)
    n, x1 = 200_000, 0.7
    xs = (1 - 0.8) * torch.randn(n, generator=gen, dtype=torch.float64) + 0.8 * x1
    back = STRAIGHT.back_to(xs, 0.8, 0.3, lambda: torch.randn(n, generator=gen, dtype=torch.float64))
    assert abs(float(back.mean()) - 0.3 * x1) < 0.01 and abs(float(back.std()) - 0.7) < 0.01


# --- the likelihood of Gaussian data through the ODE: the analytic log-density of N(mu, S) ------------

def gaussian_log_density(x: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(MU, S).log_prob(x)


POINTS = MU + torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ A.T * 1.5


@pytest.mark.parametrize("solver,steps,tol", [("heun", 64, 1e-2), ("midpoint", 64, 1e-3), ("dopri5", None, 5e-4)])
def test_log_likelihood_with_the_exact_trace_is_the_analytic_log_density(solver, steps, tol):
    got = flow_log_likelihood(velocity, POINTS, steps=steps or 1, solver=solver)
    want = gaussian_log_density(POINTS)
    assert (got - want).abs().max() < tol, (got - want)    # measured: heun 6.9e-3, midpoint 5.8e-4, dopri5 7e-5
    if solver == "heun":                                   # second order: twice the steps, a quarter the error
        finer = flow_log_likelihood(velocity, POINTS, steps=2 * steps, solver=solver)
        assert (finer - want).abs().max() < (got - want).abs().max() / 3   # measured 1.7e-3
    # The control: a velocity field that is not the data's gives other densities.
    wrong = flow_log_likelihood(lambda x, t: 0.8 * velocity(x, t), POINTS, steps=64, solver="heun")
    assert (wrong - want).abs().min() > 0.05


def test_the_likelihood_grid_resolves_data_as_sharp_as_a_dequantisation_bin():
    """Gaussian data with one direction only 0.002 wide (a pixel's bin is 2/256 wide): the exact flow
    contracts that direction in the last few thousandths of its time, where the divergence is about
    1 / (1 - t). Equal intervals step over it; the default grid, crowded at the data end, does not."""
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    cov = torch.diag(torch.tensor([0.5, 0.1, 0.002 ** 2], dtype=torch.float64))
    sharp = exact_velocity(mu, cov)
    x = mu + torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * cov.diag().sqrt()
    want = torch.distributions.MultivariateNormal(mu, cov).log_prob(x)
    crowded = (flow_log_likelihood(sharp, x) - want).abs().max()           # 64 intervals, rho = 3
    equal = (flow_log_likelihood(sharp, x, rho=1.0) - want).abs().max()    # 64 equal intervals
    assert crowded < 0.15 and equal > 1.0, (crowded, equal)                # measured 0.073 and 1.48 nats
    assert (flow_log_likelihood(sharp, x, steps=128) - want).abs().max() < crowded / 3   # measured 0.019


def test_hutchinsons_estimate_averages_to_the_exact_log_density():
    copies = 4000                                          # each point 4000 times, each copy its own probe
    x = POINTS.repeat(copies, 1)
    probes = torch.randint(0, 2, (1, *x.shape), generator=torch.Generator().manual_seed(2)).double() * 2 - 1
    each = flow_log_likelihood(velocity, x, steps=64, probes=probes).view(copies, -1)
    want = gaussian_log_density(POINTS)
    # one probe's estimate is off by up to 2.6 nats here; the mean of 4000 by 1/63 of that (measured 0.043)
    assert (each.mean(0) - want).abs().max() < 0.15
    assert (each[0] - want).abs().max() > 0.5
