"""cGAN: class-conditional DCGAN.

Implements the two standard ways of giving a GAN the class label:
- the generator uses conditional batch norm (de Vries et al., "Modulating early visual processing by
  language", NeurIPS 2017; Dumoulin et al., "A Learned Representation for Artistic Style", ICLR 2017):
  batch norm without its own affine parameters, followed by a per-class scale and shift;
- the discriminator is a projection discriminator (Miyato & Koyama, "cGANs with Projection
  Discriminator", ICLR 2018): logit = w . h(x) + embed(y) . h(x), where h(x) is the feature vector.

Everything else (losses, spectral norm, DiffAugment, the alternating update, truncation) is the DCGAN's
(gan.py): this file only swaps the two networks and passes labels through the DCGAN's two hooks.
Fake images are drawn for the classes of the real batch, so D sees the same class mix on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..config import ranged
from ..nets.layers import Conv2d, ConvTranspose2d, Linear
from . import gan
from .base import as_feature_map, flat_view
from .gan import DCGAN, dcgan_init, layout


@dataclass
class Config(gan.Config):
    num_classes: int = ranged(10, 1, 100_000)   # filled in from the data


class ConditionalBatchNorm(nn.Module):
    """BatchNorm2d whose scale and shift come from the class: N x C x H x W, labels N."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class Generator(nn.Module):
    """The DCGAN generator with every batch norm made class-conditional."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        base, ups = layout(cfg.image_size)
        c = cfg.width * 2 ** ups
        self.base, self.c0 = base, c
        self.project = Linear(cfg.z_dim, c * base * base, bias=False)
        self.convs = nn.ModuleList([Conv2d(c, c, 3, 1, 1, bias=False)])
        self.norms = nn.ModuleList([ConditionalBatchNorm(c, cfg.num_classes), ConditionalBatchNorm(c, cfg.num_classes)])
        for _ in range(ups - 1):
            self.convs.append(ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False))
            self.norms.append(ConditionalBatchNorm(c // 2, cfg.num_classes))
            c //= 2
        self.out = ConvTranspose2d(c, cfg.channels, 4, 2, 1)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:     # N x z_dim, N -> N x C x S x S
        x = self.norms[0](as_feature_map(self.project(z), self.c0, self.base, self.convs), y).relu_()
        for conv, norm in zip(self.convs, self.norms[1:]):
            x = norm(conv(x), y).relu_()
        return torch.tanh(self.out(x))


class Discriminator(gan.Discriminator):
    """The DCGAN discriminator plus a class embedding projected onto its features."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        sn = spectral_norm if cfg.spectral_norm else (lambda m: m)
        self.embed = sn(nn.Embedding(cfg.num_classes, self.head.in_features))
        nn.init.normal_(self.embed.weight if not cfg.spectral_norm else self.embed.parametrizations.weight.original, 0.0, 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:     # N x C x S x S, N -> N logits
        h, w, e = flat_view(self.features(x), self.head.weight, self.embed.weight)   # N x F, 1 x F, classes x F
        return self.head(h, w).squeeze(1) + (F.embedding(y, e) * h).sum(1)


class CGAN(DCGAN):
    Config = Config
    name = "cgan"
    summary = "class-conditional DCGAN (projection discriminator)"
    needs_labels = True
    networks = (Generator, Discriminator)

    def latent_network(self) -> tuple[nn.Module, Callable, nn.Module]:
        # Its generator applies its ReLUs in place after each conditional batch norm: the features of the
        # first block are the norm's output after the first convolution.
        return self.G, self.fake, self.G.norms[1]
