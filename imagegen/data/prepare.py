"""`imagegen data prepare SOURCE --out DIR`: decode any --data source (but pair: and store:) once into a
prepared store (the layout is data/store.py's). It streams: a folder or zip is decoded a chunk of 1,024
images at a time, written, and hashed as it goes; the store is written as DIR.partial and renamed into
place when complete. It sits above registry.py, which it loads named sources through, and store.py,
whose format it writes."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import validate
from ..errors import ConfigError, DataError
from ..version import __version__
from . import edmzip, folder as folder_source
from .locate import expand_path, expand_source
from .registry import DataConfig, load_data
from .store import FORMAT, HASH_CHUNK, MANIFEST, VERSION

# The sources that have a test split, which prepare writes too (a folder or zip has one with held_out).
SPLIT_SOURCES = ("fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "shapes", "scenes", "emoji", "captioned",
                 "idx")


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


def prepare(source: str, out: str | Path, *, size: int = 0, channels: int = 0, held_out: float = 0.0,
            strict: bool = False, progress: bool = True, log=print) -> Path:
    """Decode `source` (any --data spec but pair:) once into a store at `out` (module docstring). A folder
    or zip with `held_out` (data.held_out) gets a test split of that share, the files `--data SOURCE
    --held-out` holds out, and a train split of the rest; other sources keep their own test split."""
    source, out = expand_source(source), Path(expand_path(str(out)))
    validate(DataConfig(source=source, held_out=held_out), "data")   # held_out: a folder or zip only, in range
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
            for split in ("train", "test") if held_out else ("train",):
                part = files.split(split, held_out, source)
                with tqdm(total=len(part), unit="img", disable=not progress, desc=split, mininterval=1.0) as bar:
                    splits[split], info[split] = _write_split(partial, split, part.chunks(), bar,
                                                              files.skipped if split == "train" else [])
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
        # a named source may report an index problem in both splits: once here
        skipped = list(dict.fromkeys(tuple(s) for part in info.values() for s in part["skipped"]))
        if strict and skipped:
            details = "; ".join(f"{f}: {r}" for f, r in skipped[:10])
            raise DataError(f"{source}: {len(skipped)} bad file(s) under --strict: {details}")
        c, s, _ = info["train"]["shape"]
        manifest = {"format": FORMAT, "version": VERSION, "source": source, "source_path": where,
                    "classes": classes, "channels": c, "size": s, "layout": "uint8 N x C x S x S, C-order",
                    "splits": splits, "held_out": held_out, "imagegen_version": __version__}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n = sum(e["count"] for e in splits.values())
    nbytes = sum(e["files"]["images"]["bytes"] for e in splits.values())
    for path, reason in skipped[:20]:
        log(f"skipped {path}: {reason}")
    counts = ", ".join(f"{k} {e['count']}" for k, e in splits.items())
    log(f"prepared {out}: {n} images ({counts}) of {c} x {s} x {s}, "
        f"{nbytes / 2**30:.2f} GiB, in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} images/s)"
        + (f"; {len(skipped)} bad file(s) skipped" if skipped else ""))
    return out
