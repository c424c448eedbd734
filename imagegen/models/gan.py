"""DCGAN: deep convolutional GAN.

Implements Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks" (ICLR 2016), with the losses most used since:
- "ns":      the non-saturating loss of Goodfellow et al., "Generative Adversarial Nets" (NeurIPS 2014);
- "hinge":   Lim & Ye, "Geometric GAN" (2017), as used by Miyato et al. (2018);
- "wgan-gp": Gulrajani et al., "Improved Training of Wasserstein GANs" (NeurIPS 2017);
optional spectral normalisation of the discriminator (Miyato et al., "Spectral Normalization for
Generative Adversarial Networks", ICLR 2018), and DiffAugment (Zhao et al., "Differentiable Augmentation
for Data-Efficient GAN Training", NeurIPS 2020): the same random, differentiable colour / translation /
cutout transforms applied to real and fake images whenever D sees them, so D cannot memorise a small
training set. The class-conditional GAN (cgan.py) reuses these losses, options and the update step.

Shapes: the generator maps z (N x z_dim) to N x C x S x S in [-1, 1] for S = base * 2^k with base 7
(28, 56 px) or 4 (32, 64 px). Departures from the paper, for speed on a CPU: the last upsampling goes
straight to C channels (no full-resolution hidden layer), one 3x3 conv sits at the lowest resolution in
both networks. The discriminator uses batch norm (not on its first layer, as in the paper) except with
WGAN-GP, whose per-sample gradient penalty it would break, or with spectral norm, which replaces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..config import MAX_IMAGE_SIZE, MAX_WEIGHT, MAX_WIDTH, Range, ranged
from ..errors import ConfigError
from ..nets.layers import Conv2d, ConvTranspose2d, Linear
from .base import (ExportSpec, Family, Generators, adam, as_feature_map, eval_mode, first_activation_after_conv, flat_view,
                   SampleOption, per_item_normal)

# Sampling options' ranges (the CLI's --truncation and --drs, and sample()).
TRUNCATION = Range(0.0, 10.0, float)
DRS = Range(0.0, 100.0, float, hi_open=True)


@dataclass
class Config:
    image_size: int = ranged(28, 8, MAX_IMAGE_SIZE)   # filled in from the data
    channels: int = ranged(1, 1, 3)                   # filled in from the data
    z_dim: int = ranged(128, 1, 4096)                 # latent size
    width: int = ranged(32, 1, MAX_WIDTH)             # channels of the first discriminator layer; the generator mirrors it
    loss: Literal["ns", "hinge", "wgan-gp"] = "ns"
    spectral_norm: bool = False   # spectral norm on every discriminator layer
    d_norm: Literal["auto", "batch", "none"] = "auto"  # D's batch norm; auto = batch unless wgan-gp or spectral norm
    # Adam at 8e-4 (four times the paper's 2e-4) with batch 32 (train_defaults): under a fixed CPU time
    # budget, more and larger steps win, and the EMA copy used for sampling smooths the noisier weights.
    # Measured on Fashion-MNIST, 3 minutes on 2 cores, FD-cnn128 at n=2000: 11.3 (2e-4, batch 64),
    # 7.0 (batch 32), 6.6 (4e-4), 4.5 (both), 3.3 (8e-4, batch 32). WGAN-GP usually wants 1e-4.
    lr_g: float = ranged(8e-4, 0.0, 1.0, lo_open=True)
    lr_d: float = ranged(8e-4, 0.0, 1.0, lo_open=True)
    beta1: float = ranged(0.5, 0.0, 1.0, hi_open=True)      # Adam betas; WGAN-GP usually wants (0.0, 0.9)
    beta2: float = ranged(0.999, 0.0, 1.0, hi_open=True)
    n_critic: int = ranged(1, 1, 100)     # discriminator updates per generator update (5 is usual for WGAN-GP)
    gp_weight: float = ranged(10.0, 0.0, MAX_WEIGHT)   # WGAN-GP gradient penalty weight
    diffaugment: Literal["auto", "on", "off"] = "auto"  # auto = on below DIFFAUGMENT_BELOW training images
    augment_policy: str = "color,translation,cutout"

    def validate(self) -> None:
        layout(self.image_size)
        if self.loss == "wgan-gp" and self.d_norm == "batch":
            raise ConfigError("model.d_norm='batch' breaks WGAN-GP's per-sample gradient penalty; use 'none' or 'auto'")
        unknown = set(self.policy) - set(AUGMENTS)
        if unknown:
            raise ConfigError(f"model.augment_policy: unknown transform {sorted(unknown)[0]!r} "
                              f"(known: {', '.join(AUGMENTS)})")

    @property
    def policy(self) -> list[str]:
        return [p.strip() for p in self.augment_policy.split(",") if p.strip()]

    @property
    def d_batch_norm(self) -> bool:
        if self.d_norm == "auto":
            return self.loss != "wgan-gp" and not self.spectral_norm
        return self.d_norm == "batch"


def layout(size: int) -> tuple[int, int]:
    """(base, upsamplings) with size = base * 2**upsamplings, base in {7, 4}; ConfigError otherwise."""
    for base in (7, 4):
        if size % base == 0:
            k = math.log2(size // base)
            if k >= 1 and k == int(k):
                return base, int(k)
    raise ConfigError(f"model.image_size {size} is not supported by dcgan (use 28, 32, 56, 64, 128...)")


# --- DiffAugment: differentiable transforms, random per image, drawn from the step's generator ---------

DIFFAUGMENT_BELOW = 10_000


def _colour(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5] (images in [-1, 1])."""
    n = x.shape[0]
    u = torch.rand((3, n, 1, 1, 1), generator=gen, device=x.device)
    x = x + (u[0] - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (u[1] * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u[2] + 0.5) + mean


def _translation(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ratio * size pixels in x and y, filling with zeros (mid-grey)."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), generator=gen, device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), generator=gen, device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1) + dy + sh       # N x H x 1 rows into the padded image
    xs = torch.arange(w, device=x.device).view(1, 1, w) + dx + sw       # N x 1 x W columns
    padded = F.pad(x, (sw, sw, sh, sh))
    flat = (ys * (w + 2 * sw) + xs).flatten(1)                          # N x (H*W) indices
    out = padded.flatten(2).gather(2, flat[:, None, :].expand(-1, x.shape[1], -1))
    return out.view_as(x)


def _cutout(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of (ratio * size) pixels per image at a random position."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + 1 - ch % 2, (n, 1, 1), generator=gen, device=x.device)
    cx = torch.randint(0, w + 1 - cw % 2, (n, 1, 1), generator=gen, device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - ch // 2, cx - cw // 2
    keep = (ys < top) | (ys >= top + ch) | (xs < left) | (xs >= left + cw)          # N x H x W
    return x * keep[:, None].to(x.dtype)


AUGMENTS = {"color": _colour, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: list[str], gen: torch.Generator) -> torch.Tensor:
    for name in policy:
        x = AUGMENTS[name](x, gen)
    return x


# --- networks -------------------------------------------------------------------------------------


def dcgan_init(module: nn.Module, weights: bool = True) -> None:
    """The paper's init: conv and linear weights N(0, 0.02); batch-norm scales N(1, 0.02), shifts 0."""
    for m in module.modules():
        if weights and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        base, ups = layout(cfg.image_size)
        c = cfg.width * 2 ** ups                      # channels at base x base, halved per upsampling
        self.base, self.c0 = base, c
        self.project = Linear(cfg.z_dim, c * base * base, bias=False)
        # In-place activations: nothing needs their inputs (batch norm's backward keeps its own input),
        # so each saves a feature map's allocation and memory traffic, with the same numbers.
        layers: list[nn.Module] = [
            nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        ]
        for _ in range(ups - 1):
            layers += [ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(inplace=True)]
            c //= 2
        layers += [ConvTranspose2d(c, cfg.channels, 4, 2, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # N x z_dim -> N x C x S x S
        return self.body(as_feature_map(self.project(z), self.c0, self.base, self.body))


class Discriminator(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        base, ups = layout(cfg.image_size)
        sn = spectral_norm if cfg.spectral_norm else (lambda m: m)
        bn = cfg.d_batch_norm

        def block(c_in: int, c_out: int, k: int, s: int, p: int, first: bool) -> list[nn.Module]:
            norm = bn and not first
            return [sn(Conv2d(c_in, c_out, k, s, p, bias=not norm)),
                    *([nn.BatchNorm2d(c_out)] if norm else []), nn.LeakyReLU(0.2, inplace=True)]

        layers: list[nn.Module] = []
        c_in, c = cfg.channels, cfg.width
        for i in range(ups):                           # S -> base, doubling channels
            layers += block(c_in, c, 4, 2, 1, first=i == 0)
            c_in, c = c, c * 2
        layers += block(c_in, c, 3, 1, 1, first=False)
        self.features = nn.Sequential(*layers)       # N x C x S x S -> N x c x base x base
        self.head = sn(Linear(c * base * base, 1))   # on the map flattened C-major (flat_view)
        dcgan_init(self, weights=not cfg.spectral_norm)  # spectral norm rescales weights itself

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # N x C x S x S -> N logits
        h, w = flat_view(self.features(x), self.head.weight)                 # N x (c * base * base)
        return self.head(h, w).squeeze(1)


# --- losses: functions of the logits -------------------------------------------------------------


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    if kind == "ns":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return fake.mean() - real.mean()                     # wgan-gp critic (penalty added separately)


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean() if kind == "ns" else -fake.mean()


def gradient_penalty(D: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mean of (||grad_x D(x_hat)|| - 1)^2 at random points x_hat between real and fake images."""
    eps = torch.rand((real.shape[0], 1, 1, 1), generator=gen, device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


# --- the family ------------------------------------------------------------------------------------


class DCGAN(Family):
    Config = Config
    name = "dcgan"
    summary = "DCGAN; `ns`, `hinge` or `wgan-gp` loss, spectral norm, DiffAugment"
    has_latent, has_critic = True, True
    trains_in_studio = True
    sample_options = {
        "truncation": SampleOption("clamp the latent to [-t, t] (0 = off): less variety, more fidelity", TRUNCATION,
                                   slider=(0, 3, 0.1, 0)),
        # not served: each call scores a burn-in of images with the discriminator first
        "drs": SampleOption("discriminator rejection sampling: gamma at this percentile of the burn-in scores, "
                            "e.g. 80 (0 = off)", DRS, served=False),
    }

    networks = (Generator, Discriminator)   # the conditional GAN swaps in its own
    train_defaults = {"steps": 3200, "batch_size": 32}   # about 3 minutes on 2 CPU cores (see Config.lr_g)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.G = self.networks[0](cfg)
        self.D = self.networks[1](cfg)

    @classmethod
    def fit_config(cls, cfg, dataset):
        cfg = super().fit_config(cfg, dataset)
        if cfg.diffaugment == "auto":
            cfg = replace(cfg, diffaugment="on" if len(dataset) < DIFFAUGMENT_BELOW else "off")
        return cfg

    def latent_network(self) -> tuple[nn.Module, Callable, nn.Module]:
        return self.G, self.fake, first_activation_after_conv(self.G.body)

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """The generator: z (N x z_dim, standard normal) [+ label] -> image."""
        fn = (lambda z, y: self.G(z, y)) if self.conditional else (lambda z: self.G(z))
        return ExportSpec(fn, ["z"] + (["label"] if self.conditional else []), ["image"],
                          "image = G(z[, label]); z ~ N(0, I) of z_dim values per image")

    # Labels (None when unconditional) pass through to both networks; the DCGAN's ignore them.
    def fake(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.G(z, labels)

    def critic(self, x: torch.Tensor, labels: torch.Tensor | None, gen: torch.Generator | None = None) -> torch.Tensor:
        """D's logits (N), after DiffAugment when it is on and a generator is given (training)."""
        if gen is not None and self.cfg.diffaugment == "on":
            x = diff_augment(x, self.cfg.policy, gen)
        return self.D(x, labels)

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        return {
            "d": adam(self.D.parameters(), self.cfg.lr_d, betas),
            "g": adam(self.G.parameters(), self.cfg.lr_g, betas),
        }

    def draw_noise(self, n: int, generator: Generators = None) -> torch.Tensor:
        return per_item_normal(n, (self.cfg.z_dim,), generator, self.device)

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        real = batch["image"]
        y = batch["label"] if self.conditional else None   # fakes are drawn for the real batch's classes
        n, kind = real.shape[0], self.cfg.loss
        # Discriminator: n_critic updates on the same real batch, each with fresh fakes.
        for _ in range(self.cfg.n_critic):
            with torch.no_grad():
                fake = self.fake(self.draw_noise(n, gen), y)
            real_logits, fake_logits = self.critic(real, y, gen), self.critic(fake, y, gen)
            loss_d = d_loss(kind, real_logits, fake_logits)
            if kind == "wgan-gp":
                loss_d = loss_d + self.cfg.gp_weight * gradient_penalty(lambda x: self.critic(x, y), real, fake, gen)
            opt["d"].zero_grad(set_to_none=True)
            self.backward(loss_d)
            opt["d"].step()
        # Generator: D's weights are frozen so backward computes only what G needs.
        self.D.requires_grad_(False)
        loss_g = g_loss(kind, self.critic(self.fake(self.draw_noise(n, gen), y), y, gen))
        opt["g"].zero_grad(set_to_none=True)
        self.backward(loss_g)
        opt["g"].step()
        self.D.requires_grad_(True)
        values = torch.stack([loss_d.detach(), loss_g.detach(), real_logits.detach().mean(), fake_logits.detach().mean()])
        return dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), values.tolist()))

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None,
               noise: torch.Tensor | None = None, truncation: float = 0.0, drs: float = 0.0) -> torch.Tensor:
        """n images in [-1, 1]. `noise` (n x z_dim) replaces the random draw; `truncation` > 0 clamps
        the latent to [-truncation, truncation] (the truncation trick: less variety, more fidelity);
        `drs` > 0 turns on discriminator rejection sampling (see `rejection_sample`)."""
        labels = self.check_labels(n, labels)
        TRUNCATION.check(truncation, "truncation")
        DRS.check(drs, "drs (a percentile)")
        if drs:
            if noise is not None:
                raise ConfigError("drs draws its own candidates; it cannot take fixed noise")
            return self.rejection_sample(n, labels, generator, drs, truncation)
        z = self.draw_noise(n, generator) if noise is None else noise.to(self.device)
        if truncation > 0:
            z = z.clamp(-truncation, truncation)
        with eval_mode(self):
            return self.run(self.fake, z, labels)

    DRS_BURN_IN = 1024      # candidates that set D's maximum and the acceptance threshold
    DRS_ROUNDS = 50         # a seed still rejected after this many candidates keeps its last one

    def rejection_sample(self, n: int, labels: torch.Tensor | None, generator: Generators, percentile: float,
                         truncation: float = 0.0) -> torch.Tensor:
        """Discriminator rejection sampling (Azadi et al., "Discriminator Rejection Sampling", ICLR 2019).

        D's logit estimates log p_data(x) / p_g(x). A candidate is accepted with probability
        sigmoid(F(x) - gamma), F(x) = D(x) - D_max - log(1 - exp(D(x) - D_max - eps)), where D_max and
        gamma (the `percentile` of F) come from a fixed burn-in set. Each seed draws candidates and
        acceptance coins from its own generator until one is accepted, so an image still depends only
        on its seed."""
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * n
        k = self.num_classes
        with eval_mode(self):
            def score(z: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
                if truncation > 0:
                    z = z.clamp(-truncation, truncation)
                x = self.run(self.fake, z, y)
                return x, self.run(self.critic, x, y).double()

            burn = torch.Generator().manual_seed(2**62)
            yb = (torch.arange(self.DRS_BURN_IN, device=self.device) % k) if k else None
            _, d_burn = score(self.draw_noise(self.DRS_BURN_IN, burn), yb)
            d_max, eps = float(d_burn.max()), 1e-6

            def f(d: torch.Tensor) -> torch.Tensor:
                return d - d_max - torch.log1p(-torch.exp((d - d_max - eps).clamp(max=-eps)))

            gamma = float(torch.quantile(f(d_burn), percentile / 100))
            out: list[torch.Tensor | None] = [None] * n
            pending = list(range(n))
            for round_ in range(self.DRS_ROUNDS):
                y = labels[pending] if labels is not None else None
                x, d = score(self.draw_noise(len(pending), [gens[i] for i in pending]), y)
                coins = torch.stack([torch.rand((), generator=gens[i], device=gens[i].device if gens[i] else "cpu")
                                     for i in pending]).double().to(d.device)
                accept = coins < torch.sigmoid(f(d) - gamma)
                still = []
                for j, i in enumerate(pending):
                    if accept[j] or round_ + 1 == self.DRS_ROUNDS:
                        out[i] = x[j]
                    else:
                        still.append(i)
                pending = still
                if not pending:
                    break
        return torch.stack(out)
