"""VAE, beta-VAE and conditional VAE.

Implements Kingma & Welling, "Auto-Encoding Variational Bayes" (ICLR 2014), with the KL weight `beta`
of Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework"
(ICLR 2017), and the class-conditional form of Sohn, Lee & Yan, "Learning Structured Output
Representation using Deep Conditional Generative Models" (NeurIPS 2015): encoder and decoder both see a
learned class embedding.

Loss per image, in nats: reconstruction -log p(x | z) + beta * KL(q(z | x) || N(0, I)), with
- "bernoulli" likelihood: pixels rescaled to [0, 1] and scored by binary cross-entropy on logits
  (the usual choice for MNIST-like grayscale data; samples are the decoder's mean, not binarised);
- "gaussian" likelihood: fixed per-pixel standard deviation `sigma` in [-1, 1] units.

`log_likelihood` is the importance-weighted bound of Burda, Grosse & Salakhutdinov, "Importance Weighted
Autoencoders" (ICLR 2016), log mean_k p(x | z_k) p(z_k) / q(z_k | x) over k posterior draws, a lower bound
on log p(x) that tightens as k grows. It needs p(x | z) to be a density on continuous pixels: the
gaussian likelihood is one; the binary cross-entropy of the "bernoulli" likelihood is not normalised on
[0, 1], so it is scored as the continuous Bernoulli of Loaiza-Ganem & Cunningham, "The continuous
Bernoulli: fixing a pervasive error in variational autoencoders" (NeurIPS 2019), the same decoder with
its normalising constant added.

Inpainting (`inpaint`) imputes missing pixels with the Markov chain of Rezende, Mohamed & Wierstra,
"Stochastic Backpropagation and Approximate Inference in Deep Generative Models" (ICML 2014), sec. 5.3:
encode the image with the current guess in the holes, draw z from the posterior, decode, put the decoded
pixels back into the holes only, and repeat.

Shapes: encoder N x C x S x S -> (mu, logvar) N x z_dim; decoder N x z_dim -> N x C x S x S in [-1, 1].
The networks mirror the DCGAN's layout (gan.layout): stride-2 convs down to 7x7 or 4x4, one 3x3 conv
there, and transposed convs back up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_IMAGE_SIZE, MAX_WEIGHT, MAX_WIDTH, Range, ranged
from ..errors import ConfigError
from ..nets.layers import Conv2d, ConvTranspose2d, Linear
from .base import (ExportSpec, Family, Flatten, Generators, adam, as_feature_map, eval_mode, first_activation_after_conv,
                   SampleOption, per_item_normal)
from .gan import layout

TEMPERATURE = Range(0.0, 10.0, float, lo_open=True)   # the CLI's --temperature and sample()
IW_SAMPLES = Range(1, 10_000)                          # posterior draws of the importance-weighted bound


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli with lambda = sigmoid(logits): C = l / tanh(l / 2), which
    tends to 2 + l^2 / 6 near l = 0 (lambda = 1/2)."""
    a = logits.abs()
    small = a < 1e-3
    safe = torch.where(small, torch.ones_like(a), a)
    return torch.where(small, torch.log(2 + a.square() / 6), torch.log(safe) - torch.log(torch.tanh(safe / 2)))


@dataclass
class Config:
    image_size: int = ranged(28, 8, MAX_IMAGE_SIZE)   # filled in from the data
    channels: int = ranged(1, 1, 3)                   # filled in from the data
    z_dim: int = ranged(32, 1, 4096)
    width: int = ranged(32, 1, MAX_WIDTH)   # channels of the first encoder layer, doubled per downsampling
    beta: float = ranged(1.0, 0.0, MAX_WEIGHT, lo_open=True)   # KL weight: 1 = the VAE, > 1 = beta-VAE (more disentangled, blurrier)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    sigma: float = ranged(0.1, 0.0, 100.0, lo_open=True)   # gaussian likelihood's std, [-1, 1] pixel units
    lr: float = ranged(1e-3, 0.0, 1.0, lo_open=True)

    def validate(self) -> None:
        layout(self.image_size)


@dataclass
class CVAEConfig(Config):
    num_classes: int = ranged(10, 1, 100_000)   # filled in from the data
    class_dim: int = ranged(16, 1, 4096)        # size of the learned class embedding


