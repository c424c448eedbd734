"""Prepared datasets: `imagegen data prepare SOURCE --out DIR [--size N]` decodes and resizes a source once
into a memory-mapped uint8 store; `--data store:DIR` reads it lazily, in every command.

Layout of DIR (every file raw, little-endian, readable with numpy.memmap or any language):
- `{split}-images.u8`: uint8 N x C x S x S, C-order (the library's NCHW);
- `{split}-labels.i64`: int64 N (-1 = unlabelled);
- `{split}-captions.jsonl`: one JSON string per line, when the source has captions;
- `manifest.json`: format and version, the source, classes, C and S, and per split its count, the files'
  sizes and SHA-256s (the images file hashed in 64 MiB chunks, so damage is reported with the images it
  touches), and the files skipped while preparing.
Splits: `train`, and `test` when the source has one (named datasets, shapes, scenes, CIFAR).

Reading: the images file is memory-mapped, and `ImageDataset.images` is a tensor view of the map, so
code that reads whole arrays works unchanged and processes (DDP ranks) share the pages through the page
cache. Training batches, though, are read with one positional read (pread) per image into a fresh
buffer: a read fault on a file mapping maps a whole page-cache folio into the process (measured here:
about 4 MiB resident for one 12 KiB image), so random batches through the map would leave most of the
file resident in the process; pread leaves the pages in the page cache only, and the resident memory
of a process stays flat however large the store (tests/test_store.py measures both). Every file is checked against the manifest when the
store is opened (sizes, then the hashes, on two threads): a flipped byte, a truncated file or a manifest
that does not fit the files is a DataError that names the file.

Writing a store is data/prepare.py's.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .dataset import ImageDataset

FORMAT, VERSION = "imagegen-store", 1
MANIFEST = "manifest.json"
HASH_CHUNK = 64 << 20          # bytes per hash chunk of an images file


# --- reading -----------------------------------------------------------------------------------------


class Mapping:
    """A store's images file: a read-only memory map (what `ImageDataset.images` views, for code that
    reads whole arrays) and a descriptor that `gather` reads batches through (module docstring)."""

    def __init__(self, path: Path, shape: tuple[int, int, int, int]) -> None:
        self.shape = shape
        self.fd = os.open(path, os.O_RDONLY)
        # ACCESS_COPY: a private mapping, so the tensor over it is writable (torch wants that) while
        # nothing can ever be written back to the store.
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The images at `index` (uint8 n x C x S x S), read with one positional read each."""
        per = int(np.prod(self.shape[1:]))
        out = np.empty((index.numel(), per), np.uint8)
        for row, i in enumerate(index.tolist()):
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"image {i} of a store of {self.shape[0]}")
            got = os.preadv(self.fd, [out[row]], i * per)
            if got != per:
                raise DataError(f"store file ended early reading image {i}: changed since it was opened?")
        return torch.from_numpy(out).view(-1, *self.shape[1:])

    def __del__(self) -> None:
        try:
            self.mm.close()
            os.close(self.fd)
        except (OSError, ValueError, AttributeError):
            pass


def _field(obj: dict, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: no {key!r} field (a damaged or foreign manifest; prepare the store again)")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{where}: {key!r} is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def read_manifest(root: Path) -> dict:
    where = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (a prepared store is a folder made by `imagegen data prepare`)")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{where}: missing (not a store made by `imagegen data prepare`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not readable JSON ({e})") from None
    if _field(manifest, "format", str, str(where)) != FORMAT:
        raise DataError(f"{where}: format {manifest['format']!r} is not {FORMAT!r}")
    if _field(manifest, "version", int, str(where)) != VERSION:
        raise DataError(f"{where}: version {manifest['version']} is not {VERSION} (made by another imagegen)")
    for key, kind in (("channels", int), ("size", int), ("splits", dict), ("source", str)):
        _field(manifest, key, kind, str(where))
    if manifest["channels"] not in (1, 3) or not 1 <= manifest["size"] <= 4096:
        raise DataError(f"{where}: channels {manifest['channels']} and size {manifest['size']} are not an image shape")
    return manifest


