"""Layouts: text -> a grid of what goes where -> an image drawn to it (two-stage text-to-image).

A text model that learns placement only from pixels learns colour long before place: on `scenes`, after
20 CPU minutes, it draws the named colours (0.97) but puts a "star in the top left" in any cell and a
"circle left of a square" left of it half the time (docs/benchmarks/quality.md). Two-stage generation
splits the job, as Hong et al. ("Inferring Semantic Layout for Hierarchical Text-to-Image Synthesis",
CVPR 2018) and Lian et al. ("LLM-grounded Diffusion", TMLR 2024: an LLM writes the layout) do, and
GLIGEN (Li et al., CVPR 2023) feeds the layout to the denoiser:
  LayoutPrior   text -> a G x G grid of cell classes (0 = empty, else what the cell holds), drawn one
                object at a time in the order the text names them, each given the text and the objects
                before it, so that "two blue squares" gives two, and "a circle left of a square" puts
                the square to the right of wherever the circle went;
  LayoutIn      the grid as a feature map: each cell's learned vector painted over its part of the image
                and added to a backbone's features, so that the denoiser draws each cell locally.
Both learn from data that carries a ground-truth grid beside each caption and the order in which the
caption names its objects (`scenes` does; a folder of the user's own captioned images does not, and
trains the text model alone).

Shapes: text pooled N x D, tokens N x T x D, mask N x T (imagegen/text.py); layouts N x G^2 longs in
reading order, with `classes` (one past the last class) the null layout of guidance's other branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CrossAttention, Linear, TextIn


class _Block(nn.Module):
    """Pre-norm transformer block: self-attention (causal over the prior's slots, or masked over the
    text's tokens when it reads them), cross-attention to the text (when text_dim), MLP."""

    def __init__(self, dim: int, text_dim: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.cross = CrossAttention(dim, text_dim, heads) if text_dim else None
        self.mlp = nn.Sequential(Linear(dim, 4 * dim), nn.GELU(), Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:   # N x L x dim
        n, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.causal:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # N x heads x L x d/heads
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(a.transpose(1, 2).reshape(n, length, d))
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), ctx, keep)
        return x + self.mlp(self.norm3(x))


class LayoutPrior(nn.Module):
    """p(layout | text), object by object in the order the text names them: slot s holds the s-th named
    object as one choice among (cell, class) pairs, or STOP. A small causal transformer over the slots
    (input at slot s: the choice at slot s - 1, a start token at s = 0; slot s's learned position; the
    pooled text) cross-attends to the text's token states, read first by a few trainable self-attention
    blocks over the frozen encoder's states (in an earlier prior over the grid's cells, trained alone on
    `scenes` for 300 seconds, they raised how often its likeliest layout met a position prompt from 0.28
    to 0.55).
    Naming order makes a relation a step of one object: "a circle left of a square" places the circle
    anywhere, then the square right of it; cells in reading order would have to plan ahead for it.

    Choice codes: 0 = STOP, 1 + cell (classes - 1) + (class - 1) for an object of `class` (1 ..
    classes - 1; 0 is an empty cell) in `cell` (0 .. G^2 - 1, reading order)."""

    def __init__(self, text_dim: int, grid: int, classes: int, slots: int, dim: int = 128, depth: int = 3,
                 heads: int = 4, text_layers: int = 2) -> None:
        super().__init__()
        self.cells, self.classes, self.slots = grid * grid, classes, slots
        self.choices = 1 + self.cells * (classes - 1)
        # A choice is read and scored as its cell plus its class, so that what is learnt of a place ("top
        # left", "left of" the previous object) holds for every class, and of a class for every place.
        self.prev_cell, self.prev_class = nn.Embedding(self.cells, dim), nn.Embedding(classes - 1, dim)
        self.prev_mark = nn.Embedding(2, dim)                 # 0: the start of the sequence, 1: STOP
        self.pos = nn.Parameter(torch.randn(slots, dim) * 0.02)
        self.text = TextIn(text_dim, dim)
        self.words = Linear(text_dim, dim)
        self.reader = nn.ModuleList(_Block(dim, 0, heads, causal=False) for _ in range(text_layers))
        self.blocks = nn.ModuleList(_Block(dim, dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = Linear(dim, 1 + self.cells + classes - 1)   # STOP, each cell, each class
        # cell of each choice (STOP: -1), to forbid a cell already taken
        cell_of = torch.cat([torch.tensor([-1]), torch.arange(self.cells).repeat_interleave(classes - 1)])
        self.register_buffer("cell_of", cell_of, persistent=False)

    def codes(self, layout: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The slot codes N x S of layouts N x G^2 whose objects are named in `order` (N x S cells,
        -1 past the last)."""
        cls = layout.gather(1, order.clamp(min=0))                                             # N x S
        return torch.where(order >= 0, 1 + order * (self.classes - 1) + cls - 1, 0)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits N x S x choices: entry s is p(slot s | text, codes[:, :s])."""
        n = codes.shape[0]
        prev = torch.cat([codes.new_full((n, 1), -1), codes[:, :-1]], 1)                      # N x S, -1 = start
        obj = (prev - 1).clamp(min=0)
        x = torch.where((prev > 0)[..., None],
                        self.prev_cell(obj // (self.classes - 1)) + self.prev_class(obj % (self.classes - 1)),
                        self.prev_mark((prev == 0).long()))
        x = x + self.pos + self.text.embedding(pooled, mask)[:, None]
        ctx, keep = self.text.context(tokens, mask)
        ctx = self.words(ctx)
        for block in self.reader:
            ctx = block(ctx, None, keep)
        for block in self.blocks:
            x = block(x, ctx, keep)
        out = self.head(self.norm(x))                                                  # N x S x (1 + G^2 + C - 1)
        stop, cell, cls = out.split([1, self.cells, self.classes - 1], -1)
        return torch.cat([stop, (cell[..., :, None] + cls[..., None, :]).flatten(-2)], -1)      # N x S x choices

    def loss(self, pooled, tokens, mask, layout, order) -> torch.Tensor:
        """Mean cross-entropy of the true choices (nats per slot)."""
        codes = self.codes(layout, order)
        return F.cross_entropy(self(pooled, tokens, mask, codes).flatten(0, 1).float(), codes.flatten())

    @torch.no_grad()
    def sample(self, pooled, tokens, mask, u: torch.Tensor | None, run=None) -> torch.Tensor:
        """Layouts N x G^2, slot by slot: slot s is the choice where the cumulative probability first
        passes u[:, s] (u N x S uniforms in [0, 1), one row per image, from its own generator), or the
        most likely choice where u is None; a taken cell cannot be chosen again, and after STOP only
        STOP. `run(fn, *xs)` calls the network (the caller's fixed micro-batches, so that a layout does
        not depend on its batch); plain calls without it."""
        run = run or (lambda fn, *xs: fn(*xs))
        n, dev = pooled.shape[0], pooled.device
        codes = torch.zeros(n, self.slots, dtype=torch.long, device=dev)
        layout = torch.zeros(n, self.cells, dtype=torch.long, device=dev)
        stopped = torch.zeros(n, dtype=torch.bool, device=dev)
        for s in range(self.slots):
            logits = run(self, pooled, tokens, mask, codes)[:, s].float()                     # N x choices
            taken = layout.gather(1, self.cell_of.clamp(min=0).expand(n, -1)) > 0
            logits = logits.masked_fill(taken & (self.cell_of >= 0), float("-inf"))
            if u is None:
                pick = logits.argmax(1)
            else:
                cdf = logits.softmax(1).cumsum(1)
                pick = (cdf <= u[:, s:s + 1]).sum(1).clamp(max=self.choices - 1)
            pick = torch.where(stopped, 0, pick)
            stopped |= pick == 0
            codes[:, s] = pick
            cell, cls = (pick - 1).clamp(min=0) // (self.classes - 1), (pick - 1).clamp(min=0) % (self.classes - 1) + 1
            kept = layout.gather(1, cell[:, None])[:, 0]                                      # STOP writes nothing new
            layout.scatter_(1, cell[:, None], torch.where(pick > 0, cls, kept)[:, None])
        return layout


class LayoutIn(nn.Module):
    """A layout (N x G^2 classes, `classes` = null) as features N x dim x H x W: each cell's learned
    vector over its G-th of the height and width. Starts at zero, so a backbone gains it without
    changing what it computed before."""

    def __init__(self, grid: int, classes: int, dim: int) -> None:
        super().__init__()
        self.grid, self.null = grid, classes
        self.embed = nn.Embedding(classes + 1, dim)
        nn.init.zeros_(self.embed.weight)

    def or_null(self, layout: torch.Tensor | None, n: int, device) -> torch.Tensor:
        """The layout, or n null layouts where there is none (a caller that passes no layout)."""
        return torch.full((n, self.grid ** 2), self.null, device=device) if layout is None else layout

    def forward(self, layout: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, g = layout.shape[0], self.grid
        cells = self.embed(layout).transpose(1, 2).reshape(n, -1, g, g)                  # N x dim x G x G
        return F.interpolate(cells, size=(h, w), mode="nearest")
