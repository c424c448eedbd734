"""CycleGAN: unpaired data, training, exact resume, translation (library and CLI), refusals, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.checkpoint import list_checkpoints, load_checkpoint
from imagegen.cli import main
from imagegen.data import DataConfig, load_data
from imagegen.errors import ConfigError, DataError
from imagegen.evaluate.evaluator import get_evaluator
from imagegen.evaluate.run_eval import evaluate_run
from imagegen.sample import generate, grid, to_uint8

from conftest import private_copy, read_only
from test_train import _assert_same_optim, _assert_same_tensors

TINY = {"width": 4, "blocks": 1, "d_layers": 1, "pool_size": 4, "decay_start": 2, "decay_end": 8, "identity_weight": 5}
PAIR = "pair:shapes:circle,square"


def cg_config(steps: int, data: str = PAIR, model: dict | None = None, **train):
    return imagegen.resolve_config({
        "family": "cyclegan", "model": {**TINY, **(model or {})}, "data": {"source": data, "limit": 64},
        "train": {"steps": steps, "batch_size": 4, "log_every": 2, "sample_every": 0, "grid_size": 16,
                  "checkpoint_every": max(1, steps // 2), **train}})


@pytest.fixture(scope="module")
def cg_run(request, tmp_path_factory):
    return read_only(request, imagegen.train(cg_config(6), out=tmp_path_factory.mktemp("cg"), progress=False))


def write_png(path, size=20, mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_pair_sources_give_two_unpaired_domains(tmp_path):
    ds = load_data(PAIR)
    assert ds.domains == ("circle", "square") and ds.base == "shapes"
    assert len(ds.a) == len(ds.b) == 2000 and not ds.labelled
    b = ds.batch_at(3, 8, seed=1)
    assert set(b) == {"a", "b"} and b["a"].shape == b["b"].shape == (8, 3, 32, 32)
    assert torch.equal(b["a"], ds.batch_at(3, 8, seed=1)["a"])        # a batch depends only on (seed, step)
    # Class names match loosely, indices work, and both give the same domains.
    assert load_data("pair:shapes:0,Square").domains == ("circle", "square")
    for d in ("trainA", "trainB", "testA", "testB"):
        for i in range(3):
            write_png(tmp_path / "ab" / d / f"{i}.png", value=i)
    ds = load_data(DataConfig(source=f"pair:{tmp_path / 'ab'}", size=16))
    assert ds.domains == ("A", "B") and ds.a.images.shape == (3, 3, 16, 16)
    assert len(load_data(DataConfig(source=f"pair:{tmp_path / 'ab'}", split="test", size=16)).b) == 3


def test_bad_pair_data_is_refused_clearly(tmp_path):
    root = tmp_path / "ab"
    write_png(root / "trainA" / "x.png")
    with pytest.raises(DataError, match="no trainB/"):
        load_data(f"pair:{root}")
    (root / "trainB").mkdir()
    with pytest.raises(DataError, match="trainB is empty"):
        load_data(f"pair:{root}")
    with pytest.raises(ConfigError, match="unknown class 'hexagon'.*circle"):
        load_data("pair:shapes:circle,hexagon")
    with pytest.raises(ConfigError, match="two different classes"):
        load_data("pair:shapes:circle,0")
    with pytest.raises(ConfigError, match="give two classes"):
        load_data("pair:shapes:circle")
    with pytest.raises(ConfigError, match="needs a folder"):
        load_data("pair:")
    # A grayscale image in a colour domain is converted, and the conversion is reported.
    write_png(root / "trainB" / "gray.png", mode="L")
    write_png(root / "trainB" / "rgb.png")
    ds = load_data(f"pair:{root}")
    assert ds.channels == 3 and ds.b.images.shape[1] == 3
    assert len(ds.notes) == 1 and "gray.png" in ds.notes[0] and "converted to 3 channel" in ds.notes[0]
    # Each kind of model refuses the other kind of data.
    with pytest.raises(ConfigError, match="pair:DIR"):
        imagegen.train(cg_config(2, data="shapes"), out=tmp_path, progress=False)
    dcgan = imagegen.resolve_config({"family": "dcgan", "data": {"source": PAIR}, "train": {"steps": 1}})
    with pytest.raises(ConfigError, match="translation"):
        imagegen.train(dcgan, out=tmp_path, progress=False)


def test_train_reload_translate(cg_run):
    records = [json.loads(line) for line in (cg_run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in records for v in r.values())
    assert records[0]["lr"] == 2e-4 and records[-1]["lr"] < 2e-4       # linear decay after decay_start
    run = imagegen.load_run(cg_run)
    assert run.model.cfg.domain_a == "circle" and run.model.cfg.domain_b == "square"
    # The training grid drawn in-process equals the one drawn by the reloaded model.
    ds = load_data(DataConfig(source=PAIR, limit=64))
    images, per_row = run.model.preview(ds, 16)
    assert images.shape[0] == 6 * per_row
    saved = np.asarray(Image.open(cg_run / "samples" / "step-0000006.png"))
    assert np.array_equal(np.asarray(grid(images, nrow=per_row, scale=2)), saved)
    # Translation is deterministic and each image is independent of its batch.
    x = ds.a.batch(torch.arange(5))["image"]
    out = run.model.translate(x, "a2b")
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(run.model.translate(x[[1, 3]], "a2b"), out[[1, 3]])
    there, back = run.model.cycle(x, "b2a")
    assert torch.equal(there, run.model.translate(x, "b2a")) and torch.equal(back, run.model.translate(there, "a2b"))
    with pytest.raises(ConfigError, match="translates images rather than"):
        generate(run.model, [0, 1])
    with pytest.raises(ConfigError, match="3 x 32 x 32"):
        run.model.translate(torch.zeros(1, 1, 32, 32))


def test_resume_is_bit_identical(tmp_path):
    straight = imagegen.train(cg_config(6), out=tmp_path / "a", progress=False)
    half = imagegen.train(cg_config(3), out=tmp_path / "b", progress=False)
    resumed = imagegen.train(cg_config(6), resume=half, progress=False)
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    assert int(a["model"]["pool_fill"].min()) == 4                     # the image pools filled and were saved
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["ema"], b["ema"], "ema")
    _assert_same_optim(a["optimizers"], b["optimizers"])


def test_translate_cli_keeps_names_and_writes_the_grid(cg_run, tmp_path, tiny_run, capsys):
    inp = tmp_path / "in"
    write_png(inp / "one.png", size=40)
    write_png(inp / "sub" / "two.png", size=32, mode="L")       # converted to RGB, with a note
    (inp / "broken.png").write_bytes(b"not a png")                # reported and skipped
    out = tmp_path / "out"
    assert main(["translate", str(cg_run), "--input", str(inp), "--out", str(out), "--grid", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "converted to 3 channel" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["one.png", "sub/two.png"]
    assert Image.open(out / "one.png").size == (32, 32)
    g = Image.open(tmp_path / "g.png")
    assert g.size == (2 * (2 * (32 + 2) + 2), 2 * (3 * (32 + 2) + 2))   # 2 columns, 3 rows, scale 2
    # One file, the other direction: the file equals the library's translation of it.
    assert main(["translate", str(cg_run), "--direction", "b2a", "--input", str(inp / "one.png"), "--out", str(out / "b")]) == 0
    run = imagegen.load_run(cg_run)
    x = torch.from_numpy(np.array(Image.open(inp / "one.png").resize((32, 32), Image.Resampling.BICUBIC))).permute(2, 0, 1)[None]
    expected = to_uint8(run.model.translate(x.float() / 127.5 - 1, "b2a"))[0]
    assert np.array_equal(np.asarray(Image.open(out / "b" / "one.png")), expected)
    capsys.readouterr()
    # Refusals: sampling a cyclegan, translating with a DCGAN, a missing input.
    assert main(["sample", str(cg_run), "--out", str(tmp_path / "s")]) == 2
    assert "imagegen translate" in capsys.readouterr().err
    assert main(["translate", str(tiny_run), "--input", str(inp), "--out", str(out)]) == 2
    assert "use `imagegen sample`" in capsys.readouterr().err
    assert main(["translate", str(cg_run), "--input", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_evaluate_translation_writes_stamped_metrics(cg_run, evaluators, tmp_path, capsys):
    ev, _ = evaluators
    cg_run = private_copy(cg_run, tmp_path)   # evaluate writes into the run: not the shared one
    out = evaluate_run(cg_run, n=50, log=None)
    m, p = out["metrics"], out["protocol"]
    assert p["evaluator"] == ev.name and p["target_classes"] == ["circle", "square"]
    assert p["translated"] == {"a2b": 50, "b2a": 50}
    # Each figure is what it says: recomputed here from the run's own translations and the same judge.
    from imagegen.evaluate.evaluator import run_data
    run = imagegen.load_run(cg_run)
    test = load_data(run_data(run))
    for d, src, target in (("a2b", test.a, 1), ("b2a", test.b, 0)):     # shapes: circle 0, square 1
        x = src.images[:50].float() / 127.5 - 1
        there, back = (t.cpu() for t in run.model.cycle(x, d))
        assert m[f"{d}_to_target"] == pytest.approx(float((ev.probs(there).argmax(1) == target).double().mean()))
        assert m[f"{d}_cycle_l1"] == pytest.approx(float((back - x).abs().mean()), rel=1e-5)
        assert m[f"{d}_real_target"] > 0.9 and m[f"{d}_FD-{ev.name}"] > 0
    assert main(["report", str(cg_run)]) == 0
    assert "a2b_to_target" in (cg_run / "report.html").read_text()
    # A folder pair has no dataset evaluator: a domain classifier A vs B is trained and cached instead.
    root = tmp_path / "ab"
    for d, value in (("trainA", 40), ("trainB", 210), ("testA", 40), ("testB", 210)):
        (root / d).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((32, 32, 3), value + i, np.uint8)).save(root / d / f"{i}.png")
    cfg = imagegen.resolve_config({"family": "cyclegan", "model": TINY, "data": {"source": f"pair:{root}", "size": 32},
                                   "train": {"steps": 2, "batch_size": 4, "sample_every": 0, "grid_size": 4}})
    run = imagegen.train(cfg, out=tmp_path / "runs", progress=False)
    out = evaluate_run(run, n=8, log=None)
    assert out["protocol"]["target_classes"] == ["A", "B"] and out["protocol"]["evaluator"].startswith("cnn128-pair-")
    assert out["metrics"]["a2b_real_target"] == 1.0


@pytest.mark.trained
def test_a_short_run_learns_to_translate(tmp_path, evaluators):
    """200 steps at 16 px: the shapes classifier (the tiny 16 px evaluator) takes most translated circles
    for squares (and back), where it takes almost no real circle for a square."""
    cfg = imagegen.resolve_config({"family": "cyclegan", "model": {"width": 8, "blocks": 2, "decay_start": 100, "decay_end": 200},
                                   "data": {"source": PAIR, "size": 16},
                                   "train": {"steps": 200, "batch_size": 8, "sample_every": 0, "grid_size": 8}})
    run = imagegen.train(cfg, out=tmp_path / "runs", progress=False)
    m = evaluate_run(run, n=200, log=None)["metrics"]
    judge = get_evaluator("shapes", size=16, log=None)
    test = load_data(DataConfig(source=PAIR, split="test", size=16))
    as_square = float((judge.probs(test.a.batch(torch.arange(200))["image"]).argmax(1) == 1).double().mean())
    assert as_square < 0.05
    assert m["a2b_to_target"] > 0.3 and m["b2a_to_target"] > 0.3


@pytest.mark.trained
@pytest.mark.parametrize("direction", ["a2b", "b2a"])
def test_cyclegan_exports_each_generator_to_onnx(cg_run, direction, tmp_path):
    """`imagegen export --direction` writes that generator; onnxruntime gives `translate`'s images to 1e-4
    (issue 18)."""
    import onnx
    import onnxruntime as ort
    from imagegen.export import export_onnx
    run = imagegen.load_run(cg_run)
    done = export_onnx(run, tmp_path / "g.onnx", direction=direction)
    meta = {p.key: p.value for p in onnx.load(str(done.path)).metadata_props}
    assert meta["imagegen.direction"] == direction and list(done.inputs) == ["image"]
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    want = run.model.translate(x, direction)
    got = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-4 and want.std() > 0.01
