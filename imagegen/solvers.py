"""Samplers as pure functions: a network comes in as a callable, randomness as a `noise()` callable fed by
per-image generators, so an image depends only on its seed. Nothing here knows a family or a network.

Diffusion (used by models/ddpm.py), on a table ab of cumulative alphas (alpha_bar_t, float64) and integer
timesteps running down from T-1, with `denoise(x, t) -> (x0, eps)`:
- `ddim`: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021), eta = 0 deterministic;
- `ddpm_ancestral`: Ho, Jain & Abbeel (NeurIPS 2020), ancestral sampling, possibly strided;
- `repaint`: Lugmayr et al., "RePaint" (CVPR 2022), inpainting with resampling;
- `spaced_timesteps`: the "trailing" spacing of Lin et al. (WACV 2024).

Flow ODEs, with `velocity(x, t) -> dx/dt` and t running up from 0 (noise) to 1 (data), as in rectified
flow (Liu et al., ICLR 2023) and flow matching (Lipman et al., ICLR 2023), whose straight path is
x_t = (1 - t) x_0 + t x_1:
- `euler` (first order), `midpoint` and `heun` (second order; Heun as in Karras et al., "Elucidating the
  Design Space of Diffusion-Based Generative Models", NeurIPS 2022), on `steps` equal intervals or on a
  grid of times given as a list (`power_times`: intervals that shrink towards t = 0);
- `adaptive`: Dormand-Prince 5(4) with error control, through torchdiffeq (Chen et al., "Neural Ordinary
  Differential Equations", NeurIPS 2018);
- `flow_repaint`: RePaint's resampling carried over to the straight path, for inpainting;
- `flow_log_likelihood`: log p(x) by the instantaneous change of variables (Chen et al. 2018), the ODE
  run backwards from the data with its divergence integrated alongside, estimated by Hutchinson's trace
  estimator with probes fixed along each path as in FFJORD (Grathwohl et al., ICLR 2019), or exact.

Shapes: x is any tensor (images N x C x H x W); t is a Python number, the same for the whole batch.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .paths import STRAIGHT, DiffusionPath

Denoise = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
Noise = Callable[[], torch.Tensor]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


# --- diffusion -------------------------------------------------------------------------------------


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down, evenly spaced ("trailing": the first is always T-1)."""
    return sorted({round(T - 1 - i * T / steps) for i in range(steps)} - {-1}, reverse=True)


def ddim(denoise: Denoise, x: torch.Tensor, ab: torch.Tensor, ts: list[int], *, eta: float = 0.0,
         noise: Noise | None = None) -> torch.Tensor:
    """DDIM from x at ts[0] down to t = -1 (clean images). eta = 0: deterministic; eta = 1: as DDPM."""
    for i, t in enumerate(ts):
        a = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0, eps = denoise(x, t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise()
    return x


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, a: float, a_prev: float, noise: Noise) -> torch.Tensor:
    """One ancestral step: a draw from the posterior q(x_prev | x_t = x, x_0 = x0)."""
    alpha = a / a_prev                                   # 1 - beta of this (possibly strided) step
    mean = (math.sqrt(a_prev) * (1 - alpha) * x0 + math.sqrt(alpha) * (1 - a_prev) * x) / (1 - a)
    if a_prev >= 1.0:
        return mean
    return mean + math.sqrt((1 - alpha) * (1 - a_prev) / (1 - a)) * noise()


def ddpm_ancestral(denoise: Denoise, x: torch.Tensor, ab: torch.Tensor, ts: list[int], *, noise: Noise) -> torch.Tensor:
    """Ancestral DDPM sampling over the timesteps ts (all T of them reproduces Ho et al. exactly)."""
    for i, t in enumerate(ts):
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0, _ = denoise(x, t)
        x = ddpm_step(x, x0, float(ab[t]), a_prev, noise)
    return x


