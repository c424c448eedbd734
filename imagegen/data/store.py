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

`prepare` streams: a folder or zip is decoded a chunk of 1,024 images at a time, written, and hashed as it
goes; the store is written as DIR.partial and renamed into place when complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .dataset import ImageDataset

FORMAT, VERSION = "imagegen-store", 1
MANIFEST = "manifest.json"
HASH_CHUNK = 64 << 20          # bytes per hash chunk of an images file
SPLIT_SOURCES = ("fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "shapes", "scenes", "captioned", "idx")


# --- writing -----------------------------------------------------------------------------------------


class _ChunkHasher:
    """SHA-256 of each HASH_CHUNK-byte piece of a stream written in pieces of any size."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.current = hashlib.sha256()
        self.filled = 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), HASH_CHUNK - self.filled)
            self.current.update(data[:take])
            self.filled += take
            data = data[take:]
            if self.filled == HASH_CHUNK:
                self.done.append(self.current.hexdigest())
                self.current, self.filled = hashlib.sha256(), 0

    def finish(self) -> list[str]:
        if self.filled:
            self.done.append(self.current.hexdigest())
        return self.done


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_split(folder: Path, split: str, chunks, bar: tqdm, skipped: list[tuple[str, str]]) -> tuple[dict, dict]:
    """Write one split from chunks of (images, labels, captions, bad, converted), after `skipped` files
    the source already reported: (its manifest entry, {"shape", "skipped": every file skipped})."""
    images_path = folder / f"{split}-images.u8"
    hasher = _ChunkHasher()
    labels: list[torch.Tensor] = []
    captions: list[str] = []
    skipped = list(skipped)
    converted: list[str] = []
    shape = None
    count = 0
    with images_path.open("wb") as out:
        for images, lab, caps, bad, conv in chunks:
            skipped += bad
            converted += conv
            if images is not None:
                if shape is None:
                    shape = tuple(images.shape[1:])
                data = memoryview(images.contiguous().numpy()).cast("B")
                out.write(data)
                hasher.update(data)
                labels.append(lab)
                captions += caps
                count += images.shape[0]
            bar.update((0 if images is None else images.shape[0]) + len(bad))
            _return_freed_memory()
        out.flush()
        os.fsync(out.fileno())
    if count == 0:
        raise DataError(f"no readable images for the {split} split ({len(skipped)} skipped)")
    label_bytes = torch.cat(labels).numpy().astype("<i8").tobytes()
    (folder / f"{split}-labels.i64").write_bytes(label_bytes)
    files = {"images": {"name": images_path.name, "bytes": count * int(np.prod(shape)), "chunk_bytes": HASH_CHUNK,
                        "chunks": hasher.finish()},
             "labels": {"name": f"{split}-labels.i64", "bytes": len(label_bytes), "sha256": _sha256(label_bytes)}}
    if captions:
        text = "".join(json.dumps(c) + "\n" for c in captions).encode("utf-8")
        (folder / f"{split}-captions.jsonl").write_bytes(text)
        files["captions"] = {"name": f"{split}-captions.jsonl", "bytes": len(text), "sha256": _sha256(text)}
    entry = {"count": count, "files": files, "skipped": len(skipped),
             "skipped_files": [list(s) for s in skipped[:100]], "converted": len(converted)}
    return entry, {"shape": shape, "skipped": skipped}


def _return_freed_memory() -> None:
    """Hand memory freed by the decoding threads back to the OS (glibc's malloc_trim; nothing elsewhere).
    Without it glibc keeps it in the threads' arenas: preparing 400,000 64 x 64 images grew the process
    by about 6 KiB an image (2.7 GB peak); with it the process stays near 200 MB."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


def prepare(source: str, out: str | Path, *, size: int = 0, channels: int = 0, strict: bool = False,
            progress: bool = True, log=print) -> Path:
    """Decode `source` (any --data spec but pair:) once into a store at `out` (module docstring)."""
    from . import edmzip, folder as folder_source
    from .registry import DataConfig, expand_path, expand_source, load_data
    source, out = expand_source(source), Path(expand_path(str(out)))
    if out.exists():
        raise ConfigError(f"--out {out} exists; remove it or choose another folder")
    kind, _, arg = source.partition(":")
    if kind in ("pair", "store"):
        raise ConfigError(f"data prepare: {kind}: sources cannot be prepared (prepare each folder, or use the store as it is)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    t0 = time.perf_counter()
    splits, info = {}, {}
    try:
        if kind in ("folder", "zip"):
            if not arg:
                raise ConfigError(f"--data {kind}:PATH needs a path")
            files = (folder_source.scan_folder(arg, size or 64, channels or None) if kind == "folder"
                     else edmzip.scan_zip(arg, size, channels or None))
            classes, where = files.classes, str(Path(arg))
            with tqdm(total=len(files), unit="img", disable=not progress, desc="train", mininterval=1.0) as bar:
                splits["train"], info["train"] = _write_split(partial, "train", files.chunks(), bar, files.skipped)
        else:
            classes, where = None, source
            for split in ("train", "test"):
                if split == "test" and kind not in SPLIT_SOURCES:
                    break
                try:
                    ds = load_data(DataConfig(source=source, split=split, size=size, channels=channels, strict=strict))
                except DataError:
                    if split == "test":   # idx:DIR without t10k files: a train split alone
                        break
                    raise
                classes, where = ds.classes, ds.source
                with tqdm(total=len(ds), unit="img", disable=not progress, desc=split, mininterval=1.0) as bar:
                    chunks = ((ds.images[i:i + 4096], ds.labels[i:i + 4096], ds.captions[i:i + 4096], [], [])
                              for i in range(0, len(ds), 4096))
                    splits[split], info[split] = _write_split(partial, split, chunks, bar, ds.skipped)
        skipped = info["train"]["skipped"]
        if strict and skipped:
            details = "; ".join(f"{f}: {r}" for f, r in skipped[:10])
            raise DataError(f"{source}: {len(skipped)} bad file(s) under --strict: {details}")
        c, s, _ = info["train"]["shape"]
        manifest = {"format": FORMAT, "version": VERSION, "source": source, "source_path": where,
                    "classes": classes, "channels": c, "size": s, "layout": "uint8 N x C x S x S, C-order",
                    "splits": splits, "imagegen_version": _version()}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n = sum(e["count"] for e in splits.values())
    nbytes = sum(e["files"]["images"]["bytes"] for e in splits.values())
    for path, reason in info["train"]["skipped"][:20]:
        log(f"skipped {path}: {reason}")
    counts = ", ".join(f"{k} {e['count']}" for k, e in splits.items())
    log(f"prepared {out}: {n} images ({counts}) of {c} x {s} x {s}, "
        f"{nbytes / 2**30:.2f} GiB, in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} images/s)"
        + (f"; {len(info['train']['skipped'])} bad file(s) skipped" if info["train"]["skipped"] else ""))
    return out


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


def _version() -> str:
    from .. import __version__
    return __version__
