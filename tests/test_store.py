"""Prepared stores (`imagegen data prepare`, `--data store:DIR`) and EDM dataset.zip sources (issue 18):
the same images, labels, classes and captions as the source they came from; damage is a clear error;
reading stays lazy (resident memory flat); a run trained on a store is the run trained on its source."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import imagegen
from imagegen.data import DataConfig, load_data
from imagegen.data.prepare import prepare
from imagegen.data.store import open_store
from imagegen.errors import ConfigError, DataError

from conftest import run_main, tiny_config


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, side: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """Three class folders of 20 px RGB PNGs, a corrupt file and a wrongly named one."""
    root = tmp_path_factory.mktemp("folder")
    for c, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir()
        for i, arr in enumerate(_images(5, seed=c)):
            (root / name / f"{i:03d}.png").write_bytes(_png(arr))
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "eel" / "notes.txt.bak").write_text("x")
    return root


def _same(a, b) -> None:
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.classes == b.classes and a.captions == b.captions


def test_store_from_a_folder_reads_back_as_the_folder(class_folder, tmp_path):
    out = prepare(f"folder:{class_folder}", tmp_path / "s", size=16, progress=False, log=lambda *_: None)
    direct = load_data(DataConfig(source=f"folder:{class_folder}", size=16))
    stored = load_data(f"store:{out}")
    _same(stored, direct)
    assert stored.mapping is not None and len(stored) == 15 and stored.size == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["skipped"] == 2 and list(manifest["splits"]) == ["train"]
    assert {os.path.basename(f) for f, _ in manifest["splits"]["train"]["skipped_files"]} == {"broken.png", "notes.txt.bak"}
    test = load_data(DataConfig(source=f"store:{out}", split="test"))   # as the folder: its own images stand in
    _same(test, stored)
    assert "has no test split" in test.notes[0]
    with pytest.raises(ConfigError, match="holds 16 x 16 images; prepare it again with --size 32"):
        load_data(DataConfig(source=f"store:{out}", size=32))


def test_store_keeps_captions_and_both_splits(tmp_path):
    root = tmp_path / "captioned"
    root.mkdir()
    rows = []
    for i, arr in enumerate(_images(6, seed=3)):
        (root / f"{i}.png").write_bytes(_png(arr))
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}, with \"quotes\" and é"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = prepare(f"folder:{root}", tmp_path / "c", size=16, progress=False, log=lambda *_: None)
    _same(load_data(f"store:{out}"), load_data(DataConfig(source=f"folder:{root}", size=16)))
    assert load_data(f"store:{out}").captions[5] == 'picture number 5, with "quotes" and é'
    # A source with a test split gives both, each equal to the source's own.
    out = prepare("shapes", tmp_path / "shapes", progress=False, log=lambda *_: None)
    for split in ("train", "test"):
        _same(load_data(DataConfig(source=f"store:{out}", split=split)), load_data(DataConfig(source="shapes", split=split)))


def test_a_held_out_share_prepares_the_split_that_the_folder_or_zip_holds_out(class_folder, tmp_path):
    """`data prepare --held-out S`: the store's test split is the files `--data SOURCE --held-out S` holds
    out (chosen by name, so training on the store never sees them), and its train split the rest; the
    corrupt file is reported once. A source with its own test split takes no share."""
    out = prepare(f"folder:{class_folder}", tmp_path / "s", size=16, held_out=0.3, progress=False, log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train", "test"] and manifest["held_out"] == 0.3
    for split in ("train", "test"):
        stored = load_data(DataConfig(source=f"store:{out}", split=split))
        _same(stored, load_data(DataConfig(source=f"folder:{class_folder}", size=16, split=split, held_out=0.3)))
        assert not stored.notes                                   # its own test split: none stands in
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["test"]["count"] == 15
    assert 0 < manifest["splits"]["test"]["count"] < 15
    assert manifest["splits"]["train"]["skipped"] + manifest["splits"]["test"]["skipped"] == 2   # each bad file once
    images = _images(12, side=16, seed=6)
    _edm_zip(tmp_path / "dataset.zip", images, [i % 2 for i in range(12)])
    out = prepare(f"zip:{tmp_path / 'dataset.zip'}", tmp_path / "z", held_out=0.4, progress=False, log=lambda *_: None)
    for split in ("train", "test"):
        _same(load_data(DataConfig(source=f"store:{out}", split=split)),
              load_data(DataConfig(source=f"zip:{tmp_path / 'dataset.zip'}", split=split, held_out=0.4)))
    with pytest.raises(ConfigError, match="data.held_out splits a folder: or zip: source"):
        prepare("shapes", tmp_path / "x", held_out=0.1, progress=False, log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def _edm_zip(path, images: np.ndarray, labels: list | None, extra: dict | None = None) -> list[str]:
    names = [f"{i // 4:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in zip(names, images):
            zf.writestr(name, _png(arr))
        if labels is not None or extra is None:
            zf.writestr("dataset.json", json.dumps({"labels": None if labels is None else
                                                    [[n, lab] for n, lab in zip(names, labels)]}))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return names


def test_edm_zip_gives_its_images_and_labels_and_prepares(tmp_path):
    images = _images(10, side=16, seed=5)
    _edm_zip(tmp_path / "dataset.zip", images, [i % 3 for i in range(10)])
    ds = load_data(f"zip:{tmp_path / 'dataset.zip'}")
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), images)      # lossless PNG, in name order
    assert ds.labels.tolist() == [i % 3 for i in range(10)] and ds.classes == ["0", "1", "2"] and ds.size == 16
    out = prepare(f"zip:{tmp_path / 'dataset.zip'}", tmp_path / "z", progress=False, log=lambda *_: None)
    _same(load_data(f"store:{out}"), ds)
    # The same images as a folder with class subfolders give the same tensors, in that folder's order.
    for i, arr in enumerate(images):
        (tmp_path / "f" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / str(i % 3) / f"img{i:08d}.png").write_bytes(_png(arr))
    folder = load_data(DataConfig(source=f"folder:{tmp_path / 'f'}", size=16))
    order = sorted(range(10), key=lambda i: (i % 3, i))
    assert torch.equal(folder.images, ds.images[order]) and torch.equal(folder.labels, ds.labels[order])
    # Unlabelled ("labels": null) and grayscale.
    gray = images[..., 0]
    with zipfile.ZipFile(tmp_path / "gray.zip", "w") as zf:
        for i, arr in enumerate(gray):
            zf.writestr(f"{i:03d}.png", _png(arr, "L"))
        zf.writestr("dataset.json", '{"labels": null}')
    ds = load_data(f"zip:{tmp_path / 'gray.zip'}")
    assert ds.channels == 1 and not ds.labelled and np.array_equal(ds.images[:, 0].numpy(), gray)


def test_edm_zip_problems_are_reported(tmp_path):
    images = _images(4, side=8)
    names = _edm_zip(tmp_path / "a.zip", images, [0, 1, 0, 1], extra={"00000/bad.png": b"\x89PNG broken", "readme.md": b"x"})
    ds = load_data(f"zip:{tmp_path / 'a.zip'}")
    reasons = {path.rsplit(":", 1)[-1]: why for path, why in ds.skipped}
    assert len(ds) == 4 and set(reasons) == {"00000/bad.png", "readme.md"} and "no label" in reasons["00000/bad.png"]
    with pytest.raises(DataError, match="bad file"):
        load_data(DataConfig(source=f"zip:{tmp_path / 'a.zip'}", strict=True))
    with zipfile.ZipFile(tmp_path / "b.zip", "w") as zf:
        zf.writestr(names[0], _png(images[0]))
        zf.writestr("dataset.json", json.dumps({"labels": [[names[0], [0.5, 1.0]]]}))
    with pytest.raises(DataError, match=r"dataset.json: labels\[0\] is a vector"):
        load_data(f"zip:{tmp_path / 'b.zip'}")
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        zf.writestr(names[0], _png(images[0]))
        zf.writestr("dataset.json", json.dumps({"labels": [[names[0], 0], ["gone.png", 1]]}))
    ds = load_data(f"zip:{tmp_path / 'c.zip'}")
    assert len(ds) == 1 and any("'gone.png', which is not an image" in why for _, why in ds.skipped)
    for bad, message in (([[names[0], 10**12]], "class indices go up to 99999"),      # 10**12 class names
                         ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
            zf.writestr(names[0], _png(images[0]))
            zf.writestr("dataset.json", bad if isinstance(bad, str) else json.dumps({"labels": bad}))
        with pytest.raises(DataError, match=message):
            load_data(f"zip:{tmp_path / 'e.zip'}")
    (tmp_path / "d.zip").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        load_data(f"zip:{tmp_path / 'd.zip'}")


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory):
    return prepare("shapes", tmp_path_factory.mktemp("store") / "s", progress=False, log=lambda *_: None)


def _copy(store, tmp_path):
    import shutil
    return shutil.copytree(store, tmp_path / "copy")


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_damaged_store_is_a_clear_error(shapes_store, tmp_path):
    s = _copy(shapes_store, tmp_path)
    per = 3 * 32 * 32
    _flip(s / "train-images.u8", 5000 * per + 17)                 # inside image 5000: the first 64 MiB chunk
    with pytest.raises(DataError, match=r"train-images.u8: bytes 0-\d+ \(images 0-7999\) do not match their SHA-256"):
        open_store(s)
    _flip(s / "train-images.u8", 5000 * per + 17)                 # flipped back: fine again
    assert len(open_store(s)) == 8000
    _flip(s / "test-labels.i64", 8)
    with pytest.raises(DataError, match="test-labels.i64: does not match its SHA-256"):
        open_store(s, "test")
    os.truncate(s / "train-images.u8", 8000 * per - 100)
    with pytest.raises(DataError, match=r"train-images.u8: 24575900 bytes, the manifest says 24576000 \(truncated\)"):
        open_store(s)


@pytest.mark.parametrize("edit,message", [
    (lambda m: "{not json", "manifest.json: not readable JSON"),
    (lambda m: json.dumps({**m, "version": 9}), "version 9 is not 1"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "channels"}), "no 'channels' field"),
    (lambda m: json.dumps({**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "count": 7999}}}),
     "train-images.u8 should hold 24572928 bytes for 7999 images, the manifest says 24576000"),
    (lambda m: json.dumps({**m, "size": 16}), "should hold"),
])
def test_wrong_manifest_is_a_clear_error(shapes_store, tmp_path, edit, message):
    s = _copy(shapes_store, tmp_path)
    manifest = json.loads((s / "manifest.json").read_text())
    (s / "manifest.json").write_text(edit(manifest))
    with pytest.raises(DataError, match=message):
        open_store(s)


def _rss_file_kib() -> int:
    """This process's resident pages that are mapped from files (RssFile in /proc/self/status)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status (Linux 4.5+)")


