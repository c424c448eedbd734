"""Meaningful latent directions for GANs and VAEs: the studio's sliders and `imagegen sample --directions`.

Härkönen et al., "GANSpace: Discovering Interpretable GAN Controls" (NeurIPS 2020): draw n latents z,
take the generator's (the VAE decoder's) activations y at an early layer (here the first activation after
its first convolution: N x F), find their principal components, and carry each back to latent space by
least squares: with x = the PCA coordinates of y (N x k), the directions are the rows of B in z ~ x B
(k x z_dim), each scaled to unit length. Moving z along direction 0 changes the early features the most,
which is the biggest change in layout or shape the model has, and so on down.

The directions are a deterministic function of the weights (fixed seeds, fixed chunks), recomputed where
needed (cached per model object), so a slider setting is reproduced by its values alone: `--directions
1.5,0,-2` gives the same pixels as the page. Shapes: latents N x z_dim; directions k x z_dim.
"""

from __future__ import annotations

import torch

from .config import Range
from .errors import ConfigError
from .models.base import Family, eval_mode
from .sample import default_labels, seed_generators

MAX_DIRECTIONS = 8
DIRECTION = Range(-5.0, 5.0, float)   # how far along a direction (in units of the latent's standard deviation)
SAMPLES = 512                          # latents whose early features are analysed
SEED = 0
CHUNK = 128


def principal_directions(model: Family, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions k x z_dim, unit length; the share of the features' variance each explains, k)."""
    if not 1 <= k <= MAX_DIRECTIONS:
        raise ConfigError(f"directions: 1 to {MAX_DIRECTIONS}, got {k}")
    if "_principal_directions" not in model.__dict__:   # always all MAX_DIRECTIONS: the first k do not depend on k
        model.__dict__["_principal_directions"] = _directions(model, MAX_DIRECTIONS)
    dirs, explained = model.__dict__["_principal_directions"]
    return dirs[:k], explained[:k]


@torch.no_grad()
def _directions(model: Family, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    net, call, early = model.latent_network()
    feats: list[torch.Tensor] = []
    # a copy: an in-place activation after the hooked module would change what was kept
    hook = early.register_forward_hook(lambda _m, _i, out: feats.append(out.detach().flatten(1).float().cpu().clone()))
    try:
        z = model.draw_noise(SAMPLES, seed_generators(range(SEED, SEED + SAMPLES))).cpu()   # SAMPLES x z_dim
        labels = default_labels(model, range(SAMPLES))
        with eval_mode(model):
            for i in range(0, SAMPLES, CHUNK):
                call(z[i:i + CHUNK].to(model.device), None if labels is None else labels[i:i + CHUNK].to(model.device))
    finally:
        hook.remove()
    y = torch.cat(feats).double()                                       # SAMPLES x F
    y = y - y.mean(0)
    _, s, vt = torch.linalg.svd(y, full_matrices=False)
    x = y @ vt[:k].T                                                    # PCA coordinates, SAMPLES x k
    b = torch.linalg.lstsq(x, z.double()).solution                      # k x z_dim: z ~ x b
    b = b / b.norm(dim=1, keepdim=True)
    # a sign that does not depend on the SVD's: the largest entry of each direction is positive
    b = b * torch.sign(b.gather(1, b.abs().argmax(1, keepdim=True)))
    return b.float(), (s[:k] ** 2 / (s ** 2).sum()).float()


def direction_shift(model: Family, values: list[float]) -> list[float]:
    """The latent shift (z_dim values) of moving values[i] along direction i: the `latent` argument of
    generate(), which adds it to each seed's latent."""
    if not values:
        return []
    if len(values) > MAX_DIRECTIONS:
        raise ConfigError(f"--directions: at most {MAX_DIRECTIONS} values, got {len(values)}")
    for v in values:
        DIRECTION.check(v, "--directions: a value")
    dirs, _ = principal_directions(model, len(values))
    return (torch.tensor(values, dtype=torch.float32) @ dirs).tolist()
