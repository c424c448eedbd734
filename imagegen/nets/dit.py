"""The diffusion transformer: a backbone that knows nothing of the objective that trains it (the ddpm and
flow families own their losses and samplers).

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023): the image cut into p x p
patches, each a token (a linear map of its pixels) plus a fixed 2-D sin-cos position code; transformer
blocks whose LayerNorms take their scale and shift from the conditioning (adaLN), with a gate on every
residual branch; "adaLN-Zero": the maps that produce scale, shift and gate start at zero, so every block
starts as the identity, and the final linear layer starts at zero, so the whole network starts at 0.

Conditioning: c = embed(time) + embed(label), one N x dim vector that drives every adaptive norm. The
label table has one extra row, the null class, for classifier-free guidance. A text (text_dim > 0:
pooled, tokens and mask from imagegen/text.py) joins c through its pooled embedding, and every block
cross-attends to its tokens between self-attention and MLP, as in PixArt-alpha (Chen et al. 2024); the
cross-attention's output map starts at zero, so the blocks still start as the identity.

Shapes: x N x C x H x W with H and W multiples of the patch size (not only the training size: the position
code is computed for the grid it meets, so the network also runs on larger canvases, for outpainting);
t N times (integers in [0, T) for diffusion; flow passes 1000 t); y N labels (num_classes = null) or None.
Tokens are N x L x dim with L = (H / p) (W / p), in row-major patch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CrossAttention, Linear, TextIn, timestep_embedding
from .layout import LayoutIn


@dataclass(frozen=True)
class Size:
    depth: int      # transformer blocks
    dim: int        # token width
    heads: int      # attention heads (dim / heads per head)


# Sizes at the scale a 2-core CPU trains in minutes, and "l", the paper's DiT-S (12 blocks, 384 wide);
# "xxs" is the smallest that runs every part (tests).
SIZES = {
    "xxs": Size(2, 64, 4),
    "xs": Size(4, 128, 4),
    "s": Size(6, 192, 6),
    "m": Size(8, 256, 8),
    "l": Size(12, 384, 6),
}


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """The fixed 2-D position code, (h * w) x dim: half the channels code the row, half the column, each
    with the sin / cos frequencies of the transformer's 1-D code (as in MAE and DiT)."""
    if dim % 4:
        raise ValueError(f"the token width must be a multiple of 4 for the 2-D position code, got {dim}")
    q = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(q, dtype=torch.float64, device=device) / q)   # q frequencies

    def code(pos: torch.Tensor) -> torch.Tensor:                                      # P -> P x (dim / 2)
        a = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    rows = torch.arange(h, device=device).repeat_interleave(w)                          # row of each token
    cols = torch.arange(w, device=device).repeat(h)
    return torch.cat([code(rows), code(cols)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x N x L x D scaled and shifted per sample (shift, scale N x D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each with an adaptive LayerNorm and a gate, all six from c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, text_dim: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.cross = CrossAttention(dim, text_dim, heads) if text_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if text_dim else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)        # adaLN-Zero: gates start at 0, the block at the identity
        nn.init.zeros_(self.ada[-1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:                 # N x L x D -> N x L x D
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)                        # N x heads x L x D/heads
        return self.proj(a.transpose(1, 2).reshape(n, length, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:  # N x L x D, N x D, text context N x S x T_DIM, N x S
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), ctx, keep)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """channels -> channels at the same size, conditioned on a time and (if num_classes) a label."""

    def __init__(self, channels: int, size: str | Size = "xs", *, patch: int = 2, num_classes: int = 0,
                 text_dim: int = 0, layout: tuple[int, int] | None = None) -> None:
        super().__init__()
        s = SIZES[size] if isinstance(size, str) else size
        if s.dim % s.heads or s.dim % 4:
            raise ValueError(f"DiT width {s.dim} must be a multiple of 4 and of its {s.heads} heads")
        self.channels, self.patch, self.dim = channels, patch, s.dim
        self.embed = nn.Conv2d(channels, s.dim, patch, stride=patch)          # a linear map of each patch
        self.time = nn.Sequential(Linear(256, s.dim), nn.SiLU(), Linear(s.dim, s.dim))
        self.label = nn.Embedding(num_classes + 1, s.dim) if num_classes else None
        self.text = TextIn(text_dim, s.dim) if text_dim else None
        self.layout = LayoutIn(*layout, s.dim) if layout else None   # a layout's cells join their patches' tokens
        self.blocks = nn.ModuleList(Block(s.dim, s.heads, text_dim=text_dim) for _ in range(s.depth))
        self.norm = nn.LayerNorm(s.dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), Linear(s.dim, 2 * s.dim))
        self.out = Linear(s.dim, patch * patch * channels)
        self._init()

    def _init(self) -> None:
        """DiT's initialisation: Xavier-uniform linear maps (the patch embedding as one), N(0, 0.02) for
        the time MLP and the label table, zeros for every adaptive map and for the output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embed.weight.view(self.dim, -1))
        nn.init.zeros_(self.embed.bias)
        for m in self.time:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        if self.label is not None:
            nn.init.normal_(self.label.weight, std=0.02)
        for block in self.blocks:
            for m in (block.ada[-1], *((block.cross.out,) if block.cross is not None else ())):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.ada[-1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, pooled: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:   # -> N x dim
        c = self.time(timestep_embedding(t, 256))
        if self.label is not None:
            c = c + self.label(y)
        if self.text is not None:
            c = c + self.text.embedding(pooled, mask)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, pooled: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                layout: torch.Tensor | None = None) -> torch.Tensor:
        """x N x C x H x W, t N times, y N labels (num_classes = null) or None, and for a text network
        the text (pooled, text_tokens, mask) and, if it has one, its layout (N x G^2, None = the null
        layout) -> N x C x H x W."""
        h, w = x.shape[-2:]
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        tokens = self.embed(x).flatten(2).transpose(1, 2)                       # N x L x D
        tokens = tokens + sincos_2d(gh, gw, self.dim, x.device).to(tokens.dtype)
        if self.layout is not None:
            layout = self.layout.or_null(layout, x.shape[0], x.device)
            tokens = tokens + self.layout(layout, gh, gw).flatten(2).transpose(1, 2).to(tokens.dtype)
        cond = self.condition(t, y, pooled, mask)
        ctx = self.text.context(text_tokens, mask) if self.text is not None else (None, None)
        for block in self.blocks:
            tokens = block(tokens, cond, *ctx)
        shift, scale = self.ada(cond).chunk(2, dim=1)
        return unpatchify(self.out(modulate(self.norm(tokens), shift, scale)), p, gh, gw)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """N x C x H x W -> N x L x (p * p * C): token i * (W / p) + j holds the patch at rows i*p.., columns
    j*p.., in (row, column, channel) order (the layout the output layer writes)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, gh: int, gw: int) -> torch.Tensor:
    """The inverse of `patchify`: N x (gh * gw) x (p * p * C) -> N x C x (gh * p) x (gw * p)."""
    n = tokens.shape[0]
    c = tokens.shape[2] // (p * p)
    return tokens.view(n, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, gh * p, gw * p)
