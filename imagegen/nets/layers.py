"""Pieces the backbones share."""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (integers, or 1000 t for a flow's t in [0, 1]): N -> N x dim (the
    transformer's positional code)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


# The weight count from which a 2-D Linear at inference takes oneDNN's product, not the batched one (see
# Linear): where the two cost the same at 16 rows on machine B when oneDNN still re-laid its weights out on
# every call (256 x 256: 68 against 42 us; 256 x 1024: 104 against 153 us). Packed, oneDNN is cheaper
# now (256 x 256: 39 against 66 us for the batched product, a slower day); a lower threshold would change
# the rounding, hence the images, of the layers in between, so it stays.
ONEDNN_MIN_WEIGHTS = 2 ** 16

# The batch size oneDNN is told to expect when it lays out a weight (its packing takes an input size). A
# constant, so that the layout, like every other choice here, depends on the layer alone.
PACK_ROWS = 16


def inference(layer: nn.Module) -> bool:
    """Whether `layer` samples: grad disabled and the layer in eval mode, as every family's sampling runs
    (base.eval_mode). Training keeps the plain ops, its no-grad steps too (a GAN's discriminator step
    draws fakes under no_grad in train mode), and so does export (traced with grad on)."""
    return not (torch.is_grad_enabled() or layer.training)


def _packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x through `weight`, at inference, can run on oneDNN with the weight packed once (see
    _pack): on the CPU, in float32, where this torch build has oneDNN. Depends on the layer, never on
    the batch."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and _HAS_PACKED_OPS)


# The oneDNN operators on packed weights, which x86 builds of torch register (torch._inductor uses them).
_HAS_PACKED_OPS = all(hasattr(torch.ops.mkldnn, op) for op in (
    "_linear_pointwise", "_reorder_linear_weight", "_convolution_pointwise",
    "_convolution_transpose_pointwise", "_reorder_convolution_transpose_weight"))


class Linear(nn.Linear):
    """nn.Linear whose rows, at inference (`inference`), are rounded alike wherever they sit in the
    batch and however many come with them. Same parameters and state-dict keys as nn.Linear; training
    and export use the plain product.

    Why: one MKL product of many rows rounds a row according to where it sits. Under MKL's AVX2 kernels
    on 2 threads, a 16-row product of a 256-wide input rounds rows 4-7 and 12-15 otherwise than rows 0-3
    and 8-11, and more than a third of the layer sizes we tried gave a row other bits in a 64-row product
    than in a 16-row one; 1 to ~12 rows pick other kernels again. A sample's place in a chunk changes
    with the batch (a list of seeds that starts elsewhere; guidance, which stacks the null rows after the
    conditioned ones), so its image would too. Two products that do not do this (checked on AVX-512,
    AVX2 and SSE4.1, 1 and 2 threads, 2 to 300 rows: tests/test_batching.py):
      - oneDNN's inner product, whose accumulation order does not depend on how the rows are blocked;
        it has a one-row path of its own, so one row is padded to two. Its weights are packed into
        oneDNN's layout once (_pack) and the rows go in and out as ordinary tensors: 128 -> 6272 costs
        56 us for one row against 176 us when the weights were re-laid out on every call (machine B).
      - one batched product of N items (of 1 row, or of L token rows), which computes its items alike.
        It reads the weights once per item: cheap for a small layer, not for a wide one.
    So a 2-D input (see _packable) takes oneDNN where the weight has ONEDNN_MIN_WEIGHTS numbers or
    more; everything else (small layers, tokens, other devices and dtypes) the batched product. The
    choice depends on the layer alone, never on the batch."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`weight` replaces self.weight (e.g. the same weight with its columns permuted to x's order)."""
        weight = self.weight if weight is None else weight
        if not inference(self) or x.dim() not in (2, 3):
            return F.linear(x, weight, self.bias)
        if x.dim() == 2 and weight.numel() >= ONEDNN_MIN_WEIGHTS and _packable(x, weight):
            return _onednn_rows(x, weight, self.bias)
        rows = x[:, None] if x.dim() == 2 else x                                   # N x L x in
        out = torch.bmm(rows, weight.t().expand(x.shape[0], -1, -1))               # N x L x out
        out = out if self.bias is None else out + self.bias
        return out[:, 0] if x.dim() == 2 else out


def _onednn_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x N x in -> N x out by oneDNN's inner product (see Linear)."""
    w = _pack(weight, ("linear",), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS))
    n = x.shape[0]
    rows = x if n > 1 else torch.cat([x, x.new_zeros(1, x.shape[1])])           # its one-row path rounds otherwise
    return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), w, bias, "none", [], "")[:n]


