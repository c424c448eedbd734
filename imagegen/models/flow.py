"""Flow: rectified flow / conditional flow matching on a U-Net or DiT, with ODE solvers, classifier-free
guidance and inpainting.

Implements
- Lipman et al., "Flow Matching for Generative Modeling" (ICLR 2023) and Liu, Gong & Liu, "Flow Straight
  and Fast: Learning to Generate and Transfer Data with Rectified Flow" (ICLR 2023): the straight path
  x_t = (1 - t) z + t x between noise z ~ N(0, I) (t = 0) and an image x (t = 1), and a network trained to
  predict its constant velocity x - z with a plain squared error;
- Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3, ICML
  2024): logit-normal sampling of t (more training where the path is hardest, mid-way), or uniform;
- Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022): a null class for `label_dropout` of the
  training labels, and v = v_null + guidance (v_label - v_null) when sampling;
- RePaint's resampling (Lugmayr et al., CVPR 2022) carried over to the straight path, for inpainting;
- the likelihood of an image (`log_likelihood`) by the instantaneous change of variables of Chen et al.
  (NeurIPS 2018) with the Hutchinson trace estimate of FFJORD (Grathwohl et al., ICLR 2019), as the
  flow-matching paper measures bits/dim.

Sampling integrates dx/dt = v(x, t) from t = 0 to 1 with a pure solver of imagegen/solvers.py: Euler,
midpoint or Heun on `steps` equal intervals (one, two, two network calls per interval), or adaptive
dopri5 (torchdiffeq) for an accurate reference. Randomness enters only as the starting noise (and the
re-noising of inpainting), drawn from per-image generators, so an image depends only on its seed.

Shapes: images N x C x H x W in [-1, 1]; t N numbers in [0, 1], handed to the backbone as 1000 t so its
sinusoidal time code sees the same range as a diffusion model's timesteps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import MAX_WEIGHT, Range, ranged
from ..errors import ConfigError
from ..paths import STRAIGHT
from ..solvers import (LIKELIHOOD_RHO, LIKELIHOOD_STEPS, Velocity, adaptive, euler, flow_log_likelihood,
                       flow_repaint, heun, midpoint)
from .backbone import BackboneConfig
from .base import ExportSpec, Generators, SampleOption, eval_mode, per_item_normal
from .ddpm import GUIDANCE, GUIDANCE_OPTION, MAX_SERVED_STEPS, STEPS
from .denoising import RESAMPLE, ObjectiveFamily

SOLVERS = {"euler": euler, "midpoint": midpoint, "heun": heun}   # and "dopri5", adaptive
TIME_SCALE = 1000.0
PROBES = Range(1, 64)   # Hutchinson probes per image


@dataclass
class Config(BackboneConfig):   # image size, channels, classes and the backbone's fields (backbone.py)
    time_sampling: Literal["logit-normal", "uniform"] = "logit-normal"
    logit_mean: float = ranged(0.0, -10.0, 10.0)                 # t = sigmoid(mean + std * N(0, 1))
    logit_std: float = ranged(1.0, 0.0, 10.0, lo_open=True)
    # The resolution shift of SD3 (sec. 5.3.2) and "simple diffusion" (Hoogeboom et al. 2023): a noise level
    # s = 1 - t is moved to k s / (1 + (k - 1) s), in training and on the solvers' grid, so that a large
    # image, whose pixels share more of their signal and survive more noise, spends more time near pure
    # noise. 0 = by size: k = sqrt(C x H x W / 4096) of what the backbone sees, so none up to 32 px images
    # and 64 px latents, 1.73 for 64 px RGB pixels.
    time_shift: float = ranged(0.0, 1.0, 100.0, zero="by size")
    # share of training labels replaced by the null class (for guidance)
    label_dropout: float = ranged(0.1, 0.0, 1.0, hi_open=True)
    lr: float = ranged(1e-3, 0.0, 1.0, lo_open=True)
    # Train on uniformly dequantised pixels, 2 (k + u) / 256 - 1, the points bits/dim is measured at
    # (evaluate/likelihood.py), instead of the 8-bit values themselves: a density, not spikes on a grid.
    dequantize: bool = False
    grad_clip: float = ranged(1.0, 0.0, MAX_WEIGHT)   # max global gradient norm (0 = off)
    # Sampling defaults; each can be overridden per call (--steps, --guidance, --solver).
    solver: Literal["euler", "midpoint", "heun", "dopri5"] = "heun"
    sample_steps: int = ranged(10, STEPS)       # intervals of the fixed-step solvers (dopri5 picks its own)
    guidance: float = ranged(1.5, GUIDANCE)     # 1 = plain conditional; 0 = unconditional; > 1 = stronger class

    def validate(self) -> None:
        self.validate_backbone()
        check_solver(self.solver, "model.solver")
        if self.dequantize and self.autoencoder:
            raise ConfigError("model.dequantize is for pixels; a latent model (model.autoencoder) learns latents")


def dequantize_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images k / 127.5 - 1 (k the 8-bit values) -> 2 (k + u) / 256 - 1, u ~ U[0, 1) per pixel: a uniform
    draw inside each pixel's bin, as evaluate/likelihood.py dequantises the test images."""
    return (torch.round((x + 1) * 127.5) + torch.rand(x.shape, generator=gen, device=x.device)) / 128 - 1


