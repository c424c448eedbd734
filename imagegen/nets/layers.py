"""Pieces the backbones share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (integers, or 1000 t for a flow's t in [0, 1]): N -> N x dim (the
    transformer's positional code)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


# CPU matrix-multiply libraries pick a different kernel (and so a different float rounding of each row)
# for a matrix of 1 to ~12 rows than for 16; the threshold depends on the CPU and the thread count.
# Sampling runs a network on as few rows as the user asks for (models/base.run_fixed_batch), so at
# inference a Linear pads its input to at least this many rows: each row is then rounded as it is in a
# 16-image batch, and costs almost nothing more (a small GEMM is bound by reading the weights).
LINEAR_MIN_ROWS = 16


class Linear(nn.Linear):
    """nn.Linear whose 2-D input, outside autograd, is padded with zero rows to LINEAR_MIN_ROWS (then
    trimmed): row i of the output does not depend on how many rows came with it. Same parameters and
    state-dict keys as nn.Linear; training (grad enabled) is unchanged."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` replaces self.weight (e.g. the same weight with its columns permuted to x's order)."""
        weight = self.weight if weight is None else weight
        n = x.shape[0] if x.dim() == 2 else LINEAR_MIN_ROWS
        if n >= LINEAR_MIN_ROWS or torch.is_grad_enabled():
            return F.linear(x, weight, self.bias)
        pad = x.new_zeros((LINEAR_MIN_ROWS - n, x.shape[1]))
        return F.linear(torch.cat([x, pad]), weight, self.bias)[:n]
