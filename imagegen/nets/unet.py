"""The U-Net denoiser: a backbone that knows nothing of the objective that trains it (models/ddpm.py
owns the diffusion loss and sampling).

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020), after Ronneberger et al.'s
U-Net: residual blocks with GroupNorm and SiLU at each resolution, the time (and class) embedding as a
per-channel scale and shift (FiLM, as in Dhariwal & Nichol 2021), one self-attention block at the
lowest resolution, skip connections across. Every residual branch and the output start at zero.

Shapes: x N x C x H x W with H and W multiples of 2^(len(mults) - 1); t N integer timesteps; y N labels
(num_classes is the null class) or None. Convolutional, so it also runs on larger canvases (outpainting).
With text_dim, a text (pooled N x text_dim, tokens N x T x text_dim, mask N x T: imagegen/text.py) joins
the embedding as a class does, and its tokens through cross-attention: in the middle, after the
self-attention, and after every block of the `text_levels` lowest resolutions (as in Stable Diffusion's
U-Net, there at every resolution but the highest); with `text_positions`, its queries carry their place.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dit import sincos_2d
from .layers import Conv2d, CrossAttention, Linear, TextIn, timestep_embedding
from .layout import LayoutIn


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as a per-channel scale and shift in between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.emb = Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)               # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:   # N x c_in x H x W, N x E
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, c: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(c), c)
        self.qkv = Conv2d(c, 3 * c, 1)
        self.out = Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)                            # N x heads x HW x c/heads
        return x + self.out(a.transpose(-1, -2).reshape(n, c, h, w))


class TextAttention(nn.Module):
    """Cross-attention of a feature map's positions to a text context, residual (layers.CrossAttention).
    With `positions`, each query also carries the fixed 2-D sin-cos code of where it is (as a DiT's tokens
    do): convolutions know where they are only through the padding, and "in the top left" needs it."""

    def __init__(self, c: int, text_dim: int, heads: int = 4, positions: bool = False) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(c), c)
        self.attn = CrossAttention(c, text_dim, heads)
        self.positions = positions

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.norm(x).flatten(2).transpose(1, 2)                                     # N x HW x c
        if self.positions:
            q = q + sincos_2d(h, w, -(-c // 4) * 4, device=x.device)[:, :c].to(q.dtype)
        a = self.attn(q, ctx, keep)                                                     # N x HW x c
        return x + a.transpose(1, 2).reshape(n, c, h, w)


class UNet(nn.Module):
    """channels -> channels at the same size, conditioned on an integer time and (if num_classes) a label.
    `mults`: channel multiplier per resolution, each after the first at half the size of the previous;
    `attention`: one self-attention block at the lowest resolution; `patch`: the side of the pixel blocks
    folded into channels after a thin full-size stem and unfolded before a full-size head (1: none)."""

    def __init__(self, channels: int, width: int, mults: Sequence[int], *, attention: bool = True,
                 num_classes: int = 0, patch: int = 1, text_dim: int = 0, text_levels: int = 0, text_positions: bool = False,
                 layout: tuple[int, int] | None = None) -> None:
        super().__init__()
        w, emb = width, 4 * width
        self.width, self.patch = w, patch
        self.time = nn.Sequential(Linear(w, emb), nn.SiLU(), Linear(emb, emb))
        # Class embedding with one extra row, the null class, for classifier-free guidance.
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.text = TextIn(text_dim, emb) if text_dim else None
        # With patches, a stem of w / p^2 channels at full size, folded into w channels at 1/p size, and
        # (below) a head that unfolds the last level and mixes it with the stem at full size, so that no
        # seam runs along the blocks.
        stem = w if patch == 1 else -(-w // patch ** 2)
        self.inp = Conv2d(channels, stem, 3, padding=1)
        chans = [w * m for m in mults]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        # A layout (grid side, cell classes: nets/layout.py) joins the features entering every down block.
        self.layout = nn.ModuleList() if layout else None
        c = stem * patch ** 2
        for i, co in enumerate(chans):
            if layout:
                self.layout.append(LayoutIn(*layout, c))
            self.down.append(ResBlock(c, co, emb))
            c = co
            if i + 1 < len(chans):
                self.downsample.append(Conv2d(c, c, 3, stride=2, padding=1))
        # Cross-attention to the text after every down and up block of the `text_levels` lowest
        # resolutions (keys: the level, 0 = full size), besides the one in the middle: where a word's object
        # goes is decided at these sizes. (On scenes, 20 minutes: GenEval-style mean 0.45 with the middle
        # one alone, 0.52 with these and the position codes; position and colour binding stayed low: CHANGELOG.md.)
        levels = range(len(chans) - min(text_levels, len(chans)), len(chans)) if text_dim else ()
        self.down_text = nn.ModuleDict({str(i): TextAttention(chans[i], text_dim, positions=text_positions) for i in levels})
        self.up_text = nn.ModuleDict({str(i): TextAttention(chans[i], text_dim, positions=text_positions) for i in levels})
        self.mid1 = ResBlock(c, c, emb)
        self.attn = Attention(c) if attention else nn.Identity()
        self.cross = TextAttention(c, text_dim, positions=text_positions) if text_dim else None
        self.mid2 = ResBlock(c, c, emb)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            self.up.append(ResBlock(c + chans[i], chans[i], emb))   # input: previous level + the skip
            c = chans[i]
            if i > 0:
                self.upsample.append(Conv2d(c, chans[i - 1], 3, padding=1))   # after a nearest 2x
                c = chans[i - 1]
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                 Conv2d(c, channels if patch == 1 else stem * patch ** 2, 3, padding=1))
        self.head = Conv2d(2 * stem, channels, 3, padding=1) if patch > 1 else None
        last = self.out[-1] if patch == 1 else self.head
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, pooled: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                layout: torch.Tensor | None = None) -> torch.Tensor:
        """x N x C x H x W, t N timesteps, y N labels (num_classes = null) or None, and for a text
        network the text (pooled, text_tokens, mask) and, if it has one, its layout (N x G^2, None =
        the null layout) -> N x C x H x W."""
        e = self.time(timestep_embedding(t, self.width))
        if self.label is not None:
            e = e + self.label(y)
        if self.text is not None:
            e = e + self.text.embedding(pooled, mask)
        ctx = self.text.context(text_tokens, mask) if self.text is not None else None
        h = self.inp(x)
        if self.patch > 1:   # N x stem x H x W -> N x stem p^2 x H/p x W/p
            stem = h
            h = F.pixel_unshuffle(h, self.patch)
        if self.layout is not None:
            layout = self.layout[0].or_null(layout, x.shape[0], x.device)
        skips = []
        for i, block in enumerate(self.down):
            if self.layout is not None:
                h = h + self.layout[i](layout, *h.shape[-2:]).to(h.dtype)
            h = block(h, e)
            if str(i) in self.down_text:
                h = self.down_text[str(i)](h, *ctx)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.attn(self.mid1(h, e))
        if self.cross is not None:
            h = self.cross(h, *ctx)
        h = self.mid2(h, e)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], 1), e)
            level = str(len(self.up) - 1 - i)
            if level in self.up_text:
                h = self.up_text[level](h, *ctx)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        if self.patch == 1:
            return self.out(h)
        h = F.pixel_shuffle(self.out(h), self.patch)                  # N x stem x H x W
        return self.head(F.silu(torch.cat([h, stem], 1)))
