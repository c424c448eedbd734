"""The IDX parser refuses every kind of malformed file with an IDXError that names the file."""

from __future__ import annotations

import gzip

import pytest

from imagegen.data import load_data
from imagegen.data.idx import read_idx
from imagegen.errors import IDXError

from conftest import idx_bytes, write_idx_set

N = 20
GOOD_IMAGES = idx_bytes(0x08, (N, 28, 28), bytes(N * 784))
GOOD_LABELS = idx_bytes(0x08, (N,), bytes(i % 10 for i in range(N)))


def test_valid_files_load_raw_and_gz(tmp_path, monkeypatch):
    for gz in (False, True):
        write_idx_set(tmp_path / f"g{gz}" / "fashion-mnist", N, gz=gz)
        monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path / f"g{gz}"))
        ds = load_data("fashion-mnist")
        assert ds.images.shape == (N, 1, 28, 28) and ds.images.dtype.is_floating_point is False
        assert ds.labels.tolist() == [i % 10 for i in range(N)]
        assert ds.classes[9] == "Ankle boot"
        assert str(tmp_path) in ds.source


# Each case: (name, images file bytes, labels file bytes, expected words in the message).
CASES = [
    ("bad magic", b"\x01\x00" + GOOD_IMAGES[2:], GOOD_LABELS, "magic"),
    ("bad dtype", GOOD_IMAGES[:2] + b"\x0a" + GOOD_IMAGES[3:], GOOD_LABELS, "dtype"),
    ("wrong ndim", idx_bytes(0x08, (N, 784), bytes(N * 784)), GOOD_LABELS, "dimensions"),
    ("zero dimension", idx_bytes(0x08, (N, 0, 28), b""), GOOD_LABELS, "zero dimension"),
    ("short by one byte", GOOD_IMAGES[:-1], GOOD_LABELS, "ends early"),
    ("one byte extra", GOOD_IMAGES + b"\x00", GOOD_LABELS, "after the"),
    ("label out of range", GOOD_IMAGES, idx_bytes(0x08, (N,), bytes([3] * (N - 1) + [10])), "out of range"),
    ("count mismatch", GOOD_IMAGES, idx_bytes(0x08, (N - 1,), bytes(N - 1)), "labels for"),
    ("oversized dimensions", idx_bytes(0x08, (60000, 100000, 100000), bytes(16)), GOOD_LABELS, "over the limit"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name,images,labels,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_idx_raises_typed_error(tmp_path, monkeypatch, name, images, labels, words, gz):
    folder = write_idx_set(tmp_path / "fashion-mnist", N, gz=gz, images=images, labels=labels)
    monkeypatch.setenv("IMAGEGEN_DATA", str(tmp_path))
    with pytest.raises(IDXError) as err:
        load_data("fashion-mnist")
    msg = str(err.value)
    assert words in msg
    assert str(folder) in msg  # the message names the file


def test_garbage_gzip(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00" + b"not really deflate data" * 10)
    with pytest.raises(IDXError, match="train-images-idx3-ubyte.gz"):
        read_idx(p, ndim=3)
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(IDXError, match="cannot read"):
        read_idx(p, ndim=3)


def test_truncated_gzip_stream(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(GOOD_IMAGES)[:-30])
    with pytest.raises(IDXError, match=str(p.name)):
        read_idx(p, ndim=3)


def test_empty_file(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"")
    with pytest.raises(IDXError, match="empty"):
        read_idx(p, ndim=3)


def test_directory_instead_of_file(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.mkdir()
    with pytest.raises(IDXError, match="directory"):
        read_idx(p, ndim=3)


def test_idx_dir_source_reads_any_mnist_named_folder(tmp_path):
    write_idx_set(tmp_path / "mine", N, gz=False)
    ds = load_data(f"idx:{tmp_path / 'mine'}")
    assert len(ds) == N and ds.classes == [str(i) for i in range(10)]
