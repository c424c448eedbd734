"""Folders of images: every good file loads, every bad one is reported with a reason, nothing crashes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from imagegen.cli import main
from imagegen.data import DataConfig, load_data
from imagegen.errors import DataError


def _png_bytes(rng, size=(20, 24), mode="RGB", fmt="PNG") -> bytes:
    arr = rng.integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if mode == "L" else arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """100 files in two class folders: 90 good (PNG, JPEG, WebP), 10 bad of every kind."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
    fmts = [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")]
    for i in range(90):
        fmt, ext = fmts[i % 3]
        (root / ("cats", "dogs")[i % 2] / f"good{i:03d}{ext}").write_bytes(_png_bytes(rng, fmt=fmt))
    good_png = _png_bytes(rng)
    bad = {
        "cats/corrupt1.png": b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        "cats/corrupt2.jpg": bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
        "cats/truncated1.png": good_png[: len(good_png) // 2],
        "dogs/truncated2.jpg": _png_bytes(rng, size=(64, 64), fmt="JPEG")[:400],
        "cats/empty1.png": b"",
        "dogs/empty2.webp": b"",
        "dogs/png_named_jpg.jpg": good_png,
        "dogs/text_named_png.png": b"just some text, not an image\n",
        "dogs/notes.txt": b"a stray file with a wrong extension\n",
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    bomb = io.BytesIO()
    Image.new("L", (7000, 7000)).save(bomb, format="PNG")  # 49 Mpx, a few KiB compressed
    (root / "cats" / "bomb.png").write_bytes(bomb.getvalue())
    return root


def test_folder_loads_exactly_the_good_files(messy_folder):
    ds = load_data(DataConfig(source=f"folder:{messy_folder}", size=16))
    assert len(ds) == 90
    assert len(ds.skipped) == 10
    reasons = dict((os.path.basename(f), r) for f, r in ds.skipped)
    assert set(reasons) == {"corrupt1.png", "corrupt2.jpg", "truncated1.png", "truncated2.jpg", "empty1.png",
                            "empty2.webp", "png_named_jpg.jpg", "text_named_png.png", "notes.txt", "bomb.png"}
    assert "empty" in reasons["empty1.png"]
    assert "pixels" in reasons["bomb.png"]
    assert "extension" in reasons["notes.txt"] and "extension" in reasons["png_named_jpg.jpg"]
    assert ds.classes == ["cats", "dogs"]
    assert ds.class_counts() == [45, 45]
    assert ds.images.shape == (90, 3, 16, 16)


def test_strict_turns_bad_files_into_an_error(messy_folder):
    with pytest.raises(DataError, match="10 bad file"):
        load_data(DataConfig(source=f"folder:{messy_folder}", size=16, strict=True))


def test_cli_strict_exits_nonzero_and_reports(messy_folder, capsys):
    assert main(["data", "info", f"folder:{messy_folder}"]) == 0
    out = capsys.readouterr().out
    assert "90 x 3 x 64 x 64" in out and "skipped:  10 bad file(s)" in out
    assert main(["data", "info", f"folder:{messy_folder}", "--strict"]) == 2
    assert "under --strict" in capsys.readouterr().err


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png_bytes(rng))
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(_png_bytes(rng))
    (root / "inside_link.png").symlink_to(root / "ok.png")
    (root / "escape.png").symlink_to(outside)
    ds = load_data(DataConfig(source=f"folder:{root}", size=8))
    assert len(ds) == 2
    assert [(os.path.basename(f), "escapes" in r) for f, r in ds.skipped] == [("escape.png", True)]


def test_grayscale_folder_is_loaded_as_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(3):
        (tmp_path / f"g{i}.png").write_bytes(_png_bytes(rng, mode="L"))
    ds = load_data(DataConfig(source=f"folder:{tmp_path}", size=12))
    assert ds.images.shape == (3, 1, 12, 12) and not ds.labelled


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no readable images"):
        load_data(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="not a folder"):
        load_data(f"folder:{tmp_path / 'nope'}")


# --- captions (text-to-image): imagefolder metadata and sidecar files -----------------------------------

def _captioned_folder(root, rng):
    root.mkdir()
    for i in range(6):
        (root / f"img{i}.png").write_bytes(_png_bytes(rng))
    return root


def test_captions_come_from_jsonl_metadata_or_sidecars_and_an_image_without_one_is_reported(tmp_path):
    root = _captioned_folder(tmp_path / "f", np.random.default_rng(1))
    (root / "metadata.jsonl").write_text(
        '{"file_name": "img0.png", "text": "a red  circle"}\n'
        '{"file_name": "img5.png", "caption": "a  caption  key"}\n'
        '{"file_name": "missing.png", "text": "no such file"}\n'
        'not json\n'
        '{"file_name": "img1.png", "text": ""}\n')
    (root / "img2.txt").write_text("two blue squares\n")
    (root / "img3.caption").write_text("a star")
    (root / "img0.txt").write_text("the metadata wins")
    (root / "notes.txt").write_text("no image of this name: still a wrong-extension file")
    ds = load_data(DataConfig(source=f"folder:{root}", size=16))
    assert ds.captioned and len(ds) == 4
    assert sorted(ds.captions) == ["a caption key", "a red circle", "a star", "two blue squares"]   # spaces collapsed
    reasons = {os.path.basename(f.split(":")[0]) + (":" + f.split(":")[1] if f.count(":") else ""): r
               for f, r in ds.skipped}
    assert "no such image" in reasons["metadata.jsonl:3"] and "not JSON" in reasons["metadata.jsonl:4"]
    assert "empty" in reasons["metadata.jsonl:5"]
    assert all("no caption" in reasons[f"img{i}.png"] for i in (1, 4))
    assert "extension" in reasons["notes.txt"]
    with pytest.raises(DataError, match="bad file"):
        load_data(DataConfig(source=f"folder:{root}", size=16, strict=True))


def test_captions_from_csv_metadata_and_a_folder_without_captions_is_not_captioned(tmp_path):
    rng = np.random.default_rng(2)
    root = _captioned_folder(tmp_path / "c", rng)
    rows = ["file_name,text"] + [f'img{i}.png,"a shape, number {i}"' for i in range(6)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    ds = load_data(DataConfig(source=f"folder:{root}", size=16))
    assert len(ds) == 6 and not ds.skipped and "a shape, number 3" in ds.captions
    plain = _captioned_folder(tmp_path / "p", rng)
    assert not load_data(DataConfig(source=f"folder:{plain}", size=16)).captioned


def test_hostile_metadata_is_reported_line_by_line_not_a_traceback(tmp_path):
    """A metadata.jsonl line nested 100,000 deep, and a CSV field over csv's 128 KiB limit: each reported
    as a problem of its file, the other captions kept."""
    rng = np.random.default_rng(3)
    root = _captioned_folder(tmp_path / "j", rng)
    (root / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "a circle"}\n'
                                         + '{"file_name": "img1.png", "text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    ds = load_data(DataConfig(source=f"folder:{root}", size=16))
    assert "a circle" in ds.captions
    assert any(where.endswith("metadata.jsonl:2") and "nested too deeply" in why for where, why in ds.skipped)
    root = _captioned_folder(tmp_path / "c", rng)
    (root / "metadata.csv").write_text("file_name,text\nimg0.png,a square\nimg1.png," + "x" * 200_000 + "\n")
    ds = load_data(DataConfig(source=f"folder:{root}", size=16))
    assert "a square" in ds.captions
    assert any("unreadable CSV at line 3" in why for _, why in ds.skipped)


def test_data_held_out_sets_a_share_of_a_folder_apart_by_file_name(tmp_path):
    """data.held_out: the test split is that share of the files, the train split the rest, each image with
    its own label and caption; a file stays on its side when images are added or the folder moves. A zip
    splits the same way; other sources, an empty side and a share out of range are refused."""
    from imagegen.errors import ConfigError
    from test_store import _edm_zip

    def write(root, first, n):
        for i in range(first, first + n):   # image i: its top-left red value is i, its caption says i
            arr = np.zeros((8, 8, 3), np.uint8)
            arr[0, 0, 0] = i
            Image.fromarray(arr).save(root / ("a", "b")[i % 2] / f"{i:03d}.png")
        with open(root / "metadata.jsonl", "a") as f:
            f.writelines(f'{{"file_name": "{("a", "b")[i % 2]}/{i:03d}.png", "text": "image {i}"}}\n'
                         for i in range(first, first + n))

    def load(root, split, share=0.2):
        return load_data(DataConfig(source=f"folder:{root}", split=split, size=8, held_out=share))

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    write(root, 0, 120)
    train, test = load(root, "train"), load(root, "test")
    assert 10 < len(test) < 40 and len(train) + len(test) == 120 and train.classes == test.classes == ["a", "b"]
    for ds in (train, test):
        index = ds.images[:, 0, 0, 0].tolist()
        assert ds.captions == [f"image {i}" for i in index] and ds.labels.tolist() == [i % 2 for i in index]
    assert not set(train.captions) & set(test.captions)
    assert len(load(root, "test", 0)) == len(load(root, "train", 0)) == 120      # no share: no split
    write(root, 120, 60)                                                         # more images: none moves
    before = set(load(root, "test").captions)
    assert set(test.captions) < before
    moved = root.rename(tmp_path / "elsewhere")
    assert set(load(moved, "test").captions) == before                            # nor when the folder moves
    assert before < set(load(moved, "test", 0.3).captions)                        # a larger share: a superset

    images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(40)])
    _edm_zip(tmp_path / "dataset.zip", images, None)
    zipped = [load_data(DataConfig(source=f"zip:{tmp_path / 'dataset.zip'}", split=s, held_out=0.25))
              for s in ("train", "test")]
    seen = [set(ds.images[:, 0, 0, 0].tolist()) for ds in zipped]
    assert seen[0] | seen[1] == set(range(40)) and not seen[0] & seen[1] and seen[1]

    (tmp_path / "two").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "two" / f"{i}.png")
    with pytest.raises(DataError, match=r"held_out = 0.01 leaves none of its 2 images in the test split"):
        load(tmp_path / "two", "test", 0.01)
    with pytest.raises(ConfigError, match="data.held_out splits a folder: or zip: source.*'shapes' is neither"):
        load_data(DataConfig(source="shapes", held_out=0.1))
    with pytest.raises(ConfigError, match=r"data.held_out must be 0 .* or \(0, 0.5\], got 0.6"):
        load(moved, "train", 0.6)