def _check_files(root: Path, split: str, entry: dict, per_image: int) -> int:
    """Check a split's files against its manifest entry (sizes, then hashes): its image count."""
    where = f"{root / MANIFEST} (split {split!r})"
    count = _field(entry, "count", int, where)
    files = _field(entry, "files", dict, where)
    expected = {"images": count * per_image, "labels": count * 8}
    jobs = []
    for key in ("images", "labels", "captions"):
        if key not in files and key != "captions":
            raise DataError(f"{where}: no {key!r} file listed")
        if key not in files:
            continue
        spec = files[key]
        name = _field(spec, "name", str, where)
        if "/" in name or name.startswith("."):
            raise DataError(f"{where}: file name {name!r} is not a plain name in the store")
        nbytes = _field(spec, "bytes", int, where)
        if key in expected and nbytes != expected[key]:
            raise DataError(f"{where}: {name} should hold {expected[key]} bytes for {count} images, the manifest "
                            f"says {nbytes}")
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: missing")
        actual = path.stat().st_size
        if actual != nbytes:
            raise DataError(f"{path}: {actual} bytes, the manifest says {nbytes} ("
                            f"{'truncated' if actual < nbytes else 'longer than it should be'}); prepare the store again")
        if key == "images":
            chunk = _field(spec, "chunk_bytes", int, where)
            hashes = _field(spec, "chunks", list, where)
            if chunk <= 0 or len(hashes) != -(-nbytes // chunk):
                raise DataError(f"{where}: {len(hashes)} chunk hashes do not cover {nbytes} bytes in chunks of {chunk}")
            jobs += [(path, i * chunk, min(chunk, nbytes - i * chunk), h, per_image) for i, h in enumerate(hashes)]
        else:
            jobs.append((path, 0, nbytes, _field(spec, "sha256", str, where), 0))

    def verify(job) -> str | None:
        path, offset, length, want, per = job
        digest = hashlib.sha256()
        with path.open("rb") as f:
            f.seek(offset)
            left = length
            while left:
                block = f.read(min(left, 8 << 20))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
        if digest.hexdigest() == want:
            return None
        if per:
            return (f"{path}: bytes {offset}-{offset + length - 1} (images {offset // per}-{(offset + length - 1) // per}) "
                    f"do not match their SHA-256 in the manifest: the store is damaged; prepare it again")
        return f"{path}: does not match its SHA-256 in the manifest: the store is damaged; prepare it again"

    # hashlib releases the GIL on large blocks: two threads hash two chunks at once.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(verify, jobs) if p]
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more damaged part(s))" if len(problems) > 1 else ""))
    return count


def open_store(root: str | Path, split: str = "train", *, size: int = 0, channels: int = 0, name: str | None = None) -> ImageDataset:
    """The split of a prepared store as an ImageDataset whose images are a view of the mapped file."""
    root = Path(root)
    manifest = read_manifest(root)
    splits = manifest["splits"]
    notes = []
    if split == "test" and split not in splits and "train" in splits:
        # As the folder it came from: a source without a test split is measured on its own images.
        notes.append(f"{root} has no test split (its source, {manifest['source']}, has none): the train split stands in")
        split = "train"
    if split not in splits:
        raise DataError(f"{root}: no {split!r} split (it has {', '.join(sorted(splits)) or 'none'})")
    c, s = manifest["channels"], manifest["size"]
    if size and size != s:
        raise ConfigError(f"{root} holds {s} x {s} images; prepare it again with --size {size} (a store is read as it is)")
    if channels and channels != c:
        raise ConfigError(f"{root} holds {c}-channel images; prepare it again with --channels {channels}")
    count = _check_files(root, split, splits[split], c * s * s)
    files = splits[split]["files"]
    mapping = Mapping(root / files["images"]["name"], (count, c, s, s))
    images = torch.from_numpy(np.frombuffer(mapping.mm, np.uint8).reshape(count, c, s, s))
    labels = torch.from_numpy(np.fromfile(root / files["labels"]["name"], dtype="<i8").astype(np.int64))
    captions = []
    if "captions" in files:
        lines = (root / files["captions"]["name"]).read_text(encoding="utf-8").splitlines()
        captions = [json.loads(line) for line in lines]
        if len(captions) != count:
            raise DataError(f"{root / files['captions']['name']}: {len(captions)} captions for {count} images")
    classes = manifest.get("classes") or []
    if classes and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{root}: labels outside 0..{len(classes) - 1}")
    return ImageDataset(images=images, labels=labels, classes=list(classes), name=name or f"store:{root}",
                        source=f"{root} (prepared from {manifest['source']})", captions=captions, mapping=mapping,
                        notes=notes)
