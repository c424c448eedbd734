"""Noise paths: where an image sits between data and noise at a time, what a network is trained to predict
there, and the conversions between the predictions (clean image, noise, velocity), written once for the
families and solvers that share a path (as flow_matching's `AffineProbPath` holds them for its solvers).

- `DiffusionPath`: the variance-preserving path of DDPM (Ho et al. 2020) on a table ab of cumulative
  alphas, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, integer timesteps from T-1 (noise) down to 0; the
  network predicts eps or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans & Ho 2022). models/ddpm.py,
  solvers.repaint.
- `STRAIGHT`: the straight path of rectified flow (Liu et al. 2023), x_t = (1 - t) z + t x, t from 0
  (noise z) to 1 (data x); the network predicts the velocity x - z. models/flow.py, models/distilled.py,
  solvers.flow_repaint.

Each level `a` (a cumulative alpha) or time `t` is a tensor broadcast against the images (N x 1 x 1 x 1,
training: one per image) or a Python number (sampling: one for the batch); both give the numbers the
families have always computed, operation for operation, so a seed's pixels do not move.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Level = torch.Tensor | float


class DiffusionPath:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with a network predicting `prediction` ("eps" or "v")."""

    def __init__(self, ab: torch.Tensor, prediction: str) -> None:
        self.ab, self.prediction = ab, prediction

    def level(self, t: torch.Tensor | int) -> Level:
        """ab_t: N x 1 x 1 x 1 for a tensor of N timesteps, a number for one timestep."""
        return self.ab[t].view(-1, 1, 1, 1) if isinstance(t, torch.Tensor) else float(self.ab[t])

    @staticmethod
    def point(x0: torch.Tensor, eps: torch.Tensor, a: Level) -> torch.Tensor:
        """x_t at level a = ab_t."""
        if isinstance(a, torch.Tensor):
            return a.sqrt() * x0 + (1 - a).sqrt() * eps
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at x_t: eps, or v."""
        return eps if self.prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    @staticmethod
    def snr(a: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio ab / (1 - ab) of levels a (N)."""
        return a / (1 - a)

    def split(self, x: torch.Tensor, out: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the network's output at x_t, level a: x0 clipped to [-1, 1] (images live there),
        and the eps that goes with the clipped x0."""
        if self.prediction == "eps":
            x0 = (x - math.sqrt(1 - a) * out) / math.sqrt(a)
        else:
            x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
        x0 = x0.clamp(-1, 1)
        return x0, (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


class StraightPath:
    """x_t = (1 - t) z + t x from noise z (t = 0) to data x (t = 1), velocity x - z."""

    @staticmethod
    def point(x: torch.Tensor, z: torch.Tensor, t: Level) -> torch.Tensor:
        """x_t: t N x 1 x 1 x 1 or a number."""
        return (1 - t) * z + t * x

    @staticmethod
    def target(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The velocity dx_t/dt = x - z a network learns."""
        return x - z

    @staticmethod
    def data(xt: torch.Tensor, v: torch.Tensor, t: Level) -> torch.Tensor:
        """The one-shot estimate of the data x from x_t and a velocity: x_t + (1 - t) v."""
        return xt + (1 - t) * v

    @staticmethod
    def back_to(x: torch.Tensor, t_from: float, t_to: float, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A draw of x at the earlier time t_to given x at t_from: scale by t_to / t_from (what is left of
        the data) and add fresh noise up to (1 - t_to) of standard deviation."""
        keep = t_to / t_from
        return keep * x + math.sqrt(max((1 - t_to) ** 2 - (keep * (1 - t_from)) ** 2, 0.0)) * noise()


STRAIGHT = StraightPath()
