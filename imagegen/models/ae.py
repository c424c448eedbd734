"""AE: the autoencoder with a small KL-regularised latent that latent flow and ddpm train on.

Implements the first stage of Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models" (CVPR 2022), sec. 3.1 and appendix G: an encoder to a diagonal Gaussian per latent position
(factor f = 4 or 8 per side, a few channels), a decoder back, trained with
- a reconstruction loss: L1 on pixels, plus L1 on the images' horizontal and vertical differences
  (`edge_weight`). Stable Diffusion's autoencoder adds LPIPS, a perceptual distance in the features of
  an ImageNet VGG; no pretrained network can be had here, so the edge term stands in for it: it asks
  for the same sharp edges the L1 on pixels alone blurs, at the cost of a difference filter;
- a KL term towards N(0, I) with a tiny weight (`kl_weight`, 1e-6 of the per-image sums, as theirs), which
  keeps the latent's scale in check without making it a VAE's prior;
- from step `critic_start` on, a patch discriminator (nets/autoencoder.PatchCritic) with the hinge loss,
  its generator term weighted by `critic_weight`: the warm-up lets the reconstructions settle first, as
  their `disc_start` does.

The family draws no images from noise (`autoencodes`): its training grids and its evaluation are of
reconstructions (PSNR, and FD against the test split: the floor of every model built on it).

Shapes: images N x C x S x S in [-1, 1]; latents N x latent_channels x S/f x S/f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import MAX_IMAGE_SIZE, MAX_WEIGHT, MAX_WIDTH, ranged
from ..errors import ConfigError
from ..nets.autoencoder import Decoder, Encoder, PatchCritic
from .base import Family, Generators, adam, eval_mode

FACTORS = (2, 4, 8, 16)


@dataclass
class Config:
    image_size: int = ranged(64, 8, MAX_IMAGE_SIZE)   # filled in from the data
    channels: int = ranged(3, 1, 3)                   # filled in from the data
    factor: int = ranged(4, 2, 16)                    # the latent is image_size / factor per side: 2, 4, 8 or 16
    latent_channels: int = ranged(4, 1, 64)
    width: int = ranged(32, 1, MAX_WIDTH)             # channels at full resolution, x2 and x4 below
    kl_weight: float = ranged(1e-6, 0.0, MAX_WEIGHT)
    edge_weight: float = ranged(1.0, 0.0, MAX_WEIGHT)
    critic_start: int = ranged(1000, 0, 2**31 - 1)    # the step the patch discriminator joins at
    critic_weight: float = ranged(0.1, 0.0, MAX_WEIGHT)
    critic_width: int = ranged(32, 1, MAX_WIDTH)
    lr: float = ranged(5e-4, 0.0, 1.0, lo_open=True)

    def validate(self) -> None:
        if self.factor not in FACTORS:
            raise ConfigError(f"model.factor must be one of {', '.join(map(str, FACTORS))}, got {self.factor}")
        if self.image_size % self.factor:
            raise ConfigError(f"model.image_size {self.image_size} is not a multiple of model.factor {self.factor}")


def edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The horizontal and vertical differences of neighbouring pixels: N x C x S x S-1, N x C x S-1 x S."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class AE(Family):
    Config = Config
    name = "ae"
    summary = "autoencoder, KL latent (factor 4 or 8), patch critic: the first stage of latent flow and ddpm"
    autoencodes, validates = True, True
    train_defaults = {"steps": 3000, "batch_size": 32, "ema_decay": 0.999, "sample_every": 1000}

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(cfg.channels, cfg.latent_channels, cfg.factor, cfg.width)
        self.decoder = Decoder(cfg.channels, cfg.latent_channels, cfg.factor, cfg.width)
        self.critic_net = PatchCritic(cfg.channels, cfg.critic_width)
        # Steps taken, for the critic's warm-up: a buffer, so it is checkpointed and resumes exactly.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.cfg.image_size // self.cfg.factor
        return self.cfg.latent_channels, side, side

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        betas = (0.5, 0.9)   # as the latent-diffusion autoencoder trains, for the adversarial term
        return {"ae": adam([*self.encoder.parameters(), *self.decoder.parameters()], self.cfg.lr, betas),
                "d": adam(self.critic_net.parameters(), self.cfg.lr, betas)}

    # --- the public pieces ----------------------------------------------------------------------------

    @torch.no_grad()
    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images N x C x S x S in [-1, 1] -> the posterior means N x c x S/f x S/f, in fixed micro-batches
        (an image's latent does not depend on its batch)."""
        with eval_mode(self):
            return self.run(lambda x_: self.encoder(x_)[0], x.to(self.device, torch.float32))

    @torch.no_grad()
    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Latents N x c x S/f x S/f -> images N x C x S x S in [-1, 1]."""
        with eval_mode(self):
            return self.run(self.decoder, z.to(self.device, torch.float32)).clamp(-1, 1)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """Images through the posterior mean and back: the reconstructions the report measures."""
        return self.from_latent(self.to_latent(x))

    def preview(self, dataset, n: int) -> tuple[torch.Tensor, int]:
        """The training grid: n // 2 fixed training images (at most 32), each above its reconstruction, 8
        a row."""
        k = max(1, min(32, n // 2, len(dataset)))
        x = dataset.batch(torch.arange(k))["image"]
        y = self.round_trip(x).cpu()
        per = min(8, k)
        k = per * (k // per)
        x, y = x[:k], y[:k]
        rows = [part for i in range(0, k, per) for part in (x[i:i + per], y[i:i + per])]
        return torch.cat(rows), per

    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None, **opts) -> torch.Tensor:
        raise ConfigError("an autoencoder (model 'ae') draws no images from noise: it is the first stage of a latent "
                          "model (imagegen train --model flow --set model.autoencoder=RUN); `imagegen evaluate` "
                          "measures its reconstructions")

    # --- training ------------------------------------------------------------------------------------

    def objective(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(the reconstructions, the loss without the critic, its L1, edge and KL parts) of images x, the
        posterior draw from gen."""
        mean, logvar = self.encoder(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, device=mean.device)
        out = self.decoder(z)
        rec = (out - x).abs().mean()
        edge = sum((a - b).abs().mean() for a, b in zip(edges(out), edges(x)))
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean() / x[0].numel()
        return out, rec + self.cfg.edge_weight * edge + self.cfg.kl_weight * kl, rec, edge, kl

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> float:
        """The reconstruction loss (L1, edges, KL; not the critic's term) of held-out images."""
        with eval_mode(self):
            return float(self.objective(batch["image"], gen)[1])

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        x = batch["image"]
        out, loss, rec, edge, kl = self.objective(x, gen)
        adversarial = int(self.steps) >= self.cfg.critic_start and self.cfg.critic_weight > 0
        values = {"rec": rec.detach(), "edge": edge.detach(), "kl": kl.detach()}
        if adversarial:
            self.critic_net.requires_grad_(False)   # the autoencoder's step computes no critic gradients
            g = -self.critic_net(out).mean()
            self.critic_net.requires_grad_(True)
            loss = loss + self.cfg.critic_weight * g
            values["g"] = g.detach()
        opt["ae"].zero_grad(set_to_none=True)
        self.backward(loss)
        opt["ae"].step()
        if adversarial:   # hinge loss on real images against this step's reconstructions
            d = F.relu(1 - self.critic_net(x)).mean() + F.relu(1 + self.critic_net(out.detach())).mean()
            opt["d"].zero_grad(set_to_none=True)
            self.backward(d)
            opt["d"].step()
            values["d"] = d.detach()
        self.steps += 1
        names = list(values)
        return dict(zip(names, torch.stack([values[k].float() for k in names]).tolist()))