def repaint(denoise: Denoise, x: torch.Tensor, ab: torch.Tensor, ts: list[int], *, known: torch.Tensor,
            mask: torch.Tensor, resample: int, noise: Noise) -> torch.Tensor:
    """RePaint: generate where mask == 0, keep `known` where mask == 1 (mask N x 1 x H x W, 0/1).

    At each step the known region is the known image noised to that step's level and the unknown region
    is an ancestral step; `resample` times per step the result is noised back one step and redone, so
    the generated part can agree with the known part. The known pixels of the result are `known` itself.
    """
    for i, t in enumerate(ts):
        a = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        for u in range(resample):
            x0, _ = denoise(x, t)
            unknown = ddpm_step(x, x0, a, a_prev, noise)
            known_t = DiffusionPath.point(known, noise(), a_prev) if a_prev < 1 else known
            x_prev = mask * known_t + (1 - mask) * unknown
            if u + 1 < resample and a_prev < 1:
                x = math.sqrt(a / a_prev) * x_prev + math.sqrt(1 - a / a_prev) * noise()   # back to step t
        x = x_prev
    return mask * known + (1 - mask) * x


# --- flow ODEs ---------------------------------------------------------------------------------------


def flow_times(steps: int | Sequence[float]) -> list[float]:
    """The grid of a fixed-step solver: steps + 1 equally spaced times from 0 to 1, or, given a sequence,
    that sequence itself (checked: it runs up to 1 from a time in [0, 1); SDEdit starts part of the way)."""
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return [i / steps for i in range(steps + 1)]
    ts = [float(t) for t in steps]
    if len(ts) < 2 or not 0.0 <= ts[0] or ts[-1] != 1.0 or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"a time grid must increase to 1 from a time in [0, 1), got {ts}")
    return ts


def power_times(steps: int, rho: float) -> list[float]:
    """steps + 1 times t_i = (i / steps)^rho from 0 to 1: for rho > 1, intervals that shrink towards t = 0
    (the first is steps^-rho long), for an integrand that varies fastest there (as the time grid of
    Karras et al. 2022 crowds its steps near the data)."""
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    return [t ** rho for t in flow_times(steps)]


