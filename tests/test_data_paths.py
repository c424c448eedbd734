"""Data paths users hit that the loaders must get right: EXIF orientation, channel conversion, a batch
larger than the dataset, and a time budget that ends a run cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.data import DataConfig, load_data
from imagegen.data.folder import decode_image
from imagegen.errors import ConfigError

from conftest import tiny_config, write_idx_set


def _halves(h: int = 16, w: int = 16) -> np.ndarray:
    """An RGB image whose left half is black and right half white: any rotation moves the halves."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, w // 2:] = 255
    return arr


def test_exif_orientation_is_applied(tmp_path):
    raw = _halves()
    exif = Image.Exif()
    exif[0x0112] = 6                                   # Orientation 6: display rotated 90 degrees clockwise
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(raw).save(folder / "rotated.png", exif=exif)
    Image.fromarray(raw).save(folder / "plain.png")
    upright = np.rot90(raw, k=-1)                      # clockwise: the white half ends at the bottom
    assert np.array_equal(decode_image(folder / "rotated.png", "rotated.png", None, 3), upright)
    assert np.array_equal(decode_image(folder / "plain.png", "plain.png", None, 3), raw)
    ds = load_data(DataConfig(source=f"folder:{folder}", size=16))
    images = ds.images.permute(0, 2, 3, 1).numpy()     # N x H x W x C, in the folder's sorted order
    assert np.array_equal(images[1], upright) and np.array_equal(images[0], raw)


def test_data_channels_converts_colour_to_luma_and_gray_to_rgb(tmp_path):
    folder = tmp_path / "colour"
    folder.mkdir()
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(folder / "red.png")
    gray = load_data(DataConfig(source=f"folder:{folder}", size=8, channels=1))
    assert gray.channels == 1 and gray.images.shape == (1, 1, 8, 8)
    # ITU-R 601 luma (0.299 R + ...), what PIL's "L" gives: 60, not the channel mean 67.
    assert int(gray.images[0, 0, 0, 0]) == int(np.asarray(Image.fromarray(red).convert("L"))[0, 0]) == 60
    # A grayscale IDX source asked for 3 channels: three equal channels.
    write_idx_set(tmp_path / "idx", n=20)
    one, three = load_data(f"idx:{tmp_path / 'idx'}"), load_data(DataConfig(source=f"idx:{tmp_path / 'idx'}", channels=3))
    assert three.images.shape == (20, 3, 28, 28)
    assert all(torch.equal(three.images[:, c], one.images[:, 0]) for c in range(3))
    # The built-in RGB shapes asked for 1 channel: luma of each pixel, within PIL's integer rounding.
    rgb, lum = load_data(DataConfig(source="shapes", limit=8)), load_data(DataConfig(source="shapes", limit=8, channels=1))
    expected = (rgb.images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert lum.images.shape == (8, 1, 32, 32) and (lum.images[:, 0].float() - expected).abs().max() <= 0.5
    assert not torch.equal(lum.images[:, 0], rgb.images.float().mean(1).round().to(torch.uint8))
    with pytest.raises(ConfigError, match="data.channels must be 0, 1 or 3, got 2"):
        imagegen.resolve_config({"family": "dcgan", "data": {"channels": 2}})


def test_a_batch_larger_than_the_dataset_draws_with_replacement_and_trains(tmp_path):
    ds = load_data(DataConfig(source="shapes", limit=8))
    b = ds.batch_at(0, 20, seed=3)
    assert b["image"].shape[0] == 20
    assert torch.equal(b["image"], ds.batch_at(0, 20, seed=3)["image"])                # reproducible
    assert not torch.equal(b["image"], ds.batch_at(1, 20, seed=3)["image"])            # a new draw per step
    rows = {bytes(x.numpy().tobytes()) for x in ((b["image"] + 1) * 127.5).round().to(torch.uint8)}
    originals = {bytes(x.numpy().tobytes()) for x in ds.images}
    assert rows <= originals and len(rows) > 1                                          # drawn from the 8
    run = imagegen.train(tiny_config(steps=3, data={"limit": 8}, train={"batch_size": 20}), out=tmp_path, progress=False)
    assert imagegen.load_run(run).step == 3


def test_time_limit_ends_the_run_saved_and_resumable(tmp_path):
    cfg = tiny_config(steps=1_000_000, train={"time_limit": 1.0, "checkpoint_every": 1_000_000, "log_every": 1_000_000})
    run = imagegen.train(cfg, out=tmp_path, progress=False)
    step = imagegen.load_run(run).step
    assert 0 < step < 1_000_000
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == step                                   # the last step is logged...
    assert (run / "checkpoints" / f"step-{step:07d}").is_dir()      # ...and checkpointed
    assert (run / "samples" / f"step-{step:07d}.png").is_file()


def test_a_limit_gives_the_first_images_of_the_whole_split():
    """data.limit renders only the chunks it needs (shapes.make_shapes(first=...)): the same images."""
    whole = load_data(DataConfig(source="shapes", split="test"))
    for limit in (1, 256, 1000, 1500):
        part = load_data(DataConfig(source="shapes", split="test", limit=limit))
        assert torch.equal(part.images, whole.images[:limit]) and torch.equal(part.labels, whole.labels[:limit])


def test_the_decoder_raises_typed_errors_naming_the_file(tmp_path):
    from imagegen.errors import ImageFileError, ImageTooLargeError
    Image.new("L", (2000, 1000)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match=r"big.png: 2000x1000 is over the limit of 1000000 pixels"):
        decode_image(tmp_path / "big.png", "big.png", None, 1, max_pixels=1_000_000)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg", format="PNG")
    with pytest.raises(ImageFileError, match="photo.jpg: holds a PNG image, which does not match its extension"):
        decode_image(tmp_path / "photo.jpg", "photo.jpg", None, 3, suffix=".jpg")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageFileError, match="junk.png: cannot decode image"):
        decode_image(tmp_path / "junk.png", "junk.png", None, 3)
    assert decode_image(tmp_path / "photo.jpg", "photo.jpg", 4, 1).shape == (4, 4, 1)   # no suffix given: decoded