# not dopri5 on the page: adaptive, for reference runs, too slow to drag a slider with
SOLVER = SampleOption("ODE solver: euler, midpoint, heun, or dopri5 (adaptive)", choices=(*SOLVERS, "dopri5"),
                      menu=("heun", "euler", "midpoint"))


def check_solver(solver: str, what: str = "solver") -> None:
    SOLVER.check(solver, what)


class Flow(ObjectiveFamily):    # the backbone, label dropout, guided call: backbone.py; the sampling loops: denoising.py
    Config = Config
    name = "flow"
    summary = "rectified flow / flow matching, U-Net or DiT; Euler, Heun, dopri5; bits/dim"
    has_likelihood, distillable, trains_in_studio, learns_latents = True, True, True, True
    sample_options = {
        "steps": SampleOption("solver steps (default: the model's sample_steps; heun and midpoint call the network "
                              "twice a step)", STEPS, slider=(1, 100, 1, 20), served_max=MAX_SERVED_STEPS),
        "guidance": GUIDANCE_OPTION,
        "solver": SOLVER,
    }

    # --- training ------------------------------------------------------------------------------------

    @property
    def shift(self) -> float:
        """k of Config.time_shift: the config's, or by the size of what the backbone sees."""
        return self.cfg.time_shift or self.cfg.shift_by_size()

    def shifted(self, t):
        """Times (a tensor or a float) with their noise level s = 1 - t moved to k s / (1 + (k - 1) s): the
        time t / (t + k (1 - t)), which keeps 0 and 1 exact."""
        k = self.shift
        if k == 1.0:
            return t
        return t / (t + k * (1 - t))

    def sample_times(self, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        """N training times in (0, 1), shifted by resolution (Config.time_shift)."""
        if self.cfg.time_sampling == "uniform":
            return self.shifted(torch.rand(n, generator=gen, device=device))
        return self.shifted(torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(n, generator=gen, device=device)))

    def objective(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """The flow-matching loss of a batch, its times, noise and dropped labels drawn from gen."""
        x = self.training_images(batch)   # pixels, or in latent mode latents
        n, dev = x.shape[0], x.device
        if self.cfg.dequantize:
            x = dequantize_batch(x, gen)
        t = self.sample_times(n, gen, dev)
        z = torch.randn(x.shape, generator=gen, device=dev)
        y = self.training_labels(batch, gen)
        xt = STRAIGHT.point(x, z, t.view(n, 1, 1, 1))
        v = self.net(xt, TIME_SCALE * t, y, *self.training_text(batch, gen))
        return (v - STRAIGHT.target(x, z)).square().mean()

    # --- sampling ------------------------------------------------------------------------------------

    def velocity(self, labels: torch.Tensor | None, guidance: float, text=None, negative=None) -> Velocity:
        """velocity(x, t) -> dx/dt, with classifier-free guidance applied (BackboneFamily.guided)."""
        def v(x: torch.Tensor, t: float) -> torch.Tensor:
            return self.guided(x, torch.full((x.shape[0],), TIME_SCALE * t, device=x.device), labels, guidance,
                               text, negative)

        return v

    def plan(self, n: int, labels=None, steps=None, guidance=None, solver=None) -> Times:
        """The checked sampling options of n images, each defaulting to the config's."""
        labels = self.check_labels(n, labels) if labels is not None else None
        steps = self.cfg.sample_steps if steps is None else int(steps)
        guidance = self.cfg.guidance if guidance is None else float(guidance)
        solver = self.cfg.solver if solver is None else solver
        STEPS.check(steps, "steps")
        GUIDANCE.check(guidance, "guidance")
        check_solver(solver)
        grid = None if self.shift == 1.0 else [self.shifted(i / steps) for i in range(steps)] + [1.0]
        return Times(self, labels, steps, guidance, solver, grid=grid)

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """One network call: x, time (float in [0, 1]: 0 noise, 1 data) [+ label] [+ text] -> velocity; the
        solver runs outside (the run's solver and steps are in the metadata)."""
        return self.network_spec(["velocity"], "velocity = net(x, time[, label]) on the straight path x_t = (1 - t) z + "
                                 "t x_data; integrate from z ~ N(0, I) at time 0 to time 1",
                                 {"imagegen.solver": self.cfg.solver}, time_scale=TIME_SCALE)

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None,
               steps: int | None = None, guidance: float | None = None, solver: str | None = None,
               text=None, negative=None) -> torch.Tensor:
        """n images. labels None on a conditional model samples unconditionally (the null class); `text`
        (a TextEmbedding of n prompts) for a text model, `negative` its guidance's null branch."""
        return self.draw(self.plan(n, labels, steps, guidance, solver), n, generator, text, negative)

    @torch.no_grad()
    def from_noise(self, z: torch.Tensor, *, labels: torch.Tensor | None = None, steps: int | None = None,
                   guidance: float | None = None, solver: str | None = None, text=None, negative=None) -> torch.Tensor:
        """The images the ODE carries noise z (N x C x H x W at t = 0) to: a deterministic map, which
        `distill` learns in one step (a grounded model's texts without layouts get their most likely ones)."""
        return self.carry(self.plan(z.shape[0], labels, steps, guidance, solver), z, text, negative)

    @torch.no_grad()
    def edit(self, image: torch.Tensor, strength: float, *, labels: torch.Tensor | None = None,
             generator: Generators = None, steps: int | None = None, guidance: float | None = None,
             solver: str | None = None, text=None, negative=None) -> torch.Tensor:
        """SDEdit on the straight path: images N x C x H x W are moved back to t0 = 1 - strength,
        x_t0 = strength z + (1 - strength) x with fresh noise z, and solved forward to t = 1 over the last
        ceil(strength steps) of the sampler's intervals. Strength 1 starts from pure noise: exactly `sample`
        with the same generators; small strengths keep the layout and colours."""
        plan = self.plan(image.shape[0], labels, steps, guidance, solver)
        return self.redraw(plan, image, strength, generator, text, negative)

    def likelihood_estimator(self) -> str:
        """How log_likelihood estimates log p, for metrics.json."""
        self.pixels_only("bits/dim (a density over pixels)")
        return (f"probability-flow ODE solved backwards from the image, Heun on {LIKELIHOOD_STEPS} intervals at "
                f"s = 1 - t = (i / {LIKELIHOOD_STEPS})^{LIKELIHOOD_RHO:g}, divergence by "
                "Hutchinson's estimator with 1 Rademacher probe per image (unbiased); unconditional (null class)")

    def log_likelihood(self, x: torch.Tensor, *, generator: Generators = None, steps: int = LIKELIHOOD_STEPS,
                       rho: float = LIKELIHOOD_RHO, solver: str = "heun", probes: int = 1) -> torch.Tensor:
        """log p(x) in nats (N) of images x N x C x H x W, a density on [-1, 1]-valued pixels, under the
        model's unconditional flow (the null class of a conditional model: log p(x), not log p(x | y)).
        The divergence is Hutchinson's estimate with `probes` Rademacher vectors per image drawn from its
        generator and fixed along its path (unbiased; an exact trace would take C H W backward passes).
        With per-image generators and the fixed micro-batch of every network call, an image's value does
        not depend on its batch."""
        STEPS.check(steps, "steps")
        PROBES.check(probes, "probes")
        check_solver(solver)
        self.pixels_only("bits/dim (a density over pixels)")
        x = x.to(self.device, torch.float32)
        n = x.shape[0]
        eps = per_item_normal(n, (probes, *x.shape[1:]), generator, self.device).sign().transpose(0, 1)  # P x N x ...
        with eval_mode(self):
            v = self.velocity(None, 1.0)
            if solver == "dopri5":   # one image at a time, as in sample()
                return torch.cat([flow_log_likelihood(v, x[i:i + 1], solver=solver, probes=eps[:, i:i + 1])
                                  for i in range(n)])
            return flow_log_likelihood(v, x, steps=steps, rho=rho, solver=solver, probes=eps)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, *, labels: torch.Tensor | None = None,
                generator: Generators = None, steps: int | None = None, guidance: float | None = None,
                resample: int = 5, text=None, negative=None) -> torch.Tensor:
        """Fill the pixels where mask == 1 (mask N x 1 x H x W) of images N x C x H x W by RePaint on the
        straight path (Euler); the others are returned exactly as given. H and W may differ from the
        training size (outpainting)."""
        RESAMPLE.check(resample, "resample")
        plan = dataclasses.replace(self.plan(image.shape[0], labels, steps, guidance, "euler"), resample=resample)
        return self.fill(plan, image, mask, generator, text, negative)


