"""The GenEval-style scoring of `scenes` (evaluate/geneval.py): captions read into what they ask for,
the checks against a judge's cells, the judge's crops, cache and hash, and `imagegen evaluate` on a
scenes text run (issue 16)."""

from __future__ import annotations

import json

import pytest
import torch

import imagegen
from imagegen.data import scenes as S
from imagegen.errors import CheckpointError, ConfigError
from imagegen.evaluate import geneval as G


@pytest.fixture(scope="module")
def test_split() -> S.Scenes:
    return S.make_scenes("test")


def cells_of(*objects: tuple[str, str, str, str]) -> list[int]:
    """9 cell classes from (shape, colour, size, position) names."""
    cells = [0] * 9
    for shape, colour, size, where in objects:
        cells[S.POSITIONS.index(where)] = S.cell_code(S.SHAPES.index(shape), S.COLOUR_NAMES.index(colour), S.SIZES.index(size))
    return cells


def test_every_test_caption_reads_as_its_task_and_its_ground_truth_meets_it(test_split):
    prompts = [G.parse_caption(c) for c in test_split.captions]
    assert [p.task for p in prompts] == [S.TASKS[t] for t in test_split.tasks.tolist()]
    assert G.score(prompts, test_split.cells) == {**{t: 1.0 for t in S.TASKS}, "overall": 1.0,
                                                  "images": {t: int((test_split.tasks == k).sum()) for k, t in enumerate(S.TASKS)}}


def test_a_changed_colour_fails_exactly_the_captions_that_name_colours(test_split):
    # every object one colour along: the same shapes, sizes and places
    recoloured = test_split.cells.clone()
    held = recoloured > 0
    shape, colour, size = S.cell_parts(recoloured[held])
    recoloured[held] = S.cell_code(shape, (colour + 1) % len(S.COLOURS), size)
    for caption, cells in zip(test_split.captions, recoloured.tolist()):
        names_a_colour = any(c in caption.split() for c in S.COLOUR_NAMES)
        assert G.satisfied(G.parse_caption(caption), cells) != names_a_colour, caption


@pytest.mark.parametrize("caption, cells, expected", [
    ("two blue squares", cells_of(("square", "blue", "small", "top"), ("square", "blue", "large", "left")), True),
    ("two blue squares", cells_of(("square", "blue", "small", "top"), ("square", "red", "large", "left")), False),
    ("two squares", cells_of(*[("square", "red", "small", p) for p in ("top", "left", "centre")]), False),   # exact count
    ("three stars", cells_of(*[("star", "red", "small", p) for p in ("top", "left", "centre")], ("circle", "red", "small", "right")), True),
    ("a star", cells_of(("star", "white", "large", "centre"), ("circle", "red", "small", "top")), True),   # extra objects allowed
    ("a large red star in the top left", cells_of(("star", "red", "large", "top left")), True),
    ("a large red star in the top left", cells_of(("star", "red", "small", "top left")), False),
    ("a large red star in the top left", cells_of(("star", "red", "large", "top")), False),
    ("a green circle left of a yellow triangle", cells_of(("circle", "green", "small", "bottom left"), ("triangle", "yellow", "large", "top")), True),
    ("a green circle left of a yellow triangle", cells_of(("circle", "green", "small", "top"), ("triangle", "yellow", "large", "top left")), False),
    ("a green circle left of a yellow triangle", cells_of(("circle", "green", "small", "top"), ("triangle", "yellow", "large", "bottom")), False),
    ("a green circle above a yellow triangle", cells_of(("circle", "green", "small", "top"), ("triangle", "yellow", "large", "bottom right")), True),
    ("a purple star and an orange square", cells_of(("star", "orange", "small", "top"), ("square", "purple", "large", "left")), False),
    ("a purple star and an orange square", cells_of(("star", "purple", "small", "top"), ("square", "orange", "large", "left")), True),
    ("a circle and a square", cells_of(("circle", "cyan", "small", "top")), False),
])
def test_what_a_caption_asks_for_is_checked_as_geneval_does(caption, cells, expected):
    assert G.satisfied(G.parse_caption(caption), cells) is expected


