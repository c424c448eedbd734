"""`--data emoji`: Debian's gemojione layout, read from a synthetic copy (config/index.json + assets/png)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagegen.data import DataConfig, load_data
from imagegen.data import emoji
from imagegen.errors import DataError


def _gem(tmp_path, n=40):
    """A gem folder with n good entries (RGBA PNGs: an opaque coloured disc on a transparent ground), one
    entry whose file is missing, one corrupt PNG and two malformed entries."""
    root = tmp_path / "gemojione-9.9.9"
    (root / "config").mkdir(parents=True)
    (root / "assets" / "png").mkdir(parents=True)
    index = {}
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2
    for i in range(n):
        code = f"1F{i:03X}"
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[disc] = (200, 10 * i % 256, 40, 255)
        Image.fromarray(rgba, "RGBA").save(root / "assets" / "png" / f"{code}.png")
        index[f"e{i:02d}"] = {"unicode": code.lower(), "name": f"Thing {i}", "category": ("food", "nature")[i % 2],
                              "keywords": ["thing", "round-shape", f"kw{i}"]}
    index["gone"] = {"unicode": "1F999", "name": "gone", "category": "food", "keywords": []}
    (root / "assets" / "png" / "1F998.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    index["broken"] = {"unicode": "1F998", "name": "broken", "category": "food", "keywords": []}
    index["odd"] = ["not", "an", "object"]
    index["nocode"] = {"unicode": "../../etc/passwd", "name": "x", "category": "food"}
    (root / "config" / "index.json").write_text(json.dumps(index))
    return root


def test_the_emoji_reader_reads_the_package_layout(tmp_path):
    root = _gem(tmp_path)
    train = load_data(DataConfig(source=f"emoji:{root}"))
    test = load_data(DataConfig(source=f"emoji:{root}", split="test"))
    assert train.classes == test.classes == ["food", "nature"]
    assert train.images.shape[1:] == (3, 64, 64) and train.captioned and train.labelled
    keys = {f"e{i:02d}" for i in range(40)}
    held = {k for k in keys if emoji.in_test_split(k)}
    assert len(test) == len(held) and 0 < len(held) < 40 and len(train) + len(test) == 40
    # transparency composited on white; the disc keeps its colour
    assert train.images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert train.images[0, 0, 32, 32] == 200
    # name, then keywords the name does not say
    first = next(i for i in range(40) if f"e{i:02d}" not in held)
    assert train.captions[0] == f"thing {first}, round shape, kw{first}"
    assert train.labels[0] == first % 2
    reasons = dict(train.skipped)
    assert any("no such file" in r for r in reasons.values())
    assert any("broken" in f or "1F998" in f for f in reasons)
    assert any("'odd'" in f for f in reasons) and any("'nocode'" in f for f in reasons)
    with pytest.raises(DataError, match="bad file"):
        load_data(DataConfig(source=f"emoji:{root}", strict=True))


def test_the_split_depends_on_the_shortname_alone(tmp_path):
    root = _gem(tmp_path)
    a = load_data(DataConfig(source=f"emoji:{root}", split="test"))
    index = json.loads((root / "config" / "index.json").read_text())
    (root / "config" / "index.json").write_text(json.dumps(dict(reversed(list(index.items())))))
    b = load_data(DataConfig(source=f"emoji:{root}", split="test"))
    assert a.captions == b.captions and bool((a.images == b.images).all())


def test_a_missing_package_or_a_bad_index_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "SYSTEM_GLOB", str(tmp_path / "nothing-*"))
    with pytest.raises(DataError, match="ruby-gemojione"):
        load_data(DataConfig(source="emoji"))
    with pytest.raises(DataError, match="no config/index.json"):
        load_data(DataConfig(source=f"emoji:{tmp_path}"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "index.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected an object"):
        load_data(DataConfig(source=f"emoji:{tmp_path}"))
    (tmp_path / "config" / "index.json").write_text("{" * 100_000)
    with pytest.raises(DataError, match="not a JSON index"):
        load_data(DataConfig(source=f"emoji:{tmp_path}"))
