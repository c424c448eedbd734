"""Distilled: a small student that samples in 1, 2 or 4 steps what a trained flow or ddpm teacher samples
in tens, made by `imagegen distill` (imagegen/distill.py).

Implements
- Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow"
  (ICLR 2023): the teacher's deterministic sampler couples each noise z with an image x1 = teacher(z);
  the student is a velocity network trained on the straight line x_t = (1 - t) z + t x1 towards x1 - z,
  either at every t in (0, 1) ("reflow": a straighter flow) or only at the K times its K Euler steps visit
  ("distill", their k-step distillation: with K = 1, x1 = z + v(z, 0) is regression onto the teacher's
  image, Luhman & Luhman 2021);
- optionally (`adversarial` > 0) the adversarial term of Sauer et al., "Adversarial Diffusion
  Distillation" (2023): a discriminator (the DCGAN's, gan.py) compares the student's one-shot estimate of
  x1 with real training images, which keeps edges that a squared error blurs away. The hinge loss.

A conditional teacher's couplings carry its labels (and its guidance); the student takes the same labels.
Sampling: z ~ N(0, I) from per-image generators, then K Euler steps of the student, in fixed micro-batches,
so an image depends only on its seed. The config names the teacher run, its family, sampler and the
SHA-256 of its weights.

Shapes: z, x1, images N x C x H x W in [-1, 1]; t N numbers in [0, 1), handed to the network as 1000 t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import MAX_WEIGHT, MAX_WIDTH, ranged
from ..errors import ConfigError
from ..paths import STRAIGHT
from ..solvers import euler
from . import gan
from .backbone import BackboneConfig, BackboneFamily
from .base import ExportSpec, Generators, adam, eval_mode

TIME_SCALE = 1000.0   # as the flow family


@dataclass
class Config(BackboneConfig):   # the student's backbone: a U-Net on 2 x 2 pixel blocks by default, for speed
    # Fashion-MNIST, 30,000 couplings of a teacher at FD 0.321, 19,000 steps (39 min): FD 0.629 at
    # n = 10,000 and 2,152 images/s at batch 256; the earlier default (width 12, mults (1, 2, 2), full size):
    # 0.946 after 15,000 steps on 10,000 couplings, 1,659 images/s (machine B, CHANGELOG.md)
    width: int = ranged(32, 1, MAX_WIDTH)
    mults: tuple[int, ...] = (1, 2)
    unet_patch: int = ranged(2, 1, 8)
    attention: bool = False
    steps: int = ranged(1, 1, 16)   # the student's Euler steps (1, 2, 4 are the usual)
    method: Literal["distill", "reflow"] = "distill"
    # weight of the adversarial term (0 = off). Fashion-MNIST, 470 s of training on 10,000 couplings, FD at
    # n = 10,000: 1.89 without it, 1.46 at 0.03 (machine A)
    adversarial: float = ranged(0.03, 0.0, MAX_WEIGHT)
    d_width: int = ranged(32, 1, MAX_WIDTH)             # the discriminator's first layer
    lr: float = ranged(1e-3, 0.0, 1.0, lo_open=True)
    lr_d: float = ranged(4e-4, 0.0, 1.0, lo_open=True)
    grad_clip: float = ranged(1.0, 0.0, MAX_WEIGHT)
    label_dropout: float = ranged(0.0, 0.0, 1.0, hi_open=True)   # the couplings carry the teacher's guidance
    # Provenance, filled in by `imagegen distill`.
    teacher: str = ""            # the teacher run folder
    teacher_family: str = ""
    teacher_sha256: str = ""     # of its ema.safetensors, as in its MANIFEST.json
    teacher_sampler: str = ""    # how its couplings were drawn
    pairs: int = ranged(0, 16, 10_000_000, zero="not distilled yet")   # couplings drawn
    teacher_steps: int = ranged(0, 1, 10_000, zero="the teacher's own")

    def validate(self) -> None:
        self.validate_backbone()
        if self.autoencoder:
            raise ConfigError("model.autoencoder: a distilled student works on pixels (latent mode is for flow and ddpm)")
        if self.adversarial:
            gan.layout(self.image_size)   # the discriminator's sizes


class Distilled(BackboneFamily):   # the student network, its Adam and clipped update: backbone.py
    Config = Config
    name = "distilled"
    summary = "a 1-, 2- or 4-step student of a `flow` or `ddpm` run (`imagegen distill`)"
    made_by = "distill"
    train_defaults = {"steps": 4000, "batch_size": 64, "ema_decay": 0.999, "sample_every": 1000}

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.D = None
        if cfg.adversarial:
            self.D = gan.Discriminator(gan.Config(image_size=cfg.image_size, channels=cfg.channels,
                                                  width=cfg.d_width, spectral_norm=True))

    @classmethod
    def fit_config(cls, cfg, dataset):
        if getattr(dataset, "noise", None) is None:
            raise ConfigError("model 'distilled' learns from a teacher run's couplings: make it with "
                              "`imagegen distill TEACHER_RUN --steps 1`, not `imagegen train`")
        return super().fit_config(cfg, dataset)

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        opts = super().configure_optimizers(train_cfg)
        if self.D is not None:
            opts["d"] = adam(self.D.parameters(), self.cfg.lr_d, (0.5, 0.999))
        return opts

    def train_times(self, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        """N training times: the K grid times 0, 1/K, ... (distill) or uniform in [0, 1) (reflow)."""
        if self.cfg.method == "reflow":
            return torch.rand(n, generator=gen, device=device)
        return torch.randint(self.cfg.steps, (n,), generator=gen, device=device).float() / self.cfg.steps

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        if "noise" not in batch:
            raise ConfigError("a distilled run trains on its teacher's couplings: continue it with "
                              "`imagegen distill TEACHER --resume RUN`, not `imagegen train --resume`")
        z, x1 = batch["noise"], batch["image"]
        n = z.shape[0]
        t = self.train_times(n, gen, z.device)
        y = self.training_labels(batch, gen)
        tt = t.view(n, 1, 1, 1)
        xt = STRAIGHT.point(x1, z, tt)
        v = self.net(xt, TIME_SCALE * t, y)
        loss = (v - STRAIGHT.target(x1, z)).square().mean()
        if self.D is None:
            return self.update(opt, loss)
        x1_hat = STRAIGHT.data(xt, v, tt)                # the one-shot estimate of x1 from x_t
        real = batch["real"]
        d = gan.d_loss("hinge", self.D(real), self.D(x1_hat.detach()))
        opt["d"].zero_grad(set_to_none=True)
        self.backward(d)
        opt["d"].step()
        self.D.requires_grad_(False)                     # the student's step leaves D's gradients alone
        adv = gan.g_loss("hinge", self.D(x1_hat))
        self.D.requires_grad_(True)
        out = self.update(opt, loss + self.cfg.adversarial * adv)
        return {"loss": out["loss"], "mse": loss.item(), "adv": adv.item(), "d_loss": d.item()}

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """The whole sampler, its K Euler steps unrolled: z (N x C x S x S) [+ label] -> image."""
        conditional, k = self.conditional, self.cfg.steps

        def sampler(z, *rest):   # the student's K Euler steps from t = 0, as `sample`
            y = rest[0] if conditional else None
            x = z
            for i in range(k):
                t = torch.full((z.shape[0],), TIME_SCALE * i / k, dtype=z.dtype)
                x = x + self.net(x, t, y) / k
            return x.clamp(-1, 1)

        return ExportSpec(sampler, ["z"] + (["label"] if conditional else []), ["image"],
                          f"image = sampler(z[, label]): the student's {k} Euler step(s) from z ~ N(0, I) "
                          f"(C x S x S per image)", {"imagegen.steps": str(k)})

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None) -> torch.Tensor:
        """n images in the student's K Euler steps."""
        labels = self.check_labels(n, labels)
        shape = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        with eval_mode(self):
            x = self._noise(n, shape, generator)()

            def v(x: torch.Tensor, t: float) -> torch.Tensor:
                return self.guided(x, torch.full((x.shape[0],), TIME_SCALE * t, device=x.device), labels, 1.0)

            x = euler(v, x, self.cfg.steps)
        return x.clamp(-1, 1)
