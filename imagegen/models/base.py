"""The interface every model family implements, and the helpers that make sampling per-seed exact.

| member                                  | contract                                                      |
|-----------------------------------------|---------------------------------------------------------------|
| `Config` dataclass (class attribute)    | every constructor hyper-parameter, JSON-serialisable          |
| `__init__(cfg)`                         | builds networks only: no data, no device moves, no files      |
| `configure_optimizers(train_cfg)`       | {"g": ..., "d": ...}; the loop owns and checkpoints them      |
| `train_step(batch, opt, gen)`           | forward, losses, backward, steps; returns {name: float}       |
| `sample(n, *, labels, generator, ...)`  | n x C x H x W in [-1, 1]                                      |

`gen` / `generator` are explicit torch.Generators: the loop hands `train_step` one seeded per step, so
training is reproducible and resumable without saving RNG state. `sample` takes either one generator or a
list of n, one per image, so that an image depends only on its own seed.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

# Networks always run at this batch size when sampling (padding the last chunk), because CPU
# convolution kernels pick different blockings, hence different float rounding, for different batch
# sizes. A fixed micro-batch makes every image bit-identical whatever batch size the user asks for.
SAMPLE_MICRO_BATCH = 16

Generators = torch.Generator | Sequence[torch.Generator] | None


class Family(nn.Module):
    """Base class of the model families (see the module docstring for the contract)."""

    Config: ClassVar[type]
    name: ClassVar[str]
    conditional: ClassVar[bool] = False

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        raise NotImplementedError

    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None, **opts) -> torch.Tensor:
        raise NotImplementedError


def per_item_normal(n: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """n x *shape standard normal noise. With a list of n generators, item i comes from generator i only."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn((n, *shape), generator=generator, device=device)
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} images")
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator]).to(device)


def run_fixed_batch(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, micro: int = SAMPLE_MICRO_BATCH) -> torch.Tensor:
    """fn(x) computed in chunks of exactly `micro` rows (the last padded with zeros, then trimmed)."""
    outs = []
    for i in range(0, x.shape[0], micro):
        chunk = x[i:i + micro]
        k = chunk.shape[0]
        if k < micro:
            chunk = torch.cat([chunk, chunk.new_zeros((micro - k, *chunk.shape[1:]))])
        outs.append(fn(chunk)[:k])
    return torch.cat(outs)