@dataclass
class Times:
    """A flow sampling call (denoising.Plan): `steps` equal intervals from t = 0 to 1, or for an edit the
    times `grid` from t0 = 1 - strength."""
    model: Flow
    labels: torch.Tensor | None
    steps: int
    guidance: float
    solver: str
    t0: float = 0.0
    grid: list[float] | None = None
    resample: int = 5

    def start(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def solve(self, x: torch.Tensor, noise, text, negative) -> torch.Tensor:
        velocity = self.model.velocity
        if self.solver == "dopri5":   # one image at a time: its step sizes must not depend on the others
            def row(c, i):
                return None if c is None else c[i:i + 1]
            return torch.cat([adaptive(velocity(row(self.labels, i), self.guidance, row(text, i), row(negative, i)),
                                       x[i:i + 1])[0] for i in range(x.shape[0])])
        return SOLVERS[self.solver](velocity(self.labels, self.guidance, text, negative), x, self.grid or self.steps)

    def below(self, strength: float) -> Times:
        if self.solver == "dopri5":
            raise ConfigError("edit takes a fixed-step solver (euler, midpoint or heun), not dopri5")
        t0 = 1.0 - strength
        k = max(1, math.ceil(strength * self.steps - 1e-9))
        grid = [t0 + (1 - t0) * i / k for i in range(k + 1)]
        grid[-1] = 1.0
        return dataclasses.replace(self, t0=t0, grid=grid)

    def noised(self, image: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return STRAIGHT.point(image, z, self.t0)       # t0 = 0: the noise itself

    def repaint(self, z, noise, text, negative, known, keep) -> torch.Tensor:
        return flow_repaint(self.model.velocity(self.labels, self.guidance, text, negative), z, self.steps,
                            known=known, mask=keep, resample=self.resample, noise=noise)