class Encoder(nn.Module):
    def __init__(self, cfg: Config, extra: int) -> None:
        super().__init__()
        base, ups = layout(cfg.image_size)
        layers: list[nn.Module] = []
        c_in, c = cfg.channels, cfg.width
        for _ in range(ups):                                   # S -> base, doubling channels
            layers += [Conv2d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2)]
            c_in, c = c, c * 2
        layers += [Conv2d(c_in, c_in, 3, 1, 1), nn.LeakyReLU(0.2), Flatten()]
        self.features = nn.Sequential(*layers)                 # N x C x S x S -> N x F
        self.head = Linear(c_in * base * base + extra, 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        if cond is not None:
            h = torch.cat([h, cond], 1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)                        # keeps exp() finite early in training


class Decoder(nn.Module):
    def __init__(self, cfg: Config, extra: int) -> None:
        super().__init__()
        base, ups = layout(cfg.image_size)
        c = cfg.width * 2 ** (ups - 1)
        self.base, self.c0 = base, c
        self.project = nn.Sequential(Linear(cfg.z_dim + extra, c * base * base), nn.LeakyReLU(0.2))
        layers: list[nn.Module] = [Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2)]
        for _ in range(ups - 1):
            layers += [ConvTranspose2d(c, c // 2, 4, 2, 1), nn.LeakyReLU(0.2)]
            c //= 2
        layers += [ConvTranspose2d(c, cfg.channels, 4, 2, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:   # -> N x C x S x S logits/means
        if cond is not None:
            z = torch.cat([z, cond], 1)
        return self.body(as_feature_map(self.project(z), self.c0, self.base, self.body))


class VAE(Family):
    Config = Config
    name = "vae"
    summary = "VAE, beta-VAE (`model.beta`)"
    has_latent, encodes, inpaints, has_likelihood, validates = True, True, True, True, True
    train_defaults = {"steps": 3000, "batch_size": 64}
    trains_in_studio = True
    sample_options = {"temperature": SampleOption("scale of the latent noise (1 = the prior; lower = cleaner, less varied)",
                                                  TEMPERATURE, slider=(0.1, 2, 0.05, 1))}

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        extra = getattr(cfg, "class_dim", 0)
        self.embed = nn.Embedding(cfg.num_classes, extra) if extra else None
        self.encoder = Encoder(cfg, extra)
        self.decoder = Decoder(cfg, extra)

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        return {"vae": adam(self.parameters(), self.cfg.lr)}

    def _cond(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.embed is None else self.embed(labels)

    # --- the public pieces: encode, decode, reconstruct ---------------------------------------------

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images N x C x S x S in [-1, 1] -> posterior (mu, logvar), each N x z_dim."""
        labels = self.check_labels(x.shape[0], labels)
        return self.encoder(x.to(self.device), self._cond(labels))

    def latent_network(self) -> tuple[nn.Module, Callable, nn.Module]:
        return self.decoder, self.decode, first_activation_after_conv(self.decoder.body)

    def export_spec(self, direction: str = "a2b") -> ExportSpec:
        """The decoder's mean: z (N x z_dim) [+ label] -> image."""
        fn = ((lambda z, y: self._mean(self.decoder(z, self._cond(y)))) if self.conditional else
              (lambda z: self._mean(self.decoder(z, None))))
        return ExportSpec(fn, ["z"] + (["label"] if self.conditional else []), ["image"],
                          "image = decoder mean(z[, label]); z ~ N(0, I) (times a temperature)")

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents N x z_dim -> the decoder's mean image N x C x S x S in [-1, 1]."""
        labels = self.check_labels(z.shape[0], labels)
        return self._mean(self.decoder(z.to(self.device), self._cond(labels)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Encode to the posterior mean and decode: N x C x S x S in [-1, 1]."""
        labels = self.check_labels(x.shape[0], labels)
        with eval_mode(self):
            mu = self.run(lambda x_, y_: self.encoder(x_, self._cond(y_))[0], x.to(self.device), labels)
            return self._decode_fixed(mu, labels)

    def _mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) * 2 - 1 if self.cfg.likelihood == "bernoulli" else out.clamp(-1, 1)

    def _decode_fixed(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """`decode` in fixed micro-batches, so each image is independent of the batch it is drawn in."""
        return self.run(lambda z_, y_: self._mean(self.decoder(z_, self._cond(y_))), z, labels)

    # --- training ------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor], opt: dict, gen: torch.Generator) -> dict[str, float]:
        loss, rec, kl = self.objective(batch, gen)
        opt["vae"].zero_grad(set_to_none=True)
        self.backward(loss)
        opt["vae"].step()
        values = torch.stack([loss.detach(), rec.detach(), kl.detach()])
        return dict(zip(("loss", "recon", "kl"), values.tolist()))

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> float:
        """The negative ELBO (nats per image) of held-out images, its posterior draws from gen."""
        with eval_mode(self):
            return float(self.objective(batch, gen)[0])

    def objective(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(loss, reconstruction, KL) of a batch, nats per image, the posterior draw from gen."""
        x = batch["image"]
        cond = self._cond(batch["label"]) if self.conditional else None
        mu, logvar = self.encoder(x, cond)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen, device=mu.device)   # reparameterised
        out = self.decoder(z, cond)
        if self.cfg.likelihood == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction="none")
        else:
            s = self.cfg.sigma
            rec = 0.5 * ((out - x) / s).square() + math.log(s * math.sqrt(2 * math.pi))
        rec = rec.flatten(1).sum(1).mean()                                          # nats per image
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1).mean()
        return rec + self.cfg.beta * kl, rec, kl

    # --- sampling ------------------------------------------------------------------------------------

    def draw_noise(self, n: int, generator: Generators = None) -> torch.Tensor:
        return per_item_normal(n, (self.cfg.z_dim,), generator, self.device)

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, generator: Generators = None,
               noise: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        labels = self.check_labels(n, labels)
        TEMPERATURE.check(temperature, "temperature")
        z = self.draw_noise(n, generator) if noise is None else noise.to(self.device)
        z = z if temperature == 1 else z * temperature
        with eval_mode(self):
            return self._decode_fixed(z, labels)


    def log_px_given_z(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) in nats (N) for decoder outputs `out` and images x N x C x S x S in [-1, 1], as a
        density on [-1, 1]-valued pixels (the continuous Bernoulli lives on [0, 1]: minus log 2 a pixel)."""
        if self.cfg.likelihood == "bernoulli":
            y = (x + 1) / 2
            per = y * out - F.softplus(out) + continuous_bernoulli_log_norm(out) - math.log(2)
        else:
            s = self.cfg.sigma
            per = -0.5 * ((out - x) / s).square() - math.log(s * math.sqrt(2 * math.pi))
        return per.flatten(1).sum(1)

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, *, labels: torch.Tensor | None = None, generator: Generators = None,
                    samples: int = 64) -> torch.Tensor:
        """N x K importance log-weights log p(x | z_k) + log p(z_k) - log q(z_k | x), z_k the `samples`
        posterior draws of each image x (N x C x S x S in [-1, 1]) from its own generator."""
        IW_SAMPLES.check(samples, "samples")
        n = x.shape[0]
        labels = self.check_labels(n, labels)
        x = x.to(self.device, torch.float32)
        with eval_mode(self):
            stats = self.run(lambda x_, y_: torch.cat(self.encoder(x_, self._cond(y_)), 1), x, labels)
            mu, logvar = stats.chunk(2, dim=1)                                         # N x z_dim each
            eps = per_item_normal(n, (samples, self.cfg.z_dim), generator, self.device)   # N x K x z_dim
            z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * eps
            log_q = -0.5 * (eps.square() + logvar[:, None] + math.log(2 * math.pi)).sum(-1)   # N x K
            log_prior = -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)
            rep = None if labels is None else labels.repeat_interleave(samples)
            out = self.run(lambda z_, y_: self.decoder(z_, self._cond(y_)), z.flatten(0, 1), rep)
            log_px = self.log_px_given_z(out, x.repeat_interleave(samples, 0)).view(n, samples)
        return log_px + log_prior - log_q

    def likelihood_estimator(self) -> str:
        """How log_likelihood estimates log p, for metrics.json."""
        return ("importance-weighted bound (Burda et al. 2016) with 64 posterior draws, decoder scored as "
                + ("a continuous Bernoulli" if self.cfg.likelihood == "bernoulli" else "a Gaussian")
                + ("; conditional on the true label: log p(x | y)" if self.conditional else ""))

    def log_likelihood(self, x: torch.Tensor, *, labels: torch.Tensor | None = None, generator: Generators = None,
                       samples: int = 64) -> torch.Tensor:
        """The importance-weighted lower bound on log p(x) (log p(x | y) for a cvae) in nats (N): the
        log-mean-exp of `log_weights`. samples = 1 is the ELBO."""
        w = self.log_weights(x, labels=labels, generator=generator, samples=samples)
        return torch.logsumexp(w, 1) - math.log(samples)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, *, labels: torch.Tensor | None = None,
                generator: Generators = None, iterations: int = 50) -> torch.Tensor:
        """Fill the pixels where mask == 1 (mask N x 1 x S x S) of images N x C x S x S in [-1, 1]; the
        others are returned exactly as given. The holes start as the decoding of a prior draw (so the
        seed matters), then `iterations` rounds of encode -> posterior draw -> decode refine them; the
        result is decoded from the last posterior mean. Each image's noise comes from its own generator."""
        self.check_inpaint(image, mask)
        n, _, h, w = image.shape
        s = self.cfg.image_size
        if (h, w) != (s, s):
            raise ConfigError(f"this vae inpaints {s}x{s} images (its training size), got {w}x{h}; "
                              "outpainting to a larger canvas needs a ddpm run")
        if iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {iterations}")
        labels = self.check_labels(n, labels)
        known = image.to(self.device, torch.float32)
        hole = mask.to(self.device).bool().expand_as(known)                    # N x C x S x S

        # Fixed micro-batches keep every image independent of the others in the batch.
        def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:      # -> (mu, logvar), N x z_dim
            out = self.run(lambda x_, y_: torch.cat(self.encoder(x_, self._cond(y_)), 1), x, labels)
            return out.chunk(2, dim=1)

        with eval_mode(self):
            x = torch.where(hole, self._decode_fixed(self.draw_noise(n, generator), labels), known)
            for _ in range(iterations):
                mu, logvar = encode(x)
                z = mu + torch.exp(0.5 * logvar) * self.draw_noise(n, generator)
                x = torch.where(hole, self._decode_fixed(z, labels), known)
            mu, _ = encode(x)
            return torch.where(hole, self._decode_fixed(mu, labels), known)


class CVAE(VAE):
    Config = CVAEConfig
    name = "cvae"
    summary = "conditional VAE"
    needs_labels = True
    conditional_likelihood = True   # log p(x | class): the decoder and the encoder both see the class
