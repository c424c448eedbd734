"""Checksummed downloads against a local http.server on 127.0.0.1: a wrong hash or a truncated body
leaves no file at the final path."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from imagegen.data.download import download
from imagegen.errors import ChecksumError, DownloadError

BODY = bytes(range(256)) * 400


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/good.gz":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/truncated.gz":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[: len(BODY) // 3])  # then close early
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_good_download_is_verified_and_renamed(server, tmp_path):
    dest = tmp_path / "good.gz"
    download(f"{server}/good.gz", dest, hashlib.sha256(BODY).hexdigest())
    assert dest.read_bytes() == BODY
    assert _leftovers(tmp_path) == ["good.gz"]


def test_wrong_hash_leaves_nothing(server, tmp_path):
    dest = tmp_path / "good.gz"
    with pytest.raises(ChecksumError, match="does not match"):
        download(f"{server}/good.gz", dest, "0" * 64)
    assert _leftovers(tmp_path) == []


def test_truncated_body_leaves_nothing(server, tmp_path):
    dest = tmp_path / "truncated.gz"
    with pytest.raises(DownloadError):
        download(f"{server}/truncated.gz", dest, hashlib.sha256(BODY).hexdigest(), timeout=5)
    assert _leftovers(tmp_path) == []


def test_missing_file_and_unreachable_host(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server}/nope.gz", tmp_path / "nope.gz", "0" * 64)
    assert _leftovers(tmp_path) == []


def test_named_dataset_downloads_when_not_installed(server, tmp_path, monkeypatch):
    """With nothing installed, fashion-mnist is fetched from its mirror into the cache and verified;
    a mirror serving the wrong bytes gives a DataError and leaves no file behind."""
    from imagegen.data import registry
    from imagegen.errors import DataError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(registry, "search_dirs", lambda name: [tmp_path / "empty" / name])
    spec = registry.IDXDataset("fashion-mnist", registry.IDX_DATASETS["fashion-mnist"].classes,
                               (f"{server}/",), registry.IDX_DATASETS["fashion-mnist"].sha256)
    monkeypatch.setitem(registry.IDX_DATASETS, "fashion-mnist", spec)
    with pytest.raises(DataError, match="download failed"):
        registry.load_data("fashion-mnist")
    cache = tmp_path / "cache" / "imagegen" / "fashion-mnist"
    assert not cache.exists() or _leftovers(cache) == []
