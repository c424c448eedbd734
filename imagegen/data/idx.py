"""IDX files (the MNIST format): a strict parser and the MNIST-style datasets built on it.

Format (big-endian): two zero bytes, a dtype code, the number of dimensions, then one uint32 per
dimension, then the data. Every property is checked explicitly and a bad file raises IDXError naming
the file and the problem. Sizes are checked before anything large is allocated or decompressed.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import IDXError

# dtype code -> (numpy dtype, bytes per item); the only codes the format defines.
IDX_DTYPES = {0x08: (">u1", 1), 0x09: (">i1", 1), 0x0B: (">i2", 2), 0x0C: (">i4", 4), 0x0D: (">f4", 4), 0x0E: (">f8", 8)}
MAX_ITEMS = 1 << 31  # refuse headers that promise more than 2 GiB of uint8 before reading any data

IMAGES_FILE = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS_FILE = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IDXError(f"{path}: cannot read {what}: {e}") from None
    if len(data) != n:
        raise IDXError(f"{path}: file ends early while reading {what} (expected {n} bytes, got {len(data)})")
    return data


def read_idx(path: str | Path, *, ndim: int | None = None, dtype_code: int | None = 0x08) -> np.ndarray:
    """Read one IDX file (raw or .gz) into a numpy array, validating every header field and the size."""
    path = Path(path)
    if path.is_dir():
        raise IDXError(f"{path}: is a directory, not an IDX file")
    if not path.exists():
        raise IDXError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise IDXError(f"{path}: file is empty")
    with _open(path) as f:
        head = _read_exact(f, 4, path, "the magic number")
        if head[0] != 0 or head[1] != 0:
            raise IDXError(f"{path}: bad magic number {head.hex()} (an IDX file starts with two zero bytes)")
        code, nd = head[2], head[3]
        if code not in IDX_DTYPES:
            raise IDXError(f"{path}: unknown IDX dtype code 0x{code:02x}")
        if dtype_code is not None and code != dtype_code:
            raise IDXError(f"{path}: dtype code 0x{code:02x} is not the expected 0x{dtype_code:02x} (unsigned byte)")
        if ndim is not None and nd != ndim:
            raise IDXError(f"{path}: has {nd} dimensions, expected {ndim}")
        if nd == 0:
            raise IDXError(f"{path}: has no dimensions")
        dims = struct.unpack(f">{nd}I", _read_exact(f, 4 * nd, path, "the dimensions"))
        if any(d == 0 for d in dims):
            raise IDXError(f"{path}: zero dimension in shape {dims}")
        np_dtype, itemsize = IDX_DTYPES[code]
        count = int(np.prod(dims, dtype=np.int64))
        if count > MAX_ITEMS:
            raise IDXError(f"{path}: shape {dims} holds {count} items, over the limit of {MAX_ITEMS}")
        nbytes = count * itemsize
        if path.suffix != ".gz":
            expected = 4 + 4 * nd + nbytes
            actual = path.stat().st_size
            if actual < expected:
                raise IDXError(f"{path}: file ends early: {actual} bytes, but the header {dims} needs {expected}")
            if actual > expected:
                raise IDXError(f"{path}: has {actual - expected} bytes after the data that the header {dims} announces")
        data = _read_exact(f, nbytes, path, "the data")
        extra = _read_exact_or_none(f, path)
        if extra:
            raise IDXError(f"{path}: has bytes after the {nbytes} bytes of data that the header {dims} announces")
    return np.frombuffer(data, dtype=np_dtype).reshape(dims)


def _read_exact_or_none(f, path: Path) -> bytes:
    try:
        return f.read(1)
    except (OSError, EOFError, zlib.error) as e:
        raise IDXError(f"{path}: corrupt after the data: {e}") from None


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 1 x H x W uint8) and labels (N int64), with counts and label range checked."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IDXError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
    if num_classes is not None and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise IDXError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{num_classes - 1}")
    return (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.exists():
            return p
    return None
