"""Checksummed downloads against a local http.server on 127.0.0.1: a wrong hash or a truncated body
leaves no file at the final path."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest
import torch

from imagegen.data.download import download
from imagegen.errors import ChecksumError, DownloadError

BODY = bytes(range(256)) * 400
FILES: dict[str, bytes] = {}   # more paths the server answers: path -> body (set by the tests)


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
        elif self.path in FILES:
            body = FILES[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
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
    with pytest.raises(DownloadError, match=r"truncated, got \d+ of 102400 bytes"):   # said as such, not as a bad hash
        download(f"{server}/truncated.gz", dest, hashlib.sha256(BODY).hexdigest(), timeout=5)
    assert _leftovers(tmp_path) == []


def test_missing_file_and_unreachable_host(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server}/nope.gz", tmp_path / "nope.gz", "0" * 64)
    assert _leftovers(tmp_path) == []


@pytest.fixture
def mirrors(server, tmp_path, monkeypatch):
    """fashion-mnist made downloadable from the local server only: /good/ serves a valid MNIST-style
    train split (20 images) whose SHA-256 the spec pins, /bad/ the same names with other bytes."""
    from conftest import write_idx_set
    from imagegen.data import locate, registry
    files = write_idx_set(tmp_path / "served", n=20)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    for name in names:
        FILES[f"/good/{name}"] = (files / name).read_bytes()
        FILES[f"/bad/{name}"] = bytes(len(FILES[f"/good/{name}"]))        # right length, wrong bytes
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache" / "imagegen"))
    monkeypatch.setattr(locate, "search_dirs", lambda name: [tmp_path / "empty" / name, tmp_path / "cache" / "imagegen" / name])
    sha = {name: hashlib.sha256(FILES[f"/good/{name}"]).hexdigest() for name in names}

    def use(*paths):
        spec = registry.IDXDataset("fashion-mnist", registry.IDX_DATASETS["fashion-mnist"].classes,
                                   tuple(f"{server}{p}" for p in paths), sha)
        monkeypatch.setitem(registry.IDX_DATASETS, "fashion-mnist", spec)
        return tmp_path / "cache" / "imagegen" / "fashion-mnist"
    yield use
    FILES.clear()


def test_named_dataset_downloads_from_its_mirror_when_not_installed(mirrors):
    """With nothing installed, fashion-mnist is fetched into the cache, verified, and loads; the second
    load finds it there. A first mirror serving wrong bytes is passed over for the next one."""
    from imagegen.data import registry
    cache = mirrors("/bad/", "/good/")
    ds = registry.load_data("fashion-mnist")
    assert len(ds) == 20 and ds.images.shape == (20, 1, 28, 28) and ds.labels.tolist()[:3] == [0, 1, 2]
    assert _leftovers(cache) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    FILES.clear()                                                     # the server forgets them: the cache serves
    assert torch.equal(registry.load_data("fashion-mnist").images, ds.images)


def test_a_mirror_serving_wrong_bytes_is_a_data_error_and_leaves_nothing(mirrors):
    from imagegen.data import registry
    from imagegen.errors import DataError
    cache = mirrors("/bad/")
    with pytest.raises(DataError, match="does not match the pinned"):
        registry.load_data("fashion-mnist")
    assert not cache.exists() or _leftovers(cache) == []
    cache = mirrors("/missing/")
    with pytest.raises(DataError, match="404"):
        registry.load_data("fashion-mnist")
