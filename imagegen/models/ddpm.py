"""DDPM: denoising diffusion with a small U-Net or DiT, DDIM sampling, classifier-free guidance and inpainting.

Implements
- Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020): the forward process,
  the U-Net denoiser with a sinusoidal time embedding, and ancestral sampling;
- Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models" (ICML 2021): the cosine schedule;
- Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021): DDIM with `eta`;
- Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR 2022): v-prediction;
- Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022): one network, conditional and unconditional
  (a learned null class, used for `label_dropout` of the training labels), mixed at sampling time;
- Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy" (ICCV 2023): loss weights
  that converge faster, which matters in a CPU budget;
- Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic Models" (CVPR 2022): known
  pixels re-noised to every step's level, with resampling (jump back one step and redo it) to harmonise;
- Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (WACV 2024): "trailing"
  timestep spacing, so that a few-step sampler starts from the last (pure-noise) timestep.

Shapes: images x are N x C x H x W in [-1, 1]; timesteps t are N integers in [0, T). The backbone
(`model.backbone`: the U-Net of nets/unet.py or the DiT of nets/dit.py, Peebles & Xie 2023) also runs on
canvases larger than the training size (outpainting), padded to multiples of 2^(len(mults) - 1) (U-Net)
or of the patch size (DiT).

The solvers (`ddim`, `ddpm_ancestral`, `repaint`, in imagegen/solvers.py) are pure functions of a
`denoise(x, t) -> (x0, eps)` callable, the cumulative alpha table and the timesteps; randomness comes in
through a `noise()` callable fed by per-image generators, so an image depends only on its seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import MAX_WEIGHT, Range, ranged
from ..errors import ConfigError
from ..paths import DiffusionPath
from ..solvers import Denoise, ddim, ddpm_ancestral, repaint, spaced_timesteps
from .backbone import BackboneConfig
from .base import ExportSpec, Generators, SampleOption
from .denoising import RESAMPLE, ObjectiveFamily

MAX_SAMPLE_STEPS = 1000
# Sampling options' ranges, shared by the config defaults and the CLI's --steps, --eta, --guidance.
STEPS = Range(1, MAX_SAMPLE_STEPS)
ETA = Range(0.0, 1.0, float)
GUIDANCE = Range(0.0, 30.0, float)
MAX_SERVED_STEPS = 100   # the server's cap on steps per request (its images x steps has a cap of its own)
GUIDANCE_OPTION = SampleOption("classifier-free guidance scale: 0 unconditional, 1 conditional, >1 stronger",
                               GUIDANCE, slider=(0, 5, 0.1, 1.5), served_max=20)
SAMPLER = SampleOption("ddim or ddpm (ancestral)", choices=("ddim", "ddpm"))


@dataclass
class Config(BackboneConfig):   # image size, channels, classes and the backbone's fields (backbone.py)
    timesteps: int = ranged(1000, 1, 100_000)   # T
    schedule: Literal["cosine", "linear"] = "cosine"
    # The resolution shift (as flow's time_shift): the schedule's signal-to-noise ratio at every step divided
    # by k^2, alpha_bar -> alpha_bar / (alpha_bar + k^2 (1 - alpha_bar)) ("simple diffusion" shifts the cosine
    # schedule's log-SNR by 2 log k the same way). 0 = by size: k = sqrt(C x H x W / 4096) of what the backbone
    # sees, so none up to 32 px images and 64 px latents, 1.73 for 64 px RGB pixels.
    schedule_shift: float = ranged(0.0, 1.0, 100.0, zero="by size")
    prediction: Literal["eps", "v"] = "v"
    weighting: Literal["min-snr", "uniform"] = "min-snr"
    min_snr_gamma: float = ranged(5.0, 0.0, MAX_WEIGHT, lo_open=True)
    # share of training labels replaced by the null class (for guidance)
    label_dropout: float = ranged(0.1, 0.0, 1.0, hi_open=True)
    lr: float = ranged(1e-3, 0.0, 1.0, lo_open=True)
    grad_clip: float = ranged(1.0, 0.0, MAX_WEIGHT)   # max global gradient norm (0 = off)
    # Sampling defaults; each can be overridden per call (--steps, --guidance, --eta, --sampler).
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = ranged(20, STEPS)
    eta: float = ranged(0.0, ETA)
    guidance: float = ranged(1.5, GUIDANCE)   # 1 = plain conditional; 0 = unconditional; > 1 = stronger class

    def validate(self) -> None:
        self.validate_backbone()
        check_sampling(self.sample_steps, self.eta, self.guidance, self.timesteps, "model.")


def check_sampling(steps: int, eta: float, guidance: float, timesteps: int, prefix: str = "") -> None:
    STEPS.check(steps, f"{prefix}{'sample_' if prefix else ''}steps")
    if steps > timesteps:
        raise ConfigError(f"steps must be at most the model's {timesteps} timesteps, got {steps}")
    ETA.check(eta, f"{prefix}eta")
    GUIDANCE.check(guidance, f"{prefix}guidance")


# --- the noise schedule ------------------------------------------------------------------------------


def alphas_cumprod(kind: str, T: int, shift: float = 1.0) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float64): the share of signal variance left at step t, with its
    signal-to-noise ratio alpha_bar / (1 - alpha_bar) divided by shift^2 (Config.schedule_shift)."""
    if kind == "linear":   # Ho et al.: betas from 1e-4 to 0.02 for T = 1000, rescaled for other T
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    else:                  # Nichol & Dhariwal: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    ab = torch.cumprod(1 - betas, 0)
    return ab if shift == 1.0 else ab / (ab + shift ** 2 * (1 - ab))