@pytest.mark.parametrize("through_map", [False, True])
def test_reading_a_store_keeps_resident_memory_flat(tmp_path_factory, through_map):
    """One epoch of random batches over a 94 MiB store: read as training reads (batch_at), the store's
    pages resident in the process grow by under 8 MiB; read through the memory map instead (the
    control), most of the file becomes resident, so the test can tell the two apart."""
    store = tmp_path_factory.getbasetemp() / "big64"
    if not store.exists():
        prepare("shapes", store, size=64, progress=False, log=lambda *_: None)   # 8000 x 3 x 64 x 64 (94 MiB)
    ds = load_data(f"store:{store}")
    before = _rss_file_kib()
    for step in range(ds.steps_per_epoch(256)):
        if through_map:
            ds.images[ds._permutation(0, 0)[step * 256:(step + 1) * 256]].clone()
        else:
            ds.batch_at(step, 256, seed=0)
    grown = (_rss_file_kib() - before) / 1024
    if through_map:
        assert grown > 32, f"control: only {grown:.0f} MiB resident through the map"
    else:
        assert grown < 8, f"{grown:.0f} MiB of the store became resident"
    assert torch.equal(ds.batch(torch.tensor([7, 3]))["image"],
                       ds.images[[7, 3]].float() / 127.5 - 1)   # the same pixels either way


