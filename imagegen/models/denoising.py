"""Sampling, editing and inpainting written once for the families that carry noise to an image in steps
(ddpm, flow, consistency). A family says how in a `Plan` made by its `plan(...)` from its own checked
options: where the noise starts, how the schedule runs (its solver on one callable), how an image is
noised for an edit, and how the schedule runs with known pixels put back. The loops here fix, for every
such family, what comes first: the options are checked, then a grounded model's layouts are drawn, then
the noise, each image's from its own generator, so that an image depends only on its seed.

Shapes: images and noise N x C x H x W in [-1, 1] (an inpainting canvas may be larger than the training
size); masks N x 1 x H x W, 1 where pixels are generated.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import Range
from ..solvers import Noise
from ..text import TextEmbedding
from .backbone import BackboneFamily, keep_known
from .base import Generators, eval_mode

STRENGTH = Range(0.0, 1.0, float, lo_open=True)   # how far back SDEdit (edit, `imagegen vary`) re-noises an image
RESAMPLE = Range(1, 100)     # RePaint passes per step (inpainting's --resample)


class Plan(Protocol):
    """One sampling call of a family: its checked options (labels, guidance, the schedule) and how it
    runs them. `text` and `negative` are the call's prompts (TextEmbedding or None)."""

    def start(self, z: torch.Tensor) -> torch.Tensor:
        """The starting point of a sample from standard noise z."""

    def solve(self, x: torch.Tensor, noise: Noise, text, negative) -> torch.Tensor:
        """x at the schedule's first level carried to an image; `noise()` gives fresh per-image noise."""

    def below(self, strength: float) -> "Plan":
        """The plan of an edit: the part of the schedule at or below `strength` (0 data, 1 pure noise)."""

    def noised(self, image: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """image moved to the schedule's first level with noise z."""

    def repaint(self, z: torch.Tensor, noise: Noise, text, negative, known: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """A canvas from noise z with the pixels where keep == 1 held to `known` along the way."""


class DenoisingFamily(BackboneFamily):
    """A backbone family that samples by a Plan. Its public `sample`, `edit` and `inpaint` take the
    family's own options and hand its plan to the loops below."""

    edits, inpaints = True, True

    def draw(self, plan: Plan, n: int, generator: Generators, text: TextEmbedding | None,
             negative: TextEmbedding | None) -> torch.Tensor:
        """n images from noise."""
        text, negative = self.prompts(n, text, negative, generator)   # a grounded model's layouts, then the noise
        noise = self._noise(n, self.space_shape(self.cfg.image_size, self.cfg.image_size), generator)
        with eval_mode(self):
            return self.from_space(plan.solve(plan.start(noise()), noise, text, negative))

    def carry(self, plan: Plan, z: torch.Tensor, text: TextEmbedding | None,
              negative: TextEmbedding | None) -> torch.Tensor:
        """The images the plan's deterministic sampler makes of noise z (N x C x H x W at its first level):
        the map that `distill` learns. A grounded model's texts without layouts get their most likely ones."""
        self.pixels_only("distillation")
        text, negative = self.prompts(z.shape[0], text, negative, None, draw=False)
        with eval_mode(self):
            return plan.solve(z.to(self.device), None, text, negative).clamp(-1, 1)

    def redraw(self, plan: Plan, image: torch.Tensor, strength: float, generator: Generators,
               text: TextEmbedding | None, negative: TextEmbedding | None) -> torch.Tensor:
        """SDEdit (Meng et al., ICLR 2022): images noised to `strength` of the way to pure noise, then
        carried back by the part of the schedule below it."""
        STRENGTH.check(strength, "strength")
        plan = plan.below(strength)
        n = image.shape[0]
        text, negative = self.prompts(n, text, negative, generator)
        noise = self._noise(n, self.space_shape(*image.shape[-2:]), generator)
        with eval_mode(self):
            x = plan.noised(self.to_space(image.to(self.device, torch.float32)), noise())
            return self.from_space(plan.solve(x, noise, text, negative))

    def fill(self, plan: Plan, image: torch.Tensor, mask: torch.Tensor, generator: Generators,
             text: TextEmbedding | None, negative: TextEmbedding | None) -> torch.Tensor:
        """The pixels where mask == 1 generated on the canvas padded to the backbone's multiple; the others
        returned exactly as given. In latent mode the schedule keeps the latent cells whose pixels are all
        kept, and the decoded canvas then gets every kept pixel back exactly."""
        self.check_inpaint(image, mask)
        n = image.shape[0]
        text, negative = self.prompts(n, text, negative, generator)
        image, known, keep, noise = self.canvas(image, mask, generator)
        with eval_mode(self):
            if self.latent is None:
                x = plan.repaint(noise(), noise, text, negative, known, keep)
            else:   # a latent cell is kept only when every pixel it covers is (a min-pool of keep)
                cells = -F.max_pool2d(-keep, self.cfg.latent_factor)
                x = self.from_space(plan.repaint(noise(), noise, text, negative, self.to_space(known), cells))
        return keep_known(x, image, keep)


class ObjectiveFamily(DenoisingFamily):
    """A denoising family whose training is one loss, `objective(batch, gen)` (ddpm, flow): its update
    step, and the same loss on held-out images for the validation curve."""

    validates = True

    def objective(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        return self.update(opt, self.objective(batch, gen), batch)

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> float:
        """The objective on held-out images in eval mode, its noise, times and dropped labels from gen."""
        with eval_mode(self):
            return float(self.objective(batch, gen))
