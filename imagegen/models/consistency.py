"""Consistency: a network that maps a noisy image at any noise level straight to its clean image, trained
from scratch (no teacher), sampling in one step or a few, on a U-Net or DiT.

Implements
- Song, Dhariwal, Chen & Sutskever, "Consistency Models" (ICML 2023): consistency training (CT) on the
  probability-flow ODE of the variance-exploding path x_sigma = x + sigma z, sigma in [sigma_min, sigma_max];
  the parametrisation f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), whose
  c_skip = 1 and c_out = 0 at sigma_min make f(x, sigma_min) = x exactly (the boundary condition); the
  multistep sampler (their Algorithm 1) and zero-shot inpainting and editing (their Algorithm 4);
- Song & Dhariwal, "Improved Techniques for Training Consistency Models" (ICLR 2024): the teacher is the
  network itself with its gradient stopped (no EMA teacher), the pseudo-Huber distance
  d(a, b) = sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(C H W), the weight 1 / (sigma_{i+1} - sigma_i),
  noise levels drawn from a discretised lognormal (`noise_mean` -1.1, `noise_std` 2.0), and a curriculum that doubles
  the number of discretisation steps from `min_intervals` to `max_intervals` over `curriculum_steps`;
- Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, NeurIPS 2022):
  the noise levels sigma_i = (sigma_min^(1/7) + (i - 1) / (N - 1) (sigma_max^(1/7) - sigma_min^(1/7)))^7 and the
  scalings c_in, c_out, c_skip with sigma_data = 0.5;
- classifier-free guidance (Ho & Salimans 2022) on the one-step output, and class or text conditioning,
  through the backbone the diffusion and flow families share (backbone.py).

One update: an image x, one noise z and an interval i; the loss compares f(x + sigma_{i+1} z, sigma_{i+1}) with
the stopped f(x + sigma_i z, sigma_i): the network learns to give the same clean image from both points of
one ODE path. Sampling: x = sigma_max z, then f; each further step re-noises to the next of `sigmas(steps)`
with fresh noise from the image's own generator, so an image depends only on its seed.

Shapes: images N x C x H x W in [-1, 1]; sigma N noise levels, handed to the backbone as
c_noise = 1000 (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min), in [0, 1000] as the flow's 1000 t.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import MAX_WEIGHT, Range, ranged
from ..errors import ConfigError
from .backbone import BackboneConfig
from .base import ExportSpec, Generators, SampleOption
from .ddpm import GUIDANCE, GUIDANCE_OPTION
from .denoising import DenoisingFamily

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0     # EDM's noise range and spacing
TIME_SCALE = 1000.0
STEPS = Range(1, 64)
INPAINT_STEPS = 8    # inpainting's default: each step puts the kept pixels back, so it needs a few


@dataclass
class Config(BackboneConfig):   # image size, channels, classes and the backbone's fields (backbone.py)
    sigma_data: float = ranged(0.5, 0.0, 10.0, lo_open=True)     # the data's spread, for the EDM scalings
    # The curriculum: the discretisation has min_intervals intervals at step 0 and doubles every
    # curriculum_steps / (log2(max / min) + 1) steps up to max_intervals (iCT: 10 and 1280). Set
    # curriculum_steps near the run's length (train.steps, or what train.time_limit reaches).
    min_intervals: int = ranged(10, 1, 10_000)
    max_intervals: int = ranged(20, 1, 10_000)
    curriculum_steps: int = ranged(3000, 1, 10_000_000)
    # "discrete": iCT's levels and intervals; "continuous": ECT's (Geng et al., "Consistency Models Made
    # Easy", 2024) pairs of levels whose gap halves as often as the intervals double
    curriculum: Literal["discrete", "continuous"] = "discrete"
    # ln sigma of the training levels ~ N(noise_mean, noise_std), discretised to the intervals (iCT: -1.1, 2.0)
    noise_mean: float = ranged(-1.1, -10.0, 10.0)
    noise_std: float = ranged(2.0, 0.0, 10.0, lo_open=True)
    huber_c: float = ranged(0.00054, 0.0, 1.0)    # times sqrt(C H W): the pseudo-Huber constant (0 = squared error)
    label_dropout: float = ranged(0.1, 0.0, 1.0, hi_open=True)   # share of training labels replaced by the null class
    lr: float = ranged(1e-3, 0.0, 1.0, lo_open=True)
    grad_clip: float = ranged(1.0, 0.0, MAX_WEIGHT)
    # Sampling defaults; each can be overridden per call (--steps, --guidance).
    sample_steps: int = ranged(1, STEPS)
    mid_sigma: float = ranged(0.821, SIGMA_MIN, SIGMA_MAX, lo_open=True)   # the last level of a multistep sample (iCT: 0.821)
    guidance: float = ranged(1.5, GUIDANCE)     # 1 = plain conditional; 0 = unconditional; > 1 = stronger class

    def validate(self) -> None:
        self.validate_backbone()
        if self.autoencoder:
            raise ConfigError("model.autoencoder: consistency training works on pixels only (latent mode is for flow "
                              "and ddpm)")
        if self.max_intervals < self.min_intervals:
            raise ConfigError(f"model.max_intervals {self.max_intervals} is below model.min_intervals {self.min_intervals}")


def karras_level(u: float, hi: float = SIGMA_MAX, lo: float = SIGMA_MIN) -> float:
    """The noise level u of the way from hi (u = 0) down to lo (u = 1) on EDM's rho = 7 spacing."""
    a, b = hi ** (1 / RHO), lo ** (1 / RHO)
    return (a + u * (b - a)) ** RHO


