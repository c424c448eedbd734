"""Variations of an image ("more like this") and blends of two ("breed"): what `imagegen vary` and
`imagegen breed` call, and the studio page's Vary and Breed panels after them.

A source is a seed (the image the model draws for it) or an image (N = 1: 1 x C x H x W in [-1, 1], at
the model's size; a sketch, for instance). Two mechanisms, by family:
- latent families (GANs and VAEs, which have `draw_noise`): the source's latent z0 (a seed's draw, or a
  VAE's posterior mean of the image) turns toward each new seed's own latent along the great circle,
      z = cos(theta) z0 + sin(theta) z_seed,   theta = strength * pi / 2,
  so strength 1 gives exactly that seed's image, small strengths stay close to the source, and z is a
  standard Gaussian draw at every strength (cos^2 + sin^2 = 1) where a straight blend would shrink it;
- diffusion and flow (`edit`): SDEdit (Meng et al., ICLR 2022): the source pixels re-noised to `strength`
  with each new seed's noise, then denoised by the model's sampler (models/flow.py, models/ddpm.py).
Breeding blends the two sources first (the slerp of their latents; for diffusion and flow the average of
their pixels), then varies the blend. Every output depends only on the sources, its seed, the options and
the weights, not on the batch: the per-seed generators and fixed micro-batches of sample.py carry over.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .config import Range
from .errors import ConfigError
from .models.base import Family
from .models.denoising import STRENGTH
from .sample import default_labels, generate, prompt_text, seed_generators, slerp

Source = Union[int, torch.Tensor]   # a seed, or an image 1 x C x H x W in [-1, 1]
MIX = Range(0.0, 1.0, float)        # breed: 0 = the first parent, 1 = the second


def _mechanism(model: Family) -> str:
    if model.edits:
        return "edit"
    if model.has_latent:
        return "latent"
    raise ConfigError(f"model family {model.name!r} cannot make variations: it has neither a latent space "
                      "(GANs, VAEs) nor a denoiser to re-noise an image with (ddpm, flow, consistency)")


def _check_image(model: Family, image: torch.Tensor, what: str) -> torch.Tensor:
    size, channels = model.cfg.image_size, model.cfg.channels
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != channels or image.shape[-2:] != (size, size):
        raise ConfigError(f"{what}: image is {tuple(image.shape)}; this model takes 1 x {channels} x {size} x {size} "
                          f"(resize it to {size}x{size} first)")
    return image


def _labels(model: Family, sources: Sequence[Source], labels: torch.Tensor | None) -> torch.Tensor | None:
    """One class for every output: the one given, else the first seed source's default class (as
    `interpolate` does); None for an unconditional model, or when only images were given (diffusion and
    flow then draw unconditionally; families that need a class say so)."""
    if labels is not None or not model.conditional:
        return None if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)[:1]
    seeds = [s for s in sources if isinstance(s, int)]
    return default_labels(model, seeds[:1]) if seeds else None


def _source_latent(model: Family, source: Source, label: torch.Tensor | None) -> torch.Tensor:
    if isinstance(source, int):
        return model.draw_noise(1, seed_generators([source]))                  # 1 x z_dim
    if not model.encodes:
        raise ConfigError(f"model family {model.name!r} has no encoder to find an image's latent: "
                          "vary or breed seeds instead (--seed, --parents)")
    with torch.no_grad():
        return model.encode(_check_image(model, source, "source"), label)[0]   # the posterior mean


def _source_pixels(model: Family, source: Source, label, prompt, negative_prompt, opts) -> torch.Tensor:
    if isinstance(source, int):
        return generate(model, [source], labels=label, prompts=prompt, negative_prompt=negative_prompt, **opts)
    return _check_image(model, source, "source").float()


def breed(model: Family, parents: Sequence[Source], seeds: Sequence[int], *, strength: float, mix: float = 0.5,
          labels: torch.Tensor | None = None, prompt: str | None = None, negative_prompt: str | None = None,
          batch_size: int = 64, **opts) -> torch.Tensor:
    """len(seeds) x C x H x W in [-1, 1]: variations (module docstring) of the blend of one or two parents,
    `mix` of the way from the first to the second. `labels`: one class for all (default: the first seed
    parent's); `prompt`: one prompt for all, for a text model; `opts`: the family's sampling options."""
    if len(parents) not in (1, 2):
        raise ConfigError(f"give one source to vary or two parents to breed, got {len(parents)}")
    STRENGTH.check(strength, "--strength")
    MIX.check(mix, "--mix")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if prompt is not None and not isinstance(prompt, str):
        raise ConfigError("give one prompt for every variation")
    way = _mechanism(model)
    if opts.get("drs"):
        raise ConfigError("--drs draws latents of its own: it cannot vary or breed given ones")
    prompt_text(model, prompt, 1, negative_prompt)   # a prompt for a model without text is refused here
    label = _labels(model, parents, labels)
    out = []
    if way == "latent":
        z0 = _source_latent(model, parents[0], label)
        if len(parents) == 2:
            z0 = slerp(z0, _source_latent(model, parents[1], label), torch.tensor([float(mix)], device=z0.device))
        theta = strength * math.pi / 2
        for i in range(0, len(seeds), batch_size):
            chunk = list(seeds[i:i + batch_size])
            z = math.cos(theta) * z0 + math.sin(theta) * model.draw_noise(len(chunk), seed_generators(chunk))
            lab = None if label is None else label.expand(len(chunk))
            out.append(model.sample(len(chunk), labels=lab, noise=z, **opts).cpu())
        return torch.cat(out)
    pixels = [_source_pixels(model, p, label, prompt, negative_prompt, opts) for p in parents]
    start = pixels[0] if len(pixels) == 1 else (1 - mix) * pixels[0] + mix * pixels[1]
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i:i + batch_size])
        text, negative = prompt_text(model, prompt, len(chunk), negative_prompt)
        words = {} if text is None else {"text": text}
        if negative is not None:
            words["negative"] = negative
        lab = None if label is None else label.expand(len(chunk))
        out.append(model.edit(start.expand(len(chunk), -1, -1, -1), strength, labels=lab,
                              generator=seed_generators(chunk), **opts, **words).cpu())
    return torch.cat(out)


def vary(model: Family, source: Source, seeds: Sequence[int], *, strength: float, **kw) -> torch.Tensor:
    """len(seeds) variations of one source (a seed or an image): breed with a single parent."""
    return breed(model, [source], seeds, strength=strength, **kw)
