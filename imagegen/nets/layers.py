"""Pieces the backbones share."""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

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


# The weight count from which a 2-D Linear at inference takes oneDNN's product, not the batched one (see
# Linear): about where the two cost the same at 16 rows on machine B (256 x 256: 68 against 42 us; 256 x
# 1024: 104 against 153 us).
ONEDNN_MIN_WEIGHTS = 2 ** 16


class Linear(nn.Linear):
    """nn.Linear whose rows, at inference (grad disabled), are rounded alike wherever they sit in the
    batch and however many come with them. Same parameters and state-dict keys as nn.Linear; training
    (grad enabled) and export (traced with grad on) use the plain product.

    Why: one MKL product of many rows rounds a row according to where it sits. Under MKL's AVX2 kernels
    on 2 threads, a 16-row product of a 256-wide input rounds rows 4-7 and 12-15 otherwise than rows 0-3
    and 8-11, and more than a third of the layer sizes we tried gave a row other bits in a 64-row product
    than in a 16-row one; 1 to ~12 rows pick other kernels again. A sample's place in a chunk changes
    with the batch (a list of seeds that starts elsewhere; guidance, which stacks the null rows after the
    conditioned ones), so its image would too. Two products that do not do this (checked on AVX-512,
    AVX2 and SSE4.1, 1 and 2 threads, 2 to 300 rows: tests/test_batching.py):
      - one batched product of N items (of 1 row, or of L token rows), which computes its items alike.
        It reads the weights once per item, cheap for a small layer but not for a wide one (100 ->
        12544 on 64 rows: 5.9 ms against 0.8 ms for MKL's one product, machine B).
      - oneDNN's inner product, whose accumulation order does not depend on how the rows are blocked;
        it has a one-row path of its own, so one row is padded to two. Nearly as fast as MKL for a wide
        layer (that one: 1.0 ms), but a fixed ~45 us a call for the conversions to its layout.
    So a 2-D input on the CPU in float32 takes oneDNN where the weight has ONEDNN_MIN_WEIGHTS numbers or
    more; everything else (small layers, tokens, other devices and dtypes) the batched product. The
    choice depends on the layer alone, never on the batch."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` replaces self.weight (e.g. the same weight with its columns permuted to x's order)."""
        weight = self.weight if weight is None else weight
        if torch.is_grad_enabled() or x.dim() not in (2, 3):
            return F.linear(x, weight, self.bias)
        if x.dim() == 2 and weight.numel() >= ONEDNN_MIN_WEIGHTS and x.device.type == "cpu" \
                and x.dtype == weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            return _onednn_rows(x, weight, self.bias)
        rows = x[:, None] if x.dim() == 2 else x                                   # N x L x in
        out = torch.bmm(rows, weight.t().expand(x.shape[0], -1, -1))               # N x L x out
        out = out if self.bias is None else out + self.bias
        return out[:, 0] if x.dim() == 2 else out


class _Packed(NamedTuple):
    """A weight and bias in oneDNN's layout, with what they were made from."""
    weight: weakref.ref
    version: int
    bias: torch.Tensor | None
    bias_version: int | None
    w: torch.Tensor
    b: torch.Tensor | None

    def made_from(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        return (self.weight() is weight and self.version == weight._version and self.bias is bias
                and (bias is None or self.bias_version == bias._version))


# id(weight) -> its _Packed. An entry goes when its weight does (a spectral-normed weight is new every
# call); a weight or bias updated in place (training, EMA, load_state_dict) has a new version and is
# converted again.
_ONEDNN: dict[int, _Packed] = {}


def _onednn_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x N x in -> N x out by oneDNN's inner product (see Linear)."""
    packed = _ONEDNN.get(id(weight))
    if packed is None or not packed.made_from(weight, bias):
        packed = _Packed(weakref.ref(weight), weight._version, bias, None if bias is None else bias._version,
                         weight.detach().contiguous().to_mkldnn(),
                         None if bias is None else bias.detach().contiguous().to_mkldnn())
        if id(weight) not in _ONEDNN:
            weakref.finalize(weight, _ONEDNN.pop, id(weight), None)
        _ONEDNN[id(weight)] = packed
    n = x.shape[0]
    rows = x if n > 1 else torch.cat([x, x.new_zeros(1, x.shape[1])])           # its one-row path rounds otherwise
    return torch._C._nn.mkldnn_linear(rows.contiguous().to_mkldnn(), packed.w, packed.b).to_dense()[:n]


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
        q = self.q(x).view(n, length, h, d // h).transpose(1, 2)            # N x h x L x d/h
        k, v = self.kv(ctx).view(n, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # N x h x S x d/h
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out(a.transpose(1, 2).reshape(n, length, d))
