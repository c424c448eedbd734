"""Likelihood of real images under a model, in bits per dimension, on one dequantisation convention.

Images are 8-bit: pixel values k in 0..255. A model with a density p on [-1, 1]-valued pixels scores the
image by uniform dequantisation (Theis, van den Oord & Bethge, ICLR 2016; as RealNVP, Glow and FFJORD do):

    x = 2 (k + u) / 256 - 1,   u ~ U[0, 1)^D,
    bits/dim = -log2 p(x) / D + 7     (log2 256 = 8 bits a pixel, minus 1 for the [-1, 1] scale),

an upper bound, in expectation over u, on the discrete model's negative log-likelihood. u is drawn from
the generator of the image's own seed (its index in the split), so an image's figure does not depend on
its batch; the model's own draws (probes, posterior samples) continue from the same generator.

Which families have a density (`log_likelihood`): `flow` (the ODE's change of variables, an estimate),
`vae` and `cvae` (the importance-weighted bound, a lower bound on log p, so an upper bound on bits/dim;
the cvae's is log p(x | y) at the true label).
"""

from __future__ import annotations

import math

import torch

from ..config import Range
from ..errors import ConfigError

N_LIKELIHOOD = Range(1, 100_000)   # test images scored (--likelihood)
DEQUANTIZATION = ("uniform: x = 2 (k + u) / 256 - 1 with u ~ U[0, 1)^D from the generator seeded with the image's "
                  "index; bits/dim = -log2 p(x) / D + 7")

# Published test-split figures, bits/dim, on the same uniform dequantisation (their models differ).
PUBLISHED = {
    "mnist": {"RealNVP (Dinh et al. 2017), as reported by Papamakarios et al. 2017": 1.06,
              "Glow (Kingma & Dhariwal 2018), as reported by Grathwohl et al. 2019": 1.05,
              "FFJORD (Grathwohl et al. 2019)": 0.99},
    "fashion-mnist": {"Glow trained on FashionMNIST (Nalisnick et al. 2019)": 2.9},
}


def require_likelihood(run) -> None:
    """A one-line error for a run (checkpoint.Run) whose family has no likelihood."""
    if not run.model.has_likelihood:
        raise ConfigError(f"--likelihood: model {run.family!r} has no likelihood (flow, vae and cvae have one)")
    run.model.likelihood_estimator()   # a model that has none after all (a latent flow) says why here


def dequantize(images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """uint8 images N x C x H x W -> x in [-1, 1), one uniform draw per pixel from each image's generator."""
    u = torch.stack([torch.rand(img.shape, generator=g) for img, g in zip(images, generators)])
    return (images.float() + u) / 128 - 1


def bits_per_dim(log_px: torch.Tensor, dims: int) -> torch.Tensor:
    """log p(x) in nats of a density on [-1, 1]^D -> bits per dimension of the 8-bit image."""
    return -log_px / (dims * math.log(2)) + 7


def image_bits_per_dim(model, images: torch.Tensor, seeds: list[int], *, labels: torch.Tensor | None = None,
                       batch_size: int = 64, **opts) -> torch.Tensor:
    """bits/dim (N) of uint8 images N x C x H x W, image i dequantised with seed seeds[i]. labels (N) are
    handed to families whose likelihood is conditional (cvae); opts go to model.log_likelihood."""
    if not model.has_likelihood:
        raise TypeError(f"model {model.name!r} has no likelihood (flow, vae and cvae have one)")
    takes_labels = model.conditional and model.conditional_likelihood
    dims = images[0].numel()
    out = []
    for i in range(0, len(seeds), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch_size]]
        x = dequantize(images[i:i + batch_size], gens)
        extra = {"labels": labels[i:i + batch_size]} if takes_labels else {}
        out.append(bits_per_dim(model.log_likelihood(x, generator=gens, **extra, **opts).double().cpu(), dims))
    return torch.cat(out)


def measure(model, dataset, n: int, *, batch_size: int = 64) -> dict:
    """bits/dim of the first n images of `dataset` (a test split): mean, standard error, and the protocol."""
    N_LIKELIHOOD.check(n, "--likelihood")
    n = min(n, len(dataset))
    labels = dataset.labels[:n] if dataset.labelled else None
    bpd = image_bits_per_dim(model, dataset.images[:n], list(range(n)), labels=labels, batch_size=batch_size)
    return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / math.sqrt(n)) if n > 1 else None,
            "images": n, "split": "test (the first n images)", "dequantization": DEQUANTIZATION,
            "estimator": model.likelihood_estimator()}
