"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from their *binary* archives: `--data cifar10 | cifar100`.

The Python versions of the archives hold pickles, which imagegen never reads. The binary versions hold
fixed-size records: CIFAR-10 one label byte then 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue,
each row-major 32 x 32); CIFAR-100 a coarse and a fine label byte then the same 3,072 (imagegen uses the
fine label: 100 classes). Class names come from the archives' text files.

The archive is looked for as locate.search_dirs (IMAGEGEN_DATA, the user cache, /usr/share/datasets)
and otherwise downloaded into the cache; either way it must match the SHA-256 that TensorFlow Datasets
pins (tensorflow_datasets/url_checksums/cifar10.txt and cifar100.txt). Members are streamed out of the
.tar.gz by name and size, never extracted to disk; a member with an unsafe name (absolute, `..`), one
that is not in the layout, or one whose size is not a whole number of records is refused by name.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..config import cache_path
from ..errors import DataError, DownloadError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSpec:
    name: str
    url: str
    sha256: str
    prefix: str                      # the folder every member lives in
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int                 # 1 (CIFAR-10) or 2 (coarse, fine: CIFAR-100)
    names: str                       # the class names file (one per line)
    extra: tuple[str, ...] = ()      # other members the archive holds, allowed and not read

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def record(self) -> int:
        return self.label_bytes + PIXELS


CIFAR_DATASETS = {
    "cifar10": CifarSpec(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
        1, "batches.meta.txt", ("readme.html",)),
    "cifar100": CifarSpec(
        "cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        "cifar-100-binary", ("train.bin",), ("test.bin",), 2, "fine_label_names.txt",
        ("coarse_label_names.txt",)),
}


def locate(spec: CifarSpec, *, allow_download: bool = True) -> Path:
    """The archive, found in the search folders or downloaded into the cache, checked against its pin."""
    from ..files import sha256_file
    from .download import download
    from . import locate as places
    for d in places.search_dirs(spec.name):
        path = d / spec.archive
        if path.is_file():
            actual = sha256_file(path)
            if actual != spec.sha256:
                raise DataError(f"{path}: SHA-256 {actual} does not match the pinned {spec.sha256} "
                                f"(a damaged or different archive; delete it to download again)")
            return path
    if not allow_download:
        raise DataError(f"{spec.name}: {spec.archive} not found in {', '.join(map(str, places.search_dirs(spec.name)))}")
    dest = cache_path(spec.name, spec.archive)
    try:
        return download(spec.url, dest, spec.sha256, max_bytes=1 << 30, timeout=60.0)
    except DownloadError as e:
        raise DataError(f"{spec.name}: {spec.archive} not found in {', '.join(map(str, places.search_dirs(spec.name)))} "
                        f"and the download failed: {e}. CIFAR needs the network once; or put the archive in "
                        f"{cache_path(spec.name)}") from None


def read_archive(path: Path, spec: CifarSpec, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 N x 3 x 32 x 32, int64 labels N, class names) of one split, streamed out of the archive."""
    wanted = spec.train if split == "train" else spec.test
    known = set(spec.train) | set(spec.test) | {spec.names} | set(spec.extra)
    parts: dict[str, np.ndarray] = {}
    names: list[str] | None = None
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:          # in archive order, one at a time: nothing is extracted
                where = f"{path}: member {member.name!r}"
                pure = PurePosixPath(member.name)
                if pure.is_absolute() or ".." in pure.parts:
                    raise DataError(f"{where}: unsafe name (absolute or with '..'); refused")
                if member.isdir() and pure == PurePosixPath(spec.prefix):
                    continue
                if pure.parent != PurePosixPath(spec.prefix) or pure.name not in known:
                    raise DataError(f"{where}: not part of the {spec.name} layout ({spec.prefix}/ with "
                                    f"{', '.join(sorted(known))}); refused")
                if not member.isfile():
                    raise DataError(f"{where}: not a regular file (a link or device); refused")
                if pure.name not in wanted and pure.name != spec.names:
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise DataError(f"{where}: ends early ({len(data)} of {member.size} bytes)")
                if pure.name == spec.names:
                    names = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
                    continue
                if not data or len(data) % spec.record:
                    raise DataError(f"{where}: {len(data)} bytes is not a whole number of {spec.record}-byte "
                                    f"records (truncated?)")
                parts[pure.name] = np.frombuffer(data, np.uint8).reshape(-1, spec.record)
    except (tarfile.TarError, EOFError, OSError) as e:   # a broken gzip stream or tar header
        raise DataError(f"{path}: cannot read the archive: {e}") from None
    missing = [m for m in wanted if m not in parts] + ([spec.names] if names is None else [])
    if missing:
        raise DataError(f"{path}: missing member(s) {', '.join(f'{spec.prefix}/{m}' for m in missing)}")
    records = np.concatenate([parts[m] for m in wanted])            # N x record, in the files' order
    labels = records[:, spec.label_bytes - 1].astype(np.int64)      # CIFAR-100: the fine label
    if labels.max(initial=0) >= len(names):
        raise DataError(f"{path}: label {int(labels.max())} but {spec.names} names {len(names)} classes")
    images = records[:, spec.label_bytes:].reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels), names


def load_cifar(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(images, labels, classes, where they came from) of `--data cifar10 | cifar100`."""
    spec = CIFAR_DATASETS[name]
    path = locate(spec)
    images, labels, classes = read_archive(path, spec, split)
    return images, labels, classes, str(path)
