"""`shapes`: a built-in, procedurally drawn, labelled dataset that needs no files.

32x32 RGB images of one circle, square, triangle or star of random colour, size, position and rotation
on a dark random background, anti-aliased by 2x2 supersampling. The same seed always gives the same
images; the train and test splits use different seeds.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

CLASSES = ["circle", "square", "triangle", "star"]
SPLIT_SIZE = {"train": 8000, "test": 2000}
SPLIT_SEED = {"train": 0, "test": 1}
SUPERSAMPLE = 2


def convex_inside(px, py, vx, vy):
    """Points (px, py: N x P) inside convex polygons with vertices (vx, vy: N x V, counter-clockwise)."""
    inside = np.ones(px.shape, dtype=bool)
    nv = vx.shape[1]
    for i in range(nv):
        ax, ay = vx[:, i:i + 1], vy[:, i:i + 1]
        bx, by = vx[:, (i + 1) % nv:(i + 1) % nv + 1], vy[:, (i + 1) % nv:(i + 1) % nv + 1]
        inside &= (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
    return inside


def regular_polygon(cx, cy, r, theta, n, radii=None):
    """Vertices (N x n) of a regular n-gon, or of a polygon with per-vertex radius factors `radii`."""
    k = np.arange(n)[None, :]
    ang = theta[:, None] + 2 * np.pi * k / n
    rr = r[:, None] * (np.asarray(radii)[None, :] if radii is not None else 1.0)
    return cx[:, None] + rr * np.cos(ang), cy[:, None] + rr * np.sin(ang)


def render(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw one shape per label: uint8 N x 3 x size x size."""
    n = len(labels)
    s = size * SUPERSAMPLE
    coords = ((np.arange(s) + 0.5) / SUPERSAMPLE).astype(np.float32)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    px, py = gx.reshape(1, -1), gy.reshape(1, -1)                      # 1 x P
    r = (rng.uniform(0.22, 0.4, n) * size).astype(np.float32)
    cx = rng.uniform(r * 0.9, size - r * 0.9).astype(np.float32)
    cy = rng.uniform(r * 0.9, size - r * 0.9).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    fg = rng.uniform(0.45, 1.0, (n, 3))
    fg[np.arange(n), rng.integers(0, 3, n)] = 1.0                      # at least one bright channel
    bg = rng.uniform(0.0, 0.25, (n, 3))
    mask = np.zeros((n, px.shape[1]), dtype=bool)
    for c, name in enumerate(CLASSES):
        sel = np.flatnonzero(labels == c)
        if sel.size == 0:
            continue
        X, Y = np.broadcast_to(px, (sel.size, px.shape[1])), np.broadcast_to(py, (sel.size, px.shape[1]))
        a, b, rr, t = cx[sel], cy[sel], r[sel], theta[sel]
        if name == "circle":
            m = (X - a[:, None]) ** 2 + (Y - b[:, None]) ** 2 <= rr[:, None] ** 2
        elif name == "square":
            m = convex_inside(X, Y, *regular_polygon(a, b, rr, t, 4))
        elif name == "triangle":
            m = convex_inside(X, Y, *regular_polygon(a, b, rr * 1.1, t, 3))
        else:
            # A five-pointed star is the union of five convex kites: centre, inner, outer, inner vertex.
            ox, oy = regular_polygon(a, b, rr * 1.15, t, 5)
            ix, iy = regular_polygon(a, b, rr * 0.47, t + np.pi / 5, 5)
            m = np.zeros(X.shape, dtype=bool)
            for k in range(5):
                kx = np.stack([a, ix[:, k - 1], ox[:, k], ix[:, k]], 1)
                ky = np.stack([b, iy[:, k - 1], oy[:, k], iy[:, k]], 1)
                m |= convex_inside(X, Y, kx, ky)
        mask[sel] = m
    cover = mask.reshape(n, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(2, 4))   # N x H x W in [0, 1]
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * cover[:, None]
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


CHUNK = 1000   # images drawn per call of render(): the random stream is consumed chunk by chunk


def make_shapes(split: str = "train", n: int | None = None, size: int = 32, seed: int | None = None,
                first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `shapes` split: (uint8 N x 3 x size x size, labels N). Balanced classes, deterministic.

    `first` (data.limit): only the first images are wanted, so only the chunks that hold them are drawn;
    they are the same images as in the whole split (a limit of 256 renders 1000, not 8000).
    Cached per process (callers must not modify the tensors in place).
    """
    n = SPLIT_SIZE[split] if n is None else n
    stop = n if first is None else min(n, -(-first // CHUNK) * CHUNK)
    return _render_split(split, n, size, seed, stop)


@functools.lru_cache(maxsize=4)
def _render_split(split: str, n: int, size: int, seed: int | None, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `stop` images (a multiple of CHUNK, or n) of the split of n."""
    rng = np.random.default_rng(SPLIT_SEED[split] if seed is None else seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    chunks = [render(labels[i:i + CHUNK], rng, size) for i in range(0, stop, CHUNK)]
    return torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(labels[:stop].astype(np.int64))
