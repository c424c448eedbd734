"""`--data emoji`: Debian's gemojione layout, read from a synthetic copy (config/index.json + assets/png)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
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


def test_a_prepared_store_keeps_the_held_out_split(tmp_path):
    """`data prepare emoji` writes both splits, so a run on the store is measured on the held-out icons,
    not on its own training images; an index problem is reported once."""
    from imagegen.data.prepare import prepare
    root = _gem(tmp_path)
    said = []
    out = prepare(f"emoji:{root}", tmp_path / "store", progress=False, log=said.append)
    for split in ("train", "test"):
        stored = load_data(DataConfig(source=f"store:{out}", split=split))
        direct = load_data(DataConfig(source=f"emoji:{root}", split=split))
        assert torch.equal(stored.images, direct.images) and stored.captions == direct.captions
        assert torch.equal(stored.labels, direct.labels) and not stored.notes
    assert sum("'odd'" in line for line in said) == 1


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


def test_dominant_hue_names_the_colour():
    from imagegen.evaluate.prompts import dominant_hue, hue_matches
    x = torch.ones(4, 3, 8, 8)                                   # white
    for i, rgb in enumerate(([1, -1, -1], [-1, 1, -1], [-1, -1, 1])):
        x[i, :, 2:6, 2:6] = torch.tensor(rgb, dtype=torch.float)[:, None, None]
    hues = dominant_hue(x)
    assert [hue_matches(float(h), w) for h, w in zip(hues[:3], ("red", "green", "blue"))] == [True] * 3
    assert not hue_matches(float(hues[0]), "blue") and hues[3] == -1    # a white image has no hue


def test_held_out_names_are_measured_against_the_real_images(tmp_path, monkeypatch):
    """A text run on emoji: the held-out names as prompts, judged by the evaluator, beside the real test
    images and the majority class; names with a colour word also by their hue."""
    import imagegen
    from imagegen.evaluate.evaluator import EvaluatorConfig, train_evaluator
    from imagegen.evaluate.prompts import name_prompt_accuracy
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    root = _gem(tmp_path)
    index = json.loads((root / "config" / "index.json").read_text())
    for key in ("e00", "e02", "e03", "e05"):                    # e03 and e05 are in the test split
        index[key]["name"] = f"red thing {key}"
    (root / "config" / "index.json").write_text(json.dumps(index))
    source = f"emoji:{root}"
    run = imagegen.train(imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2], "sample_steps": 2},
                                                  "data": {"source": source, "size": 16},
                                                  "train": {"steps": 2, "batch_size": 8, "sample_every": 0}}),
                         out=tmp_path / "runs", progress=False)
    ev = train_evaluator(EvaluatorConfig(data=source, size=16, width=8, batch_size=8, epochs=2), log=None)
    run_model = imagegen.load_run(run)
    out = name_prompt_accuracy(run_model, ev)
    test = load_data(DataConfig(source=source, split="test", size=16))
    assert out["prompts"] == len(test) and out["images_per_prompt"] == 4 and 0 <= out["category_accuracy"] <= 1
    assert out["majority_share"] >= 0.5 and 0 <= out["category_accuracy_real"] <= 1
    assert out["coloured_prompts"] == sum(c.startswith("red thing") for c in test.captions) == 2
    assert out["hue_accuracy_real"] == 1.0                       # their discs are red: (200, 30 or 50, 40)