# --- the family ------------------------------------------------------------------------------------


class DDPM(ObjectiveFamily):    # the backbone, label dropout, guided call: backbone.py; the sampling loops: denoising.py
    Config = Config
    name = "ddpm"
    summary = "diffusion, U-Net or DiT; DDIM, guidance, inpainting, outpainting"
    distillable, trains_in_studio, learns_latents = True, True, True
    sample_options = {
        "steps": SampleOption("denoising steps (default: the model's sample_steps)", STEPS, slider=(1, 100, 1, 20),
                              served_max=MAX_SERVED_STEPS),
        "guidance": GUIDANCE_OPTION,
        "eta": SampleOption("DDIM noise: 0 deterministic, 1 like DDPM", ETA, slider=(0, 1, 0.05, 0)),
        "sampler": SAMPLER,
    }

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.register_buffer("ab", alphas_cumprod(cfg.schedule, cfg.timesteps, self.shift).float(), persistent=False)

    @property
    def shift(self) -> float:
        """k of Config.schedule_shift: the config's, or by the size of what the backbone sees."""
        return self.cfg.schedule_shift or self.cfg.shift_by_size()

    @property
    def path(self) -> DiffusionPath:
        """x_t, the training target and the conversions (paths.py), on the table where the model is now."""
        return DiffusionPath(self.ab, self.cfg.prediction)

    # --- training ------------------------------------------------------------------------------------

    def objective(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """The weighted diffusion loss of a batch, its timesteps, noise and dropped labels drawn from gen."""
        x0 = self.training_images(batch)   # pixels, or in latent mode latents
        n, dev = x0.shape[0], x0.device
        t = torch.randint(0, self.cfg.timesteps, (n,), generator=gen, device=dev)
        eps = torch.randn(x0.shape, generator=gen, device=dev)
        y = self.training_labels(batch, gen)
        path = self.path
        a = path.level(t)
        xt = path.point(x0, eps, a)
        target = path.target(x0, eps, a)
        per_image = (self.net(xt, t, y, *self.training_text(batch, gen)) - target).square().mean(dim=(1, 2, 3))   # N
        snr = path.snr(a.view(n))
        if self.cfg.weighting == "min-snr":   # min(SNR, gamma) / SNR as an x0 loss, rewritten for the target
            w = snr.clamp(max=self.cfg.min_snr_gamma) / (snr if self.cfg.prediction == "eps" else snr + 1)
        else:
            w = torch.ones_like(snr)
        return (w * per_image).mean()

    # --- sampling ------------------------------------------------------------------------------------

    def denoiser(self, labels: torch.Tensor | None, guidance: float, text=None, negative=None) -> Denoise:
        """denoise(x, t) -> (x0, eps), with x0 clipped to [-1, 1] and classifier-free guidance applied."""
        path = self.path

        def denoise(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.guided(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), labels, guidance,
                              text, negative)
            return path.split(x, out, path.level(t))

        return denoise

    def plan(self, n: int, labels=None, steps=None, guidance=None, eta=None, sampler=None) -> Timesteps:
        """The checked sampling options of n images, each defaulting to the config's."""
        labels = self.check_labels(n, labels) if labels is not None else None
        steps = self.cfg.sample_steps if steps is None else int(steps)
        guidance = self.cfg.guidance if guidance is None else float(guidance)
        eta = self.cfg.eta if eta is None else float(eta)
        sampler = self.cfg.sampler if sampler is None else sampler
        SAMPLER.check(sampler, "sampler")
        check_sampling(steps, eta, guidance, self.cfg.timesteps)
        return Timesteps(self, labels, spaced_timesteps(self.cfg.timesteps, steps), guidance, eta, sampler)

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """One network call: x, time (int64 0..T-1) [+ label] [+ text] -> the predicted noise or v; DDIM runs
        outside over the schedule in the metadata."""
        cfg = self.cfg
        usage = (f"out = net(x_t, time[, label]): the predicted {'noise' if cfg.prediction == 'eps' else 'v'} at "
                 f"timestep `time` of {cfg.timesteps}; sample with DDIM over imagegen.alphas_cumprod")
        return self.network_spec(["out"], usage, {
            "imagegen.prediction": cfg.prediction,
            "imagegen.alphas_cumprod": json.dumps([round(float(a), 9) for a in self.ab])}, time_steps=cfg.timesteps)

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None,
               steps: int | None = None, guidance: float | None = None, eta: float | None = None,
               sampler: str | None = None, text=None, negative=None) -> torch.Tensor:
        """n images. labels None on a conditional model samples unconditionally (the null class); `text`
        (a TextEmbedding of n prompts) for a text model, `negative` its guidance's null branch."""
        return self.draw(self.plan(n, labels, steps, guidance, eta, sampler), n, generator, text, negative)

    @torch.no_grad()
    def edit(self, image: torch.Tensor, strength: float, *, labels: torch.Tensor | None = None,
             generator: Generators = None, steps: int | None = None, guidance: float | None = None,
             eta: float | None = None, sampler: str | None = None, text=None, negative=None) -> torch.Tensor:
        """SDEdit: images N x C x H x W noised to the first of the sampler's timesteps at or below
        strength (T - 1), x_k = sqrt(ab_k) x + sqrt(1 - ab_k) z, then denoised by the remaining timesteps.
        Small strengths keep the layout and colours; 1 starts from (almost) pure noise."""
        plan = self.plan(image.shape[0], labels, steps, guidance, eta, sampler)
        return self.redraw(plan, image, strength, generator, text, negative)

    @torch.no_grad()
    def from_noise(self, z: torch.Tensor, *, labels: torch.Tensor | None = None, steps: int | None = None,
                   guidance: float | None = None, text=None, negative=None) -> torch.Tensor:
        """The images deterministic DDIM (eta = 0) makes of noise z (N x C x H x W at the last timestep):
        the map that `distill` learns in one step."""
        return self.carry(self.plan(z.shape[0], labels, steps, guidance, 0.0, "ddim"), z, text, negative)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, *, labels: torch.Tensor | None = None,
                generator: Generators = None, steps: int | None = None, guidance: float | None = None,
                resample: int = 5, text=None, negative=None) -> torch.Tensor:
        """Fill the pixels where mask == 1 (mask N x 1 x H x W) of images N x C x H x W by RePaint; the
        others are returned exactly as given. H and W may differ from the training size (both backbones run
        on larger canvases)."""
        RESAMPLE.check(resample, "resample")
        plan = dataclasses.replace(self.plan(image.shape[0], labels, steps, guidance, 0.0, "ddpm"), resample=resample)
        return self.fill(plan, image, mask, generator, text, negative)


