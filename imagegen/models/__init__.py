"""Model families behind one interface (see base.py), listed in an explicit registry."""

from __future__ import annotations

import dataclasses

from ..config import Range
from ..errors import ConfigError
from .base import Family, SampleOption
from .ae import AE
from .baseline import RandomPixels
from .cgan import CGAN
from .consistency import Consistency
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
    Consistency.name: Consistency,
    Distilled.name: Distilled,
    CycleGAN.name: CycleGAN,
    AE.name: AE,
}


def merged_options(families) -> dict[str, SampleOption]:
    """Every family's sampling options by name, for the front ends that take any of them (a CLI flag, a
    field of an HTTP body; the run's own family then checks its own range). A name means one thing in
    every family: the same kind of value, or an error here, at import. Two ranges merge into the
    widest, two sets of choices into their union."""
    merged: dict[str, SampleOption] = {}
    for cls in families:
        for name, opt in cls.sample_options.items():
            have = merged.setdefault(name, opt)
            if have is opt:
                continue
            if have.kind is not opt.kind:
                raise TypeError(f"sampling option {name!r} is a {have.kind.__name__} in one family and a "
                                f"{opt.kind.__name__} in {cls.name}: a name must mean one thing")
            if opt.range is not None:
                low = have.range if have.range.lo <= opt.range.lo else opt.range
                top = have.range if have.range.hi >= opt.range.hi else opt.range
                wide = Range(low.lo, top.hi, opt.kind, low.lo_open, top.hi_open, low.zero or top.zero)
                capped = have.served_max is not None or opt.served_max is not None
                cap = max(o.range.hi if o.served_max is None else o.served_max for o in (have, opt)) if capped else None
                merged[name] = dataclasses.replace(have, range=wide, served_max=cap,
                                                   served=have.served or opt.served)
            else:
                merged[name] = dataclasses.replace(have, choices=tuple(dict.fromkeys(have.choices + opt.choices)),
                                                   served=have.served or opt.served)
    return merged


SAMPLE_OPTIONS = merged_options(REGISTRY.values())


def family_class(name: str) -> type[Family]:
    if not isinstance(name, str):   # `--set family=[1]`, or a config.json that holds a list there
        raise ConfigError(f"model family: {str(name)[:60]} is not a name (known: {', '.join(sorted(REGISTRY))})")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


__all__ = ["REGISTRY", "SAMPLE_OPTIONS", "Family", "SampleOption", "family_class"]