def euler(velocity: Velocity, x: torch.Tensor, steps: int | Sequence[float]) -> torch.Tensor:
    """x at t = 1 from x at t = 0, by `steps` Euler steps (one velocity call each)."""
    ts = flow_times(steps)
    for t, t_next in zip(ts, ts[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x


def midpoint(velocity: Velocity, x: torch.Tensor, steps: int | Sequence[float]) -> torch.Tensor:
    """The explicit midpoint rule: a half Euler step, then the full step with the velocity there (two calls
    a step)."""
    ts = flow_times(steps)
    for t, t_next in zip(ts, ts[1:]):
        h = t_next - t
        x = x + h * velocity(x + h / 2 * velocity(x, t), t + h / 2)
    return x


def heun(velocity: Velocity, x: torch.Tensor, steps: int | Sequence[float]) -> torch.Tensor:
    """Heun's method (explicit trapezoid): an Euler step, then the average of the velocities at both ends
    (two calls a step)."""
    ts = flow_times(steps)
    for t, t_next in zip(ts, ts[1:]):
        h = t_next - t
        v = velocity(x, t)
        guess = x + h * v
        x = x + h / 2 * (v + velocity(guess, t_next))
    return x


def adaptive(velocity: Velocity, x: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """x at t = 1 from x at t = 0 by dopri5 with step-size control (torchdiffeq), and the number of
    velocity calls it made. The whole of x is one system with one step size: call it an image at a time
    where an image must not depend on the others in its batch."""
    import torchdiffeq   # imported here: only the adaptive solver needs it

    calls = 0

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return velocity(y, float(t))

    span = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return torchdiffeq.odeint(f, x, span, rtol=rtol, atol=atol, method="dopri5")[-1], calls


def flow_repaint(velocity: Velocity, x: torch.Tensor, steps: int, *, known: torch.Tensor, mask: torch.Tensor,
                 resample: int, noise: Noise) -> torch.Tensor:
    """Generate where mask == 0 and keep `known` where mask == 1 (mask N x 1 x H x W, 0/1), by Euler steps.

    At each step the known region is `known` on the straight path at the step's end time (fresh noise)
    and the unknown region is an Euler step; `resample` times per step the result is taken back to the
    step's start (`paths.StraightPath.back_to`) and redone, so the generated part can agree with the known part, as RePaint
    does for diffusion. The known pixels of the result are `known` itself."""
    ts = flow_times(steps)
    for t, t_next in zip(ts, ts[1:]):
        for u in range(resample):
            unknown = x + (t_next - t) * velocity(x, t)
            known_t = STRAIGHT.point(known, noise(), t_next) if t_next < 1 else known
            x_next = mask * known_t + (1 - mask) * unknown
            if u + 1 < resample:
                x = STRAIGHT.back_to(x_next, t_next, t, noise)
        x = x_next
    return mask * known + (1 - mask) * x


# --- likelihood through the flow ODE ------------------------------------------------------------------


def divergence(velocity: Velocity, x: torch.Tensor, t: float, probes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, div v) at x N x ...: v = velocity(x, t) and its divergence N, the trace of dv/dx per row.
    probes P x N x ... (Rademacher or Gaussian): Hutchinson's estimate mean_p eps_p^T (dv/dx) eps_p, one
    vector-Jacobian product per probe; None: the exact trace, one product per dimension (small x only)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        if probes is None:
            flat = v.flatten(1)
            div = torch.stack([torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                               for i in range(flat.shape[1])], 1).sum(1)
        else:
            div = sum((torch.autograd.grad(v, x, e, retain_graph=True)[0] * e).flatten(1).sum(1) for e in probes) / len(probes)
    return v.detach(), div.detach()


# The likelihood ODE's default grid: Heun on 64 intervals at s_i = (i / 64)^3 (flow_log_likelihood says why).
LIKELIHOOD_STEPS = 64
LIKELIHOOD_RHO = 3.0


def flow_log_likelihood(velocity: Velocity, x: torch.Tensor, *, steps: int = LIKELIHOOD_STEPS,
                        rho: float = LIKELIHOOD_RHO, solver: str = "heun",
                        probes: torch.Tensor | None = None) -> torch.Tensor:
    """log p_1(x) in nats (N) of x N x ... under the flow that carries N(0, I) at t = 0 along
    dx/dt = velocity(x, t) to t = 1:  log p_1(x_1) = log N(x_0; 0, I) - integral_0^1 div v(x_t, t) dt,
    with x_t the ODE solved backwards from x_1 = x. The state (x, the running integral) is solved in
    s = 1 - t by `solver`: euler, midpoint or heun on the `steps` intervals of power_times(steps, rho) in s,
    or dopri5 (one system, so call it a row at a time where rows must not depend on each other).
    probes: see `divergence`.

    Why the grid crowds the start s = 0 (the data end): there a flow trained on dequantised pixels
    contracts onto the data on the scale of one pixel's bin (2/256), and the divergence grows like
    D / (1 - t) until it does; equal intervals step over that. On a Fashion-MNIST flow
    (configs/flow-likelihood.toml, then with uniform times, after 450 s of training; 16 test images, dopri5 at 3.197 bits/dim),
    Heun on 32 equal intervals read 0.72 bits/dim low and on 512 still 0.012; on this grid with rho = 3,
    32 intervals read 0.055 low, 64 0.015 and 128 0.004. rho = 1: equal intervals."""
    n, shape = x.shape[0], x.shape[1:]
    d = x[0].numel()

    def f(state: torch.Tensor, s: float) -> torch.Tensor:   # state N x (D + 1): x_t flattened, integral so far
        v, div = divergence(velocity, state[:, :d].reshape(n, *shape), 1.0 - s, probes)
        return torch.cat([-v.flatten(1), div[:, None]], 1)

    state = torch.cat([x.detach().flatten(1), x.new_zeros(n, 1)], 1)
    if solver == "dopri5":
        state = adaptive(f, state)[0]
    else:
        state = {"euler": euler, "midpoint": midpoint, "heun": heun}[solver](f, state, power_times(steps, rho))
    x0, integral = state[:, :d], state[:, d]
    return -0.5 * (x0.square().sum(1) + d * math.log(2 * math.pi)) - integral
