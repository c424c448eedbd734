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


class TextIn(nn.Module):
    """Text conditioning shared by the backbones (imagegen/text.py gives pooled N x T_DIM, tokens
    N x T x T_DIM and a mask N x T; the null text has an all-false mask).

    `embedding`: the pooled text mapped to the conditioning width, to be added to the time embedding as
    a class is, and a learned vector in its place for the null text. `context`: the token states with a
    learned null token in front, unmasked, so a null text still has one key to attend to."""

    def __init__(self, text_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.pool = Linear(text_dim, emb_dim)
        self.null = nn.Parameter(torch.zeros(emb_dim))
        self.null_token = nn.Parameter(torch.zeros(1, 1, text_dim))

    def embedding(self, pooled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:   # -> N x emb_dim
        return torch.where(mask.any(1, keepdim=True), self.pool(pooled), self.null)

    def context(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[0]
        return (torch.cat([self.null_token.expand(n, 1, -1).to(tokens.dtype), tokens], 1),   # N x (T + 1) x T_DIM
                torch.cat([mask.new_ones(n, 1), mask], 1))                                 # N x (T + 1)


class CrossAttention(nn.Module):
    """Multi-head attention of N x L x dim queries (already normalised) to a text context N x S x ctx_dim
    under a key mask N x S (True = attend): N x L x dim, to be added to the queries' stream. The output
    map starts at zero, so a network gains text without changing what it computed before."""

    def __init__(self, dim: int, ctx_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(ctx_dim, 2 * dim)
        self.out = Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        h = self.heads
        q = per_sample(self.q, x).view(n, length, h, d // h).transpose(1, 2)            # N x h x L x d/h
        k, v = per_sample(self.kv, ctx).view(n, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # N x h x S x d/h
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return per_sample(self.out, a.transpose(1, 2).reshape(n, length, d))


def per_sample(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for x N x L x in as N matrix products of L rows (a batched product), not one of N L rows:
    a product's rounding of a row can depend on how many rows it has (seen with MKL under AVX2 for the
    U-Net's 16 x 16 queries), and N L changes with the batch, L does not."""
    out = torch.bmm(x, layer.weight.t().expand(x.shape[0], -1, -1))
    return out if layer.bias is None else out + layer.bias
