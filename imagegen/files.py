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


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file listed in folder/MANIFEST.json against its SHA-256; CheckpointError names the file."""
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing (no weights saved in {folder} yet?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: SHA-256 does not match the manifest (file corrupted or modified)")
    return files
