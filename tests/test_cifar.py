"""CIFAR-10 and CIFAR-100 from their binary archives (issue 18), end to end on synthetic archives of the
same layout served by a local http.server: downloaded, pinned, streamed, parsed and trained on; a wrong
hash, a truncated member, a broken stream, an extra member and a `../` member are each a clear error."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

import imagegen
from imagegen.data import cifar, locate, registry
from imagegen.errors import DataError

from conftest import tiny_config
import test_download

server = test_download.server   # the local http.server fixture, and the paths it serves
FILES = test_download.FILES

PER_FILE = 7   # records per batch file


def _members(spec: cifar.CifarSpec, classes: int) -> dict[str, bytes]:
    """name -> bytes of a synthetic archive with the spec's layout: record i of file f has fine label
    (i + f) mod classes, coarse label 19 - that (CIFAR-100), and pixels from a fixed generator."""
    rng = np.random.default_rng(0)
    out = {}
    for f, name in enumerate(spec.train + spec.test):
        fine = (np.arange(PER_FILE) + f) % classes
        labels = [fine] if spec.label_bytes == 1 else [19 - fine % 20, fine]
        pixels = rng.integers(0, 256, (PER_FILE, cifar.PIXELS), dtype=np.uint8)
        out[name] = np.concatenate([np.stack(labels, 1).astype(np.uint8), pixels], 1).tobytes()
    out[spec.names] = "".join(f"class_{i}\n" for i in range(classes)).encode() + b"\n"
    for extra in spec.extra:
        out[extra] = b"<html>about</html>" if extra.endswith(".html") else b"coarse\n"
    return out


def _archive(spec: cifar.CifarSpec, members: dict[str, bytes], *, raw_names: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo(spec.prefix)
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in list(members.items()) + list((raw_names or {}).items()):
            info = tarfile.TarInfo(name if name in (raw_names or {}) else f"{spec.prefix}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def serve_cifar(server, tmp_path, monkeypatch):
    """use(name, archive bytes, pinned sha or None = the bytes' own) -> the cache folder: the dataset's
    URL points at the local server, nothing is installed, the cache is private."""
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache" / "imagegen"))
    monkeypatch.setattr(locate, "search_dirs", lambda name: [tmp_path / "empty" / name,
                                                               tmp_path / "cache" / "imagegen" / name])

    def use(name: str, body: bytes, sha: str | None = None):
        spec = cifar.CIFAR_DATASETS[name]
        FILES[f"/{spec.archive}"] = body
        monkeypatch.setitem(cifar.CIFAR_DATASETS, name, cifar.CifarSpec(
            **{**spec.__dict__, "url": f"{server}/{spec.archive}", "sha256": sha or hashlib.sha256(body).hexdigest()}))
        return tmp_path / "cache" / "imagegen" / name
    yield use
    FILES.clear()


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_downloaded_archive_gives_the_records(serve_cifar, name, classes):
    spec = cifar.CIFAR_DATASETS[name]
    members = _members(spec, classes)
    cache = serve_cifar(name, _archive(spec, members))
    train = registry.load_data(name)
    test = registry.load_data(registry.DataConfig(source=name, split="test"))
    assert len(train) == PER_FILE * len(spec.train) and len(test) == PER_FILE
    assert train.images.shape[1:] == (3, 32, 32) and train.classes == [f"class_{i}" for i in range(classes)]
    # Record by record: the fine label, and pixel (c, y, x) = byte label_bytes + 1024 c + 32 y + x.
    records = np.frombuffer(b"".join(members[m] for m in spec.train), np.uint8).reshape(-1, spec.record)
    assert train.labels.tolist() == records[:, spec.label_bytes - 1].tolist()
    want = records[:, spec.label_bytes:].reshape(-1, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), want)
    assert train.images[3, 2, 5, 7] == records[3, spec.label_bytes + 2 * 1024 + 5 * 32 + 7]
    assert [p.name for p in cache.iterdir()] == [spec.archive]        # the archive only: nothing extracted
    FILES.clear()                                                     # the server forgets it: the cache serves
    assert torch.equal(registry.load_data(name).images, train.images)


def test_cifar_trains_end_to_end(serve_cifar, tmp_path):
    spec = cifar.CIFAR_DATASETS["cifar10"]
    serve_cifar("cifar10", _archive(spec, _members(spec, 10)))
    cfg = tiny_config(4, data={"source": "cifar10"}, model={"width": 8, "z_dim": 16})
    run = imagegen.load_run(imagegen.train(cfg, out=tmp_path / "runs", progress=False))
    assert run.classes == [f"class_{i}" for i in range(10)] and run.model.cfg.channels == 3
    assert run.model.sample(2).shape == (2, 3, 32, 32)


def _broken(kind: str) -> tuple[bytes, str | None, str]:
    """(archive, pinned sha or None, the error it must give) for each kind of damage."""
    spec = cifar.CIFAR_DATASETS["cifar10"]
    members = _members(spec, 10)
    if kind == "wrong hash":
        return _archive(spec, members), "0" * 64, "does not match the pinned"
    if kind == "truncated member":
        members["data_batch_2.bin"] = members["data_batch_2.bin"][:-5]
        return _archive(spec, members), None, r"data_batch_2.bin'.*not a whole number of 3073-byte records"
    if kind == "broken stream":
        whole = gzip.decompress(_archive(spec, members))
        return gzip.compress(whole[: len(whole) // 2]), None, "cannot read the archive|ends early"
    if kind == "extra member":
        members["run_me.sh"] = b"#!/bin/sh\n"
        return _archive(spec, members), None, r"run_me.sh'.*not part of the cifar10 layout"
    if kind == "dot-dot member":
        return (_archive(spec, members, raw_names={"cifar-10-batches-bin/../../etc/evil": b"x"}), None,
                r"unsafe name .*'\.\.'")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["wrong hash", "truncated member", "broken stream", "extra member", "dot-dot member"])
def test_damaged_archives_are_refused_by_name(serve_cifar, tmp_path, kind):
    body, sha, message = _broken(kind)
    cache = serve_cifar("cifar10", body, sha)
    with pytest.raises(DataError, match=message):
        registry.load_data("cifar10")
    if kind == "wrong hash":   # nothing is left at the final path
        assert not cache.exists() or list(cache.iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_a_local_archive_must_match_its_pin(tmp_path, monkeypatch):
    spec = cifar.CIFAR_DATASETS["cifar10"]
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / spec.archive).write_bytes(_archive(spec, _members(spec, 10)))
    monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: SHA-256 .* does not match the pinned c4a38c50"):
        registry.load_data("cifar10")