def karras_sigmas(n: int, hi: float = SIGMA_MAX, lo: float = SIGMA_MIN) -> list[float]:
    """n noise levels from hi down to lo (n >= 2), spaced as EDM's rho = 7 schedule."""
    return [karras_level(j / (n - 1), hi, lo) for j in range(n)]


class Consistency(DenoisingFamily):    # the backbone, label dropout, guided call: backbone.py; the sampling loops: denoising.py
    Config = Config
    name = "consistency"
    summary = "consistency model trained from scratch (iCT), U-Net or DiT; 1 or 2 steps, guidance, inpainting"
    trains_in_studio = True
    sample_options = {
        "steps": SampleOption("sampling steps: 1, or a few that re-noise and denoise again (default: the model's "
                              "sample_steps)", STEPS, slider=(1, 8, 1, 1)),
        "guidance": GUIDANCE_OPTION,
    }

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        # Training updates made, for the curriculum: saved with the weights, so a resumed run goes on with
        # the discretisation it had.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    # --- the parametrisation ---------------------------------------------------------------------------

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) as N x 1 x 1 x 1 and c_noise (N) for noise levels sigma (N)."""
        sd = self.cfg.sigma_data
        s = sigma.view(-1, 1, 1, 1)
        c_skip = sd ** 2 / ((s - SIGMA_MIN) ** 2 + sd ** 2)
        c_out = (s - SIGMA_MIN) * sd / (sd ** 2 + s ** 2).sqrt()
        c_in = 1 / (sd ** 2 + s ** 2).sqrt()
        c_noise = TIME_SCALE * (sigma.log() - math.log(SIGMA_MIN)) / (math.log(SIGMA_MAX) - math.log(SIGMA_MIN))
        return c_skip, c_out, c_in, c_noise

    def consistency(self, x: torch.Tensor, sigma: torch.Tensor, labels, text: list[torch.Tensor]) -> torch.Tensor:
        """f(x, sigma) for training: N x C x H x W noisy images at levels sigma (N) -> their clean images."""
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise, labels, *text)

    # --- training --------------------------------------------------------------------------------------

    def intervals(self, update: int) -> int:
        """The curriculum: how many intervals the discretisation has at this update (iCT's N(k) - 1)."""
        cfg = self.cfg
        doublings = math.floor(math.log2(cfg.max_intervals / cfg.min_intervals)) + 1
        phase = max(1, cfg.curriculum_steps // doublings)
        return min(cfg.min_intervals * 2 ** (update // phase), cfg.max_intervals)

    def draw_intervals(self, n: int, sigmas: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """n interval indices i (sigma_i < sigma_{i+1}, sigmas ascending), each with the lognormal's mass
        between its two ends."""
        cdf = torch.special.erf((sigmas.log() - self.cfg.noise_mean) / (math.sqrt(2) * self.cfg.noise_std))
        weights = (cdf[1:] - cdf[:-1]).clamp_min(0)
        return torch.multinomial(weights, n, replacement=True, generator=gen)

    def levels(self, n: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(lo, hi, k): n pairs of noise levels lo < hi to make consistent, and the curriculum's stage k
        (intervals, or halvings of hi - lo)."""
        k = self.intervals(int(self.updates))
        if self.cfg.curriculum == "discrete":
            sigmas = torch.tensor(karras_sigmas(k + 1)[::-1], dtype=torch.float64)    # k + 1 levels, ascending
            i = self.draw_intervals(n, sigmas, gen)
            return sigmas[i].to(device, torch.float32), sigmas[i + 1].to(device, torch.float32), k
        # ECT: hi from the lognormal itself, lo = hi (1 - (1 + 8 sigmoid(-hi)) / 2^(stage + 1)): the gap
        # halves each stage, wider at low noise, where it starts as plain denoising (lo at sigma_min).
        stage = round(math.log2(k / self.cfg.min_intervals))
        hi = (self.cfg.noise_mean + self.cfg.noise_std * torch.randn(n, generator=gen, device=device)).exp()
        hi = hi.clamp(2 * SIGMA_MIN, SIGMA_MAX)
        lo = hi * (1 - (1 + 8 * torch.sigmoid(-hi)) / 2 ** (stage + 1))
        return lo.clamp_min(SIGMA_MIN), hi, stage

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        x = batch["image"]
        n, dev = x.shape[0], x.device
        lo, hi, k = self.levels(n, gen, dev)
        z = torch.randn(x.shape, generator=gen, device=dev)
        y = self.training_labels(batch, gen)
        text = self.training_text(batch, gen)
        with torch.no_grad():    # the teacher: the same network at the lower level, its gradient stopped
            target = self.consistency(x + lo.view(-1, 1, 1, 1) * z, lo, y, text)
        pred = self.consistency(x + hi.view(-1, 1, 1, 1) * z, hi, y, text)
        c = self.cfg.huber_c * math.sqrt(x[0].numel())
        dist = ((pred - target).square().flatten(1).sum(1) + c * c).sqrt() - c      # pseudo-Huber, N
        loss = (dist / (hi - lo)).mean()
        self.updates += 1
        return self.update(opt, loss, batch) | {"curriculum": float(k)}

    # --- sampling --------------------------------------------------------------------------------------

    def sigmas(self, steps: int) -> list[float]:
        """The noise levels a `steps`-step sample denoises from: sigma_max, then down to mid_sigma."""
        return [SIGMA_MAX] if steps == 1 else karras_sigmas(steps, SIGMA_MAX, self.cfg.mid_sigma)

    def plan(self, n: int, labels=None, steps=None, guidance=None) -> Levels:
        """The checked sampling options of n images, each defaulting to the config's."""
        labels = self.check_labels(n, labels) if labels is not None else None
        steps = self.cfg.sample_steps if steps is None else int(steps)
        guidance = self.cfg.guidance if guidance is None else float(guidance)
        STEPS.check(steps, "steps")
        GUIDANCE.check(guidance, "guidance")
        return Levels(self, labels, self.sigmas(steps), guidance)

    def denoise(self, x: torch.Tensor, sigma: float, labels, guidance: float, text=None, negative=None) -> torch.Tensor:
        """f(x, sigma) with classifier-free guidance, for sampling (BackboneFamily.guided: fixed
        micro-batches, the engine): the guided output F is f's, since f is affine in F."""
        s = torch.full((x.shape[0],), sigma, device=x.device)
        c_skip, c_out, c_in, c_noise = self.scalings(s)
        return c_skip * x + c_out * self.guided(c_in * x, c_noise, labels, guidance, text, negative)

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None,
               steps: int | None = None, guidance: float | None = None, text=None, negative=None) -> torch.Tensor:
        """n images from noise in `steps` network calls (two with guidance other than 0 or 1, per step).
        labels None on a conditional model samples unconditionally (the null class); `text` (a
        TextEmbedding of n prompts) for a text model, `negative` its guidance's null branch."""
        return self.draw(self.plan(n, labels, steps, guidance), n, generator, text, negative)

    @torch.no_grad()
    def edit(self, image: torch.Tensor, strength: float, *, labels: torch.Tensor | None = None,
             generator: Generators = None, steps: int | None = None, guidance: float | None = None,
             text=None, negative=None) -> torch.Tensor:
        """SDEdit in one step: images N x C x H x W noised to the level at `strength` of the EDM spacing
        (1: sigma_max, where the image is 1/80 of the start), denoised, then the sampler's further levels
        below it. Small strengths keep the layout and colours."""
        return self.redraw(self.plan(image.shape[0], labels, steps, guidance), image, strength, generator, text, negative)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, *, labels: torch.Tensor | None = None,
                generator: Generators = None, steps: int | None = None, guidance: float | None = None,
                text=None, negative=None) -> torch.Tensor:
        """Fill the pixels where mask == 1 (mask N x 1 x H x W) of images N x C x H x W by the multistep
        sampler with the kept pixels put back after each step (Algorithm 4; default INPAINT_STEPS steps);
        the kept pixels are returned exactly as given. H and W may differ from the training size."""
        plan = self.plan(image.shape[0], labels, INPAINT_STEPS if steps is None else steps, guidance)
        return self.fill(plan, image, mask, generator, text, negative)

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """One call of f: x, time (the noise level sigma, at least sigma_min) [+ label] [+ text] -> the clean
        image; a k-step sample runs outside (the run's levels are in the metadata)."""
        levels = ",".join(f"{s:.6g}" for s in self.sigmas(self.cfg.sample_steps))
        spec = self.network_spec(["image"], f"image = f(x, time[, label]): x = time * z, z ~ N(0, I), at time = "
                                 f"{SIGMA_MAX:g}; for each further level s re-noise x = image + sqrt(s^2 - {SIGMA_MIN:g}^2) z "
                                 "and call again", {"imagegen.sigmas": levels})
        net = spec.fn

        def fn(x, sigma, *rest):
            c_skip, c_out, c_in, c_noise = self.scalings(sigma.clamp_min(SIGMA_MIN))
            return c_skip * x + c_out * net(c_in * x, c_noise, *rest)

        return dataclasses.replace(spec, fn=fn)


@dataclass
class Levels:
    """A consistency sampling call (denoising.Plan): the noise levels it denoises from, the highest first."""
    model: Consistency
    labels: torch.Tensor | None
    sigmas: list[float]
    guidance: float

    def start(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigmas[0] * z

    def solve(self, x: torch.Tensor, noise, text, negative, known: torch.Tensor | None = None,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """x at level sigmas[0] denoised, then for each further level re-noised to it with fresh noise and
        denoised again (Algorithm 1); with `known` and `keep` (1 = keep), the kept pixels are put back
        after every step (Algorithm 4)."""
        for j, sigma in enumerate(self.sigmas):
            if j:
                x = x + math.sqrt(sigma ** 2 - SIGMA_MIN ** 2) * noise()
            x = self.model.denoise(x, sigma, self.labels, self.guidance, text, negative)
            if known is not None:
                x = torch.where(keep.bool(), known, x)
        return x.clamp(-1, 1)

    def below(self, strength: float) -> Levels:
        start = karras_level(1 - strength)
        return dataclasses.replace(self, sigmas=[start] + [s for s in self.sigmas[1:] if s < start])

    def noised(self, image: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return image + self.sigmas[0] * z

    def repaint(self, z, noise, text, negative, known, keep) -> torch.Tensor:
        return self.solve(known * keep + self.sigmas[0] * z, noise, text, negative, known=known, keep=keep)
