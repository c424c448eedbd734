"""Model families behind one interface (see base.py), listed in an explicit registry."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Family
from .baseline import RandomPixels
from .cgan import CGAN
from .cyclegan import CycleGAN
from .ddpm import DDPM
from .distilled import Distilled
from .flow import Flow
from .gan import DCGAN
from .vae import CVAE, VAE

REGISTRY: dict[str, type[Family]] = {
    RandomPixels.name: RandomPixels,
    DCGAN.name: DCGAN,
    CGAN.name: CGAN,
    VAE.name: VAE,
    CVAE.name: CVAE,
    DDPM.name: DDPM,
    Flow.name: Flow,
    Distilled.name: Distilled,
    CycleGAN.name: CycleGAN,
}


def family_class(name: str) -> type[Family]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


__all__ = ["REGISTRY", "Family", "family_class"]
