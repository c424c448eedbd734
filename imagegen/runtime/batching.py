"""Fixed micro-batches: why an image depends only on its seed, whatever batch it is drawn in.

CPU kernels pick different blockings, hence different float rounding, for different batch sizes. So every
sampling network runs through `run_fixed_batch`, which gives each row exactly the bits it has in a chunk
of SAMPLE_MICRO_BATCH rows: a short chunk is padded only up to a row count that a one-time check found to
round like a full one (`exact_rows`), and a large batch runs several chunks in one call only where a
one-time check found the same bits (`wide_rows`). The checks are kept on the model, keyed by what they
depend on (`check_key`). An engine set on the model (runtime/engine.py) runs the function instead of
eager torch, under the same checks. This module imports nothing of imagegen: the model layer above uses it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

# Networks run this many images at a time when sampling (run_fixed_batch), because CPU kernels pick
# different blockings, hence different float rounding, for different batch sizes. Every image is rounded
# as in a chunk of this size, so it is bit-identical whatever batch size the user asks for (fewer rows,
# or several chunks in one call, only where a check found the same bits: exact_rows, wide_rows).
SAMPLE_MICRO_BATCH = 16


# A family's modules and tensors are made with it: weights change in place (optimizer steps, EMA,
# load_state_dict) or have their data swapped (module.to), but stay the same tensor objects. So what a
# sampling call looks up in them on every call (at one image, a DCGAN's network takes under 0.5 ms under
# the onnxruntime engine, and each walk over the modules about 10 us) is found once and kept on the module.

def cached_on(module: nn.Module, name: str, find):
    if name not in module.__dict__:
        module.__dict__[name] = find()
    return module.__dict__[name]


def first_conv(module: nn.Module) -> torch.Tensor | None:
    """The first 4-D parameter (a convolution's weight), whose memory layout the rounding checks key on."""
    return cached_on(module, "_first_conv", lambda: next((p for p in module.parameters() if p.dim() == 4), None))


def run_fixed_batch(fn: Callable[..., torch.Tensor], *xs: torch.Tensor | None, owner: nn.Module,
                    micro: int = SAMPLE_MICRO_BATCH) -> torch.Tensor:
    """fn(*xs) in chunks of `micro` rows, with each row's result exactly what it is in a full chunk.
    Every x has the same number of rows; None passes through unchanged.

    A full chunk runs as it is. The last, short chunk of k rows (one image, say) is padded with zero
    rows only up to the least row count >= k that `exact_rows` found to round each row as a full chunk
    does, not to `micro`, so one image costs a fraction of a full chunk. A large batch runs several full
    chunks in one call where `wide_rows` found that call to give every row the bits of its own chunk.
    Either way an image is the same whatever batch it is drawn in. `owner` (the family) keeps the
    checks; `fn` must be the same computation each time it is given with the same code."""
    key = check_key(fn, xs, owner)
    engine = owner.__dict__.get("engine")   # runtime/engine.use_engine: another engine runs fn at inference
    if engine is not None and not (torch.is_grad_enabled() or owner.training):
        fn, key = engine.graph(fn, xs, owner, key), (engine.name, *key)   # the checks are of the graph
    n = next(x for x in xs if x is not None).shape[0]
    wide = wide_rows(fn, xs, owner, micro, key) if n >= min(WIDE_ROWS) else micro
    outs, i = [], 0
    while i < n:
        k = wide if n - i >= wide else min(micro, n - i)
        chunks = [None if x is None else x[i:i + k] for x in xs]
        if k < micro:
            rows = next(r for r in exact_rows(fn, chunks, owner, micro, key) if r >= k)
            chunks = [None if x is None else _pad_rows(x, rows) for x in chunks]
        outs.append(fn(*chunks)[:k])
        i += k
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# Row counts, multiples of SAMPLE_MICRO_BATCH, that run_fixed_batch tries as one call for a large batch:
# the distilled student runs 256 images 1.4x faster in calls of 64 rows than of 16 (machine B), with the
# same bits. Only for inputs of at most WIDE_MAX_NUMEL numbers in all, so that memory stays bounded.
WIDE_ROWS = (64, 32)
WIDE_MAX_NUMEL = 64 * 3 * 64 * 64


def check_key(fn: Callable[..., torch.Tensor], xs: Sequence[torch.Tensor | None], owner: nn.Module) -> tuple:
    """What a rounding check depends on: fn's code and owner, the inputs' row shapes, dtypes and layouts,
    the device, the weights' layout, the thread count, train and grad modes."""
    x0 = next(x for x in xs if x is not None)
    param = first_conv(owner)
    layout = None if param is None else (param.is_contiguous(), param.is_contiguous(memory_format=torch.channels_last))
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return (id(fn) if code is None else code, getattr(fn, "__self__", None) is not None and id(fn.__self__),
            tuple(None if x is None else (tuple(x.shape[1:]), x.dtype, x.is_contiguous()) for x in xs),
            x0.device, layout, torch.get_num_threads(), owner.training, torch.is_grad_enabled())


def probe_rows(xs: Sequence[torch.Tensor | None], rows: int) -> list[torch.Tensor | None]:
    """`rows` rows made from xs's (cycled, floats perturbed: _perturbed), to check or trace a function on."""
    x0 = next(x for x in xs if x is not None)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(rows) % x0.shape[0]
    return [None if x is None else _perturbed(x, idx, gen) for x in xs]


def exact_rows(fn: Callable[..., torch.Tensor], xs: Sequence[torch.Tensor | None], owner: nn.Module,
               micro: int = SAMPLE_MICRO_BATCH, key: tuple | None = None) -> tuple[int, ...]:
    """The row counts k (ascending, `micro` always last) for which fn on a k-row input gives bit for bit
    the first k rows of its output on a `micro`-row input.

    Found once per `check_key` on a probe of `micro` rows made from the given rows, by running every
    prefix. The answer depends on the CPU: on a 2-core AMD EPYC every channels-last convolution passed at
    one image; on a 2-core Intel Xeon with AMX a convolution of one image rounds differently, and an
    elementwise sigmoid whose length is an odd multiple of 16 floats computes its last vector another
    way; one matrix product of few rows differed on both (nets.layers.Linear now takes products that
    round a row alike wherever it sits). The result is kept on `owner`; a count that fails only costs
    speed (the caller pads past it). `key`: fn's and xs's `check_key`, where the caller has it."""
    key = ("exact", micro, *(key or check_key(fn, xs, owner)))
    found = owner.__dict__.setdefault("_exact_rows", {})
    if key not in found:
        probe = probe_rows(xs, micro)
        full = fn(*probe)       # under the caller's grad mode, which the key includes
        found[key] = tuple(k for k in range(1, micro)
                           if torch.equal(fn(*[None if p is None else p[:k] for p in probe]), full[:k])) + (micro,)
    return found[key]


def wide_rows(fn: Callable[..., torch.Tensor], xs: Sequence[torch.Tensor | None], owner: nn.Module,
              micro: int = SAMPLE_MICRO_BATCH, key: tuple | None = None) -> int:
    """The largest of WIDE_ROWS for which fn on that many rows gives every row bit for bit what fn gives
    it in its own chunk of `micro` rows, or `micro` when none does (or the input is too large). Found
    once per `check_key` on a probe made from the given rows (a matrix product or a convolution may
    block a larger batch otherwise, hence round otherwise); kept on `owner` beside exact_rows."""
    key = ("wide", micro, *(key or check_key(fn, xs, owner)))
    found = owner.__dict__.setdefault("_exact_rows", {})
    if key not in found:
        per_row = sum(x[0].numel() for x in xs if x is not None)
        sizes = [w for w in WIDE_ROWS if w % micro == 0 and w > micro and w * per_row <= WIDE_MAX_NUMEL]
        found[key] = micro
        if sizes:
            probe = probe_rows(xs, max(sizes))
            own = torch.cat([fn(*[None if p is None else p[j:j + micro] for p in probe])
                             for j in range(0, max(sizes), micro)])
            found[key] = next((w for w in sorted(sizes, reverse=True)
                               if torch.equal(fn(*[None if p is None else p[:w] for p in probe]), own[:w])), micro)
    return found[key]


def _perturbed(x: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x's rows idx, in x's memory layout; float rows made distinct by a little noise (so a kernel that
    mixed rows would show), integer rows (labels, timesteps) kept as they are, so they stay valid."""
    y = x[idx]
    if y.is_floating_point():
        y = y + 0.01 * torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else y


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