def test_training_on_a_store_is_training_on_its_source(shapes_store, tmp_path):
    """The same batches, so the same weights, bit for bit."""
    runs = [imagegen.train(tiny_config(6, data={"source": src}), out=tmp_path / name, progress=False)
            for name, src in (("mem", "shapes"), ("store", f"store:{shapes_store}"))]
    a, b = (load_file(r / "ema.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_command(class_folder, tmp_path):
    r = run_main("data", "prepare", f"folder:{class_folder}", "--out", str(tmp_path / "s"), "--size", "16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout and "15 images (train 15) of 3 x 16 x 16" in r.stdout and "images/s" in r.stdout
    assert "2 bad file(s) skipped" in r.stdout and "broken.png" in r.stdout
    r = run_main("data", "prepare", f"folder:{class_folder}", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "exists" in r.stderr
    r = run_main("data", "prepare", f"folder:{class_folder}", "--out", str(tmp_path / "t"), "--strict")
    assert r.returncode == 2 and "under --strict" in r.stderr and not (tmp_path / "t").exists()
    assert not (tmp_path / "t.partial").exists()
    r = run_main("data", "info", f"store:{tmp_path / 's'}")
    assert r.returncode == 0 and "memory-mapped" in r.stdout and "cat" in r.stdout
    r = run_main("data", "prepare", f"folder:{class_folder}", "--out", str(tmp_path / "h"), "--held-out", "0.3",
                 "--no-progress")
    assert r.returncode == 0 and "(train " in r.stdout and ", test " in r.stdout, r.stdout + r.stderr
    r = run_main("data", "prepare", "shapes", "--out", str(tmp_path / "x"), "--held-out", "0.3")
    assert r.returncode == 2 and "data.held_out splits a folder" in r.stderr
