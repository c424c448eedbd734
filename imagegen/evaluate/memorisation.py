"""Does a model copy its training images? Pure functions on images (N x C x H x W in [-1, 1]).

For each generated image, the distance to its nearest and second-nearest training image, in pixels (the
root-mean-square difference per pixel, so 0 is an exact copy and the scale does not depend on the image
size). The same for the held-out test images, which no model saw: their distances are what a model that
does not copy should show.

A near-copy is an image much closer to one training image than to any other: nearest < RATIO x second
nearest, the test of Yoon et al., "Diffusion Probabilistic Models Generalize when They Fail to Memorize"
(ICML 2023 workshop), and of Gu et al., "On Memorization in Diffusion Models" (2023), with their 1/3. The
share of near-copies among the samples is read against the same share among the held-out images: data with
near-duplicates of its own (an emoji in five skin tones) has a share above zero that is no model's fault.
"""

from __future__ import annotations

import torch

RATIO = 1 / 3
CHUNK = 512


def nearest_two(queries: torch.Tensor, reference: torch.Tensor, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x 2 RMS pixel distances to the nearest and second-nearest reference image, N indices of the
    nearest) for images N x C x H x W against M >= 2 reference images of the same shape; `skip` 1 leaves
    out each query's own nearest (itself, when the queries are the reference)."""
    if reference.shape[0] < 2 + skip:
        raise ValueError(f"the nearest-neighbour test needs at least {2 + skip} reference images")
    ref = reference.flatten(1).double()
    ref_sq = ref.square().sum(1)
    dims = ref.shape[1]
    dists, index = [], []
    for i in range(0, queries.shape[0], CHUNK):
        q = queries[i:i + CHUNK].flatten(1).double()
        d2 = (q.square().sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq).clamp_min(0)   # chunk x M
        two = d2.topk(2 + skip, dim=1, largest=False)
        dists.append((two.values[:, skip:] / dims).sqrt())
        index.append(two.indices[:, skip])
    return torch.cat(dists).float(), torch.cat(index)


def held_out_nearest(train: torch.Tensor, held_out: torch.Tensor) -> torch.Tensor:
    """N x 2 RMS distances of the held-out images to their nearest and second-nearest training images.
    Data without a held-out split (a folder: its test split is its training images) is compared with
    itself leaving each image out, which is what a held-out image would see."""
    same = held_out.shape == train.shape and torch.equal(held_out, train)
    return nearest_two(held_out, train, skip=1 if same else 0)[0]


def memorisation(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
                 held: torch.Tensor | None = None) -> dict:
    """The samples' nearest-training-image distances and near-copy share beside the held-out images' own;
    `held`: those images' held_out_nearest, where several sets of samples are read against the same ones."""
    ds, _ = nearest_two(samples, train)
    dh = held_out_nearest(train, held_out) if held is None else held
    return {"nn_distance_median": float(ds[:, 0].median()), "held_out_nn_distance_median": float(dh[:, 0].median()),
            "near_copy_share": float((ds[:, 0] < RATIO * ds[:, 1]).float().mean()),
            "held_out_near_copy_share": float((dh[:, 0] < RATIO * dh[:, 1]).float().mean())}
