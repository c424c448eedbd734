"""Model families behind one interface (see base.py), listed in an explicit registry."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Family
from .gan import DCGAN

REGISTRY: dict[str, type[Family]] = {
    DCGAN.name: DCGAN,
}


def family_class(name: str) -> type[Family]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


__all__ = ["REGISTRY", "Family", "family_class"]