@dataclass
class Timesteps:
    """A DDPM sampling call (denoising.Plan): the timesteps it visits, from the noisiest."""
    model: DDPM
    labels: torch.Tensor | None
    ts: list[int]
    guidance: float
    eta: float
    sampler: str
    resample: int = 5

    def start(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def solve(self, x: torch.Tensor, noise, text, negative) -> torch.Tensor:
        denoise = self.model.denoiser(self.labels, self.guidance, text, negative)
        if self.sampler == "ddim":
            return ddim(denoise, x, self.model.ab, self.ts, eta=self.eta, noise=noise)
        return ddpm_ancestral(denoise, x, self.model.ab, self.ts, noise=noise)

    def below(self, strength: float) -> Timesteps:
        top = strength * (self.model.cfg.timesteps - 1) + 1e-9
        return dataclasses.replace(self, ts=[t for t in self.ts if t <= top] or self.ts[-1:])

    def noised(self, image: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        path = self.model.path
        return path.point(image, z, path.level(self.ts[0]))

    def repaint(self, z, noise, text, negative, known, keep) -> torch.Tensor:
        return repaint(self.model.denoiser(self.labels, self.guidance, text, negative), z, self.model.ab, self.ts,
                       known=known, mask=keep, resample=self.resample, noise=noise)
