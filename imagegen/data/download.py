"""Checksummed downloads: stream to `<name>.partial`, hash while writing, rename only when the SHA-256
and length match. A failed, truncated or mismatched download leaves nothing at the final path.
Archives are never extracted."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ChecksumError, DownloadError

CHUNK = 1 << 16


def download(url: str, dest: str | Path, sha256: str, *, timeout: float = 30.0, max_bytes: int = 1 << 30) -> Path:
    """Fetch `url` to `dest`, verified against `sha256`. Returns `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
            expected_len = response.headers.get("Content-Length")
            expected_len = int(expected_len) if expected_len and expected_len.isdigit() else None
            while chunk := response.read(CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise DownloadError(f"{url}: larger than the limit of {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_len is not None and received != expected_len:
            raise DownloadError(f"{url}: truncated, got {received} of {expected_len} bytes")
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(f"{url}: SHA-256 {actual} does not match the pinned {sha256}")
        os.replace(partial, dest)
        return dest
    except (urllib.error.URLError, OSError, ValueError) as e:
        # http.client.IncompleteRead is an HTTPException, caught below; OSError covers timeouts.
        raise DownloadError(f"{url}: download failed: {e}") from None
    except Exception as e:
        if isinstance(e, DownloadError):
            raise
        raise DownloadError(f"{url}: download failed: {e!r}") from None
    finally:
        partial.unlink(missing_ok=True)
