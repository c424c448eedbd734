"""The autoencoder's networks: the first stage of latent diffusion and flow (models/ae.py trains them;
models/latent.py runs them for a latent flow or ddpm model).

After Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022) and the
VQGAN of Esser, Rombach & Ommer (CVPR 2021), scaled down for a CPU: residual blocks (GroupNorm, SiLU,
3x3 convolutions) at each resolution below the full one, a stride-2 convolution down and a
nearest-neighbour upsampling plus convolution up, no attention. The encoder ends in the mean and log-variance of a diagonal Gaussian per
latent position; the decoder maps a latent back to pixels (unbounded: the caller clamps to [-1, 1]).

Shapes: images N x C x S x S; latents N x latent_channels x S/f x S/f, f = `factor` (a power of two);
the channels at the i-th resolution are width * MULTS[i].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d

MULTS = (1, 2, 4, 4, 4)   # channel multiplier per resolution: full, 1/2, 1/4, 1/8, 1/16


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class Block(nn.Module):
    """GroupNorm-SiLU-conv twice on a residual branch; a 1x1 skip where the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), Conv2d(c_out, c_out, 3, padding=1)
        self.skip = Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def levels(factor: int) -> int:
    """How many halvings a factor is (4 -> 2)."""
    return int(math.log2(factor))


class Encoder(nn.Module):
    """N x C x S x S -> (mean, logvar), each N x latent_channels x S/f x S/f."""

    def __init__(self, channels: int, latent_channels: int, factor: int, width: int) -> None:
        super().__init__()
        widths = [width * m for m in MULTS[:levels(factor) + 1]]
        # No block at full resolution: it would cost as much as all the others (a 3x3 conv's work is
        # pixels x width^2); the first strided conv reads the stem's features there instead.
        layers: list[nn.Module] = [Conv2d(channels, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [Conv2d(c_in, c_out, 3, stride=2, padding=1), Block(c_out, c_out)]
        layers += [nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(),
                   Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.body(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """N x latent_channels x S/f x S/f -> N x C x S x S (unbounded)."""

    def __init__(self, channels: int, latent_channels: int, factor: int, width: int) -> None:
        super().__init__()
        widths = [width * m for m in MULTS[:levels(factor) + 1]][::-1]
        layers: list[nn.Module] = [Conv2d(latent_channels, widths[0], 3, padding=1), Block(widths[0], widths[0])]
        for c_in, c_out in zip(widths, widths[1:]):   # each upsampling conv narrows to the next width first
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), Conv2d(c_in, c_out, 3, padding=1), Block(c_out, c_out)]
        layers += [nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(), Conv2d(widths[-1], channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class PatchCritic(nn.Module):
    """The patch discriminator of pix2pix (Isola et al., CVPR 2017) as the latent-diffusion autoencoder uses
    it: strided 4x4 convolutions, GroupNorm, LeakyReLU; N x C x S x S -> N x 1 x P x P realism scores, one
    per overlapping patch (about 22 px across at three layers)."""

    def __init__(self, channels: int, width: int, layers: int = 2) -> None:
        super().__init__()
        body: list[nn.Module] = [Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(layers - 1):
            body += [Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(_groups(2 * c), 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        body += [Conv2d(c, 1, 3, padding=1)]
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
