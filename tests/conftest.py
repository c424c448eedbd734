"""Shared fixtures: tiny real components (no mocks) so the suite runs in a few minutes on 2 CPU cores."""

from __future__ import annotations

import gzip
import struct

import pytest

import imagegen

TINY = {
    "family": "dcgan",
    "model": {"width": 8, "z_dim": 16},
    "data": {"source": "shapes", "limit": 256},
    "train": {"batch_size": 16, "log_every": 5, "sample_every": 0, "grid_size": 16, "checkpoint_every": 10},
}


def tiny_config(steps: int = 20, **sections) -> imagegen.RunConfig:
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    tree["train"]["steps"] = steps
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return imagegen.resolve_config(tree)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained DCGAN run folder shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs")
    return imagegen.train(tiny_config(steps=20), out=out, progress=False)


def idx_bytes(dtype_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, dtype_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_idx_set(folder, n: int = 20, *, gz: bool = True, labels: bytes | None = None, images: bytes | None = None):
    """A valid MNIST-style train split in `folder` (28x28 images, labels 0..9), optionally overridden."""
    folder.mkdir(parents=True, exist_ok=True)
    img = images if images is not None else idx_bytes(0x08, (n, 28, 28), bytes(range(256)) * (n * 784 // 256) + bytes(n * 784 % 256))
    lbl = labels if labels is not None else idx_bytes(0x08, (n,), bytes(i % 10 for i in range(n)))
    for name, data in (("train-images-idx3-ubyte", img), ("train-labels-idx1-ubyte", lbl)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder
