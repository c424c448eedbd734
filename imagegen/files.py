"""Files at the bottom of every layer: atomic writes (a reader never sees half a file) and SHA-256 hashes.
Run folders (checkpoint.py), caches (text.py, evaluators) and downloads (data/) all write through here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MANIFEST = "MANIFEST.json"   # a run folder's or checkpoint's list of files and their SHA-256 (checkpoint.py)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    """folder/MANIFEST.json, checked: {"files": {NAME: SHA-256}, "step": INT}, every NAME a plain path inside
    the folder (no absolute path, no '..'); CheckpointError names what is wrong."""
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing (no weights saved in {folder} yet?)") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({str(e)[:200] or type(e).__name__})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError(f"{mpath}: unreadable manifest ('files' must map file names to SHA-256 digests)")
    step = manifest.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{mpath}: 'step' is {str(step)[:40]!r}, not a step number")
    root = folder.resolve()
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or not (root / name).resolve().is_relative_to(root):
            raise CheckpointError(f"{mpath}: {name[:100]!r} is not a file inside {folder}")
    return manifest


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file listed in folder/MANIFEST.json against its SHA-256; CheckpointError names the file."""
    files = read_manifest(folder)["files"]
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: SHA-256 does not match the manifest (file corrupted or modified)")
    return files


def manifest_step(folder: Path) -> int:
    """The training step a run folder's or checkpoint's manifest records."""
    return read_manifest(folder)["step"]
