"""`--logger tensorboard` (issue 18): the training loop's scalars, learning rates, images/s and sample
grids, and `imagegen evaluate`'s metrics, read back with TensorBoard's own reader (EventAccumulator)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import imagegen
from imagegen.errors import ConfigError
from imagegen.evaluate.run_eval import evaluate_run

from conftest import run_main, tiny_config

BOARD = {"logger": "tensorboard", "log_every": 5, "sample_every": 10, "checkpoint_every": 10}


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def board_run(tmp_path_factory):
    return imagegen.train(tiny_config(20, train=BOARD), out=tmp_path_factory.mktemp("tb"), progress=False)


def test_scalars_and_grids_read_back_with_tensorboard(board_run):
    acc = _events(board_run)
    tags = acc.Tags()
    log = [json.loads(line) for line in (board_run / "log.jsonl").read_text().splitlines()]   # still written
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    for name in ("loss_d", "loss_g", "d_real", "d_fake"):
        got = _scalars(acc, f"loss/{name}")
        assert [s for s, _ in got] == [5, 10, 15, 20]
        assert np.allclose([v for _, v in got], [r[name] for r in log], rtol=1e-6)   # the same numbers as the log
    assert [s for s, _ in _scalars(acc, "train/images_per_s")] == [5, 10, 15, 20]
    cfg = imagegen.load_run(board_run).model.cfg
    assert [v for _, v in _scalars(acc, "lr/g")] == pytest.approx([cfg.lr_g] * 4)
    assert [v for _, v in _scalars(acc, "lr/d")] == pytest.approx([cfg.lr_d] * 4)
    # One grid per sample step, pixel for pixel the PNG in samples/.
    assert "samples" in tags["images"]
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [10, 20]
    for g in grids:
        shown = np.asarray(Image.open(io.BytesIO(g.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(board_run / "samples" / f"step-{g.step:07d}.png").convert("RGB"))
        assert shown.shape == saved.shape and (shown == saved).all()


def test_resume_appends_without_repeating_steps(tmp_path):
    """A run that logged steps 15 and 20 but crashed before their checkpoint (here: the step-20 checkpoint
    removed) resumes from step 10; TensorBoard then shows each step once, with the resumed values."""
    import shutil
    run_dir = imagegen.train(tiny_config(20, train=BOARD), out=tmp_path, progress=False)
    shutil.rmtree(run_dir / "checkpoints" / "step-0000020")
    r = run_main("train", "--resume", str(run_dir), "--steps", "20", "--no-progress")
    assert r.returncode == 0, r.stderr
    got = _scalars(_events(run_dir), "loss/loss_g")
    assert [s for s, _ in got] == [5, 10, 15, 20]
    resumed = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()][-2:]
    assert [r["step"] for r in resumed] == [15, 20]
    assert [v for _, v in got[2:]] == pytest.approx([r["loss_g"] for r in resumed], rel=1e-6)


def test_evaluate_writes_its_metrics_into_the_events(board_run, evaluators, tmp_path):
    import shutil
    run_dir = shutil.copytree(board_run, tmp_path / board_run.name)
    out = evaluate_run(run_dir, n=50, extractor=evaluators[0], log=None)
    acc = _events(run_dir)
    numbers = {k: v for k, v in out["metrics"].items() if isinstance(v, float)}
    assert any(k.startswith("FD-") for k in numbers) and len(numbers) >= 5
    for name, want in numbers.items():
        (step, value), = _scalars(acc, f"eval/{name}")
        assert step == 20 and value == pytest.approx(want, rel=1e-6)


def test_logger_flag_and_bad_value(tmp_path):
    r = run_main("train", "--data", "shapes", "--model", "dcgan", "--logger", "tensorboard", "--dry-run")
    assert r.returncode == 0 and '"logger": "tensorboard"' in r.stdout
    with pytest.raises(ConfigError, match="train.logger must be one of jsonl, tensorboard"):
        tiny_config(5, train={"logger": "wandb"})