class Conv2d(nn.Conv2d):
    """nn.Conv2d that at inference (`inference`, `_packable`) runs oneDNN's convolution on weights packed once
    into its layout, instead of re-laying them out on every call as the plain op does. Same parameters and
    state-dict keys; numbers within rounding of the plain op (bit for bit for the DCGAN's layers on
    machine B). One image gains most: the DCGAN's 3x3 128 -> 128 convolution at 7 x 7 takes 78 us for it,
    and the plain op, which rounds one image otherwise than a batch there, needed two (214 us), where the
    packed op rounds it as in a batch. Where oneDNN does round one image otherwise, packed or not (a 32 ->
    16 transposed convolution on machine B), runtime.batching.exact_rows still pads it. Training and export use the
    plain op; so does a weight that is not a parameter (spectral norm makes a new one every call)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4
                or not isinstance(weight, nn.Parameter) or not inference(self) or not _packable(x, weight)):
            return super()._conv_forward(x, weight, bias)
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        w = _pack(weight, ("conv", *map(tuple, geometry[:3]), self.groups, *x.shape[1:]),
                  lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
                      w.contiguous().to_mkldnn(), *geometry, [PACK_ROWS, *x.shape[1:]]))
        return _in_layout_of(x, weight, torch.ops.mkldnn._convolution_pointwise(x, w, bias, *geometry, "none", [], ""))


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with Conv2d's packed inference path (one image through a 64 -> 1 layer at 14 x 14:
    60 against 87 us on machine B)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if (output_size is not None or self.padding_mode != "zeros" or x.dim() != 4
                or not isinstance(self.weight, nn.Parameter) or not inference(self)
                or not _packable(x, self.weight)):
            return super().forward(x, output_size)
        geometry = (list(self.padding), list(self.output_padding), list(self.stride), list(self.dilation), self.groups)
        w = _pack(self.weight, ("deconv", *map(tuple, geometry[:4]), self.groups, *x.shape[1:]),
                  lambda w: torch.ops.mkldnn._reorder_convolution_transpose_weight(
                      w.contiguous(), *geometry, [PACK_ROWS, *x.shape[1:]]))
        y = torch.ops.mkldnn._convolution_transpose_pointwise(x, w, self.bias, *geometry, "none", [], "")
        return _in_layout_of(x, self.weight, y)


def _in_layout_of(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """oneDNN's convolutions answer channels-last; the plain op answers channels-last only where the input
    or the weight is laid out so, and NCHW otherwise. y in the plain op's layout."""
    return y if _channels_last(x) or _channels_last(weight) else y.contiguous()


def _channels_last(t: torch.Tensor) -> bool:
    """What torch's suggest_memory_format says of a 4-D tensor: channels-last strides, including those of
    a one-channel map converted to channels-last (which is contiguous both ways; a plain one-channel map,
    also contiguous both ways, is not channels-last)."""
    return t.is_contiguous(memory_format=torch.channels_last) and (not t.is_contiguous() or t.stride(1) == 1)


class _Packed(NamedTuple):
    """A weight in oneDNN's layout, with what it was made from."""
    weight: weakref.ref
    version: int
    data_ptr: int
    steps: int
    key: tuple
    packed: torch.Tensor

    def made_from(self, weight: torch.Tensor, key: tuple) -> bool:
        return (self.weight() is weight and self.version == weight._version and self.data_ptr == weight.data_ptr()
                and self.steps == _OPTIMIZER_STEPS[0] and self.key == key)


# id(weight) -> its _Packed. An entry goes when its weight does. A weight changed in place is packed
# again: by an in-place op (EMA, load_state_dict: a new version), by `.data =` (module.to: a new data
# pointer, the version may stay), or by any optimizer step, which the count below sees: a fused optimizer
# (base.adam) updates weights in place without touching their version counters.
_ONEDNN: dict[int, _Packed] = {}
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many optimizer steps this process has taken (any optimizer): one more means weights may have
    changed, in place, without their version counters knowing."""
    return _OPTIMIZER_STEPS[0]


def _pack(weight: torch.Tensor, key: tuple, pack) -> torch.Tensor:
    """pack(weight), made once per weight tensor and key (the layer's geometry and input shape, on which
    oneDNN's choice of layout depends) and again after any change to the weight (_Packed.made_from); kept
    until the weight goes."""
    entry = _ONEDNN.get(id(weight))
    if entry is None or not entry.made_from(weight, key):
        entry = _Packed(weakref.ref(weight), weight._version, weight.data_ptr(), _OPTIMIZER_STEPS[0], key,
                        pack(weight.detach()))
        if id(weight) not in _ONEDNN:
            weakref.finalize(weight, _ONEDNN.pop, id(weight), None)
        _ONEDNN[id(weight)] = entry
    return entry.packed


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
