"""random: the random-pixel baseline, the floor every other family must beat.

Two modes, both honest "models" that train, save and sample like any other family:
- "uniform": every pixel value uniform in 0..255, independent (what "random image generation" means in
  the seed documents);
- "pixel" (default): each pixel drawn independently from its own value histogram on the training set,
  so the baseline knows the mean image and every pixel's spread, but nothing about how pixels go
  together. Metrics that cannot tell it from real data are not measuring structure.

"Training" is one pass over the data in `prepare` (a 256-bin histogram per pixel, with add-`smoothing`
counts); the training steps after it change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import MAX_IMAGE_SIZE, MAX_WEIGHT, ranged
from ..errors import ExportError
from .base import Family, Generators

CHUNK = 4096  # images per histogram update: bounds the memory of the one-hot scatter


@dataclass
class Config:
    image_size: int = ranged(28, 8, MAX_IMAGE_SIZE)   # filled in from the data
    channels: int = ranged(1, 1, 3)                   # filled in from the data
    mode: Literal["pixel", "uniform"] = "pixel"
    smoothing: float = ranged(0.5, 0.0, MAX_WEIGHT)   # pseudo-count added to every histogram bin


class RandomPixels(Family):
    Config = Config
    name = "random"
    summary = "the floor: each pixel drawn from its histogram"
    train_defaults = {"steps": 1, "sample_every": 0}

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        pixels = cfg.channels * cfg.image_size * cfg.image_size
        self.register_buffer("counts", torch.zeros(pixels, 256))          # P x 256 value histogram per pixel

    def export_spec(self, direction: str = "a2b"):
        raise ExportError(f"model {self.name!r} has no network to export (the random-pixel baseline draws each "
                          f"pixel from the training histogram)")

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        return {}

    @torch.no_grad()
    def prepare(self, dataset, steps: int | None = None) -> None:
        counts = torch.zeros_like(self.counts, device="cpu")
        for i in range(0, len(dataset), CHUNK):
            values = dataset.images[i:i + CHUNK].flatten(1).long()           # n x P in 0..255
            counts.scatter_add_(1, values.T, torch.ones(values.shape[::-1]))
        self.counts.copy_(counts)

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        return {}

    def _cdf(self) -> torch.Tensor:
        """P x 256 cumulative shares per pixel (last column 1), in float64 on the CPU. Made once per state
        of the counts (prepare and load_state_dict change them in place, which bumps their version), not on
        every call: for 28 x 28 images it cost most of what one image took (0.7 ms)."""
        key = (self.counts._version, self.counts.data_ptr(), self.counts.device)
        if getattr(self, "_cdf_key", None) != key:
            counts = (self.counts + self.cfg.smoothing).double().cpu()                       # P x 256, unnormalised
            self._cdf_cache = (counts.cumsum(1) / counts.sum(1, keepdim=True)).contiguous()
            self._cdf_key = key
        return self._cdf_cache

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None) -> torch.Tensor:
        self.check_labels(n, labels)
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * n
        shape = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        cdf = self._cdf()
        out = []
        for g in gens:   # one draw per image from its own generator, so images depend only on their seed
            if self.cfg.mode == "uniform":
                v = torch.randint(0, 256, shape, generator=g)
            else:            # inverse-CDF sampling: the first bin whose cumulative share exceeds u
                u = torch.rand((cdf.shape[0], 1), generator=g, dtype=torch.float64)
                v = torch.searchsorted(cdf, u, right=True).clamp(max=255).view(shape)
            out.append(v)
        return (torch.stack(out).float() / 127.5 - 1).to(self.device)