@pytest.mark.parametrize("caption", ["a dog", "a red", "four circles", "a circle near a square", ""])
def test_a_caption_outside_the_grammar_is_a_clear_error(caption):
    with pytest.raises(ConfigError, match="not in the scenes grammar"):
        G.parse_caption(caption)


def test_each_crop_is_its_own_cell_in_reading_order():
    images = torch.full((2, 3, 36, 36), -1.0)
    images[0, :, 12:24, 24:36] = 1        # cell 5: middle row, right
    images[1, :, 24:36, 0:12] = 1         # cell 6: bottom row, left
    crops = G.cell_crops(images)
    assert crops.shape == (18, 3, G.CELL + 2 * G.MARGIN, G.CELL + 2 * G.MARGIN)
    inner = crops[:, :, G.MARGIN:-G.MARGIN, G.MARGIN:-G.MARGIN].mean((1, 2, 3))
    assert torch.equal(inner == 1, torch.tensor([i in (5, 15) for i in range(18)]))
    # any side is resized to the judge's: a 32 px scene gives the same cells
    assert G.cell_crops(torch.zeros(1, 3, 32, 32)).shape == (9, 3, G.CELL + 2 * G.MARGIN, G.CELL + 2 * G.MARGIN)


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """A judge trained on 200 scenes for one epoch: not a good judge, a real one for the mechanics."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_CACHE", str(cache))
        judge = G.train_judge(G.JudgeConfig(limit=200, epochs=1, width=4, batch_size=50), log=None)
        yield judge


def test_the_judge_is_saved_with_its_hash_and_a_changed_file_is_refused(tiny_judge, test_split):
    folder = G.judge_dir()
    info = json.loads((folder / "judge.json").read_text())
    assert info["name"] == tiny_judge.name and info["sha256"].startswith(tiny_judge.name.rsplit("-", 1)[1])
    assert set(info["test_geneval"]) == {*S.TASKS, "overall", "images"}
    images = test_split.images[:20].float() / 127.5 - 1
    again = G.get_judge(log=None)                   # from the cache, not trained again
    assert again.info == tiny_judge.info and torch.equal(again.cells(images), tiny_judge.cells(images))
    assert tiny_judge.features(images).shape == (20, 9 * 2 * 4)
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        G.load_judge()


def test_a_scenes_text_run_is_evaluated_per_geneval_task(tmp_path, monkeypatch):
    from imagegen.evaluate.run_eval import evaluate_run
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    judge = G.train_judge(G.JudgeConfig(limit=100, epochs=1, width=4, batch_size=50), log=None)
    cfg = imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2], "sample_steps": 2},
                                   "data": {"source": "scenes", "limit": 64},
                                   "train": {"steps": 2, "batch_size": 8, "sample_every": 0, "grid_size": 4}})
    run_dir = imagegen.train(cfg, out=tmp_path, progress=False)
    out = evaluate_run(run_dir, n=20, prompts=24, log=None)
    metrics, protocol = out["metrics"], out["protocol"]
    assert protocol["evaluator"] == judge.name and f"FD-{judge.name}" in metrics and "class_coverage" not in metrics
    following = protocol["prompt_following"]
    assert following["protocol"]["judge_sha256"] == judge.info["sha256"]
    assert following["protocol"]["prompt_count"] == 24 and following["protocol"]["images_per_prompt"] == 1
    assert following["protocol"]["sampler"]["sample_steps"] == 2
    test = S.make_scenes("test")
    asked = {S.TASKS[t] for t in test.tasks[:24].tolist()}     # the tasks of the first 24 captions
    assert set(following["generated"]["images"]) == asked and sum(following["generated"]["images"].values()) == 24
    for task in (*asked, "overall"):
        key = f"geneval_{task.replace(' ', '_')}"
        assert 0 <= metrics[key] <= 1 and metrics[key] == following["generated"][task]
    # the reference: the judge on the real images under their own captions
    real = G.score([G.parse_caption(c) for c in test.captions[:24]], judge.cells(test.images[:24].float() / 127.5 - 1))
    assert following["real"] == real and sum(real["images"].values()) == 24
