"""The built-in captioned `scenes` data: deterministic, every caption true of its ground truth, and the
pixels true of the ground truth too (so a judge trained on them learns what the captions say)."""

from __future__ import annotations

import re

import pytest
import torch

import imagegen
from imagegen.data import scenes as S
from imagegen.data.dataset import ImageDataset
from imagegen.data.registry import describe


@pytest.fixture(scope="module")
def test_split() -> S.Scenes:
    return S.make_scenes("test")


def objects(cells: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(shape, colour, size, cell) of each occupied cell."""
    return [(*S.decode_cell(int(c)), i) for i, c in enumerate(cells.tolist()) if c]


def test_the_same_seed_gives_the_same_scenes_and_the_splits_differ(test_split):
    S._render_split.cache_clear()
    again = S.make_scenes("test")
    assert torch.equal(again.images, test_split.images) and again.captions == test_split.captions
    assert torch.equal(again.cells, test_split.cells)
    train = S.make_scenes("train", first=1000)
    assert not torch.equal(train.images[:100], test_split.images[:100])
    whole = S.make_scenes("test", first=None)
    assert torch.equal(S.make_scenes("test", first=10).images[:10], whole.images[:10])


def test_every_task_is_drawn_and_cell_codes_round_trip(test_split):
    counts = torch.bincount(test_split.tasks, minlength=len(S.TASKS))
    assert (counts > 250).all()             # about 2000 / 6 each
    codes = {S.cell_code(s, c, z) for s in range(len(S.SHAPES)) for c in range(len(S.COLOURS)) for z in range(2)}
    assert codes == set(range(1, S.CELL_CLASSES))
    assert all(S.decode_cell(S.cell_code(s, c, z)) == (s, c, z) for s, c, z in [(0, 0, 0), (3, 7, 1), (2, 5, 0)])
    assert S.decode_cell(0) is None
    every = torch.arange(1, S.CELL_CLASSES)          # the same arithmetic on tensors, as the judge uses it
    assert torch.equal(S.cell_code(*S.cell_parts(every)), every)


def test_every_caption_is_true_of_its_ground_truth(test_split):
    number = {v: k for k, v in S.NUMBERS.items()}
    shapes = "|".join(S.SHAPES)
    colours = "|".join(S.COLOUR_NAMES)
    for caption, cells, task in zip(test_split.captions, test_split.cells, test_split.tasks.tolist()):
        objs = objects(cells)
        name = S.TASKS[task]
        words = caption.split()
        said_shapes = {S.SHAPES.index(m) for m in re.findall(rf"\b({shapes})s?\b", caption)}
        said_colours = {S.COLOUR_NAMES.index(m) for m in re.findall(rf"\b({colours})\b", caption)}
        assert said_shapes == {o[0] for o in objs}, caption
        assert said_colours <= {o[1] for o in objs}, caption
        if name == "counting":
            assert len(objs) == number[words[0]] and len({o[0] for o in objs}) == 1, caption
            if said_colours:
                assert {o[1] for o in objs} == said_colours, caption
        elif name in ("single object", "colours"):
            assert len(objs) == 1
            (shape, colour, size, cell), = objs
            assert (S.SIZES[size] in words) == ("small" in words or "large" in words), caption
            place = [p for p in S.PLACES if caption.endswith(p)]
            assert not place or S.PLACES.index(place[0]) == cell, caption
            if name == "colours":
                assert said_colours == {colour}, caption
        else:
            assert len(objs) == 2, caption
            first, second = (next(o for o in objs if S.SHAPES[o[0]] == m)
                             for m in re.findall(rf"\b({shapes})\b", caption))
            if name in ("position", "colour attribution"):    # each colour binds to its own shape
                pairs = re.findall(rf"\b({colours}) ({shapes})\b", caption)
                assert {(S.COLOUR_NAMES.index(c), S.SHAPES.index(s)) for c, s in pairs} == {(o[1], o[0]) for o in objs}
            if name == "position":
                (r1, c1), (r2, c2) = divmod(first[3], 3), divmod(second[3], 3)
                relation = re.search(r"left of|right of|above|below", caption).group()
                assert {"left of": c1 < c2, "right of": c1 > c2, "above": c1 == c2 and r1 < r2,
                        "below": c1 == c2 and r1 > r2}[relation], caption


def test_the_pixels_show_the_ground_truth(test_split):
    """Each object shows its named colour in its own cell; empty cells hold only the dark background."""
    size = test_split.images.shape[-1]
    edges = [round(k * size / 3) for k in range(4)]
    palette = torch.tensor(list(S.COLOURS.values())) * 255
    for image, cells in zip(test_split.images[:300].int(), test_split.cells[:300]):
        for cell, code in enumerate(cells.tolist()):
            (r, c) = divmod(cell, 3)
            inner = image[:, edges[r] + 1:edges[r + 1] - 1, edges[c] + 1:edges[c + 1] - 1].flatten(1).T   # pixels x 3
            if code == 0:
                assert inner.max() < 60
            else:
                _, colour, _ = S.decode_cell(code)          # (shape, colour, size)
                nearest = (inner - palette[colour]).abs().max(1).values.min()
                assert nearest < 30, (cell, S.COLOUR_NAMES[colour])


def test_scenes_is_a_data_source_with_captions(capsys):
    ds = imagegen.load_data(imagegen.DataConfig(source="scenes", split="test", limit=7, size=48))
    assert ds.captioned and len(ds.captions) == 7 and ds.images.shape == (7, 3, 48, 48)
    assert ds.captions == S.make_scenes("test", size=48).captions[:7]
    assert torch.equal(ds.images, S.make_scenes("test", size=48, first=7).images[:7])   # drawn at 48, not resized
    assert not ds.labelled
    text = describe(ds)
    assert "captions: 7" in text and repr(ds.captions[0]) in text
    assert not imagegen.load_data("shapes").captioned


def test_a_dataset_refuses_a_caption_count_that_is_not_its_image_count():
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        ImageDataset(images=torch.zeros(3, 1, 4, 4, dtype=torch.uint8), labels=torch.full((3,), -1),
                     classes=[], name="x", source="x", captions=["a", "b"])


# --- captioned:SOURCE: captions made from a labelled source's classes (data/captions.py) ---------------

def test_captioned_data_gives_each_image_a_caption_of_its_class():
    from imagegen.data import captions as C
    ds = imagegen.load_data("captioned:shapes")
    assert ds.captioned and ds.labelled and len(ds.captions) == len(ds)
    for caption, y in zip(ds.captions[:500], ds.labels[:500].tolist()):
        assert caption in C.training_prompts(ds.classes[y]), caption
    first = imagegen.load_data(imagegen.DataConfig(source="captioned:shapes", limit=10))
    assert first.captions == ds.captions[:10]                 # image i's caption does not depend on the rest
    assert len(set(ds.captions)) > 30                          # templates x names, not one caption per class


def test_held_out_prompts_never_occur_in_training_captions():
    from imagegen.data import captions as C
    for cls in C.PHRASES:
        held, seen = set(C.held_out_prompts(cls)), set(C.training_prompts(cls))
        assert held and not held & seen, cls
        assert all(not any(p in t for t in seen) for p in C.PHRASES[cls][1]), cls   # the paraphrase is new
    assert C.held_out_prompts("some class") == [] and C.training_prompts("some_class")[0] == "a some class"


def test_captions_need_classes():
    with pytest.raises(imagegen.errors.ConfigError, match="captions are made from classes"):
        imagegen.load_data("captioned:scenes")
