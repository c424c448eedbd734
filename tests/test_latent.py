"""The autoencoder (`ae`) and latent mode (`model.autoencoder = RUN` for flow and ddpm): round trips, the
latent cache, exact resume, per-seed samples, exact known pixels when inpainting, the refusals, and each
command on a latent run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.checkpoint import list_checkpoints, load_checkpoint, load_run
from imagegen.data import DataConfig, load_data
from imagegen.errors import ConfigError, ImagegenError
from imagegen.models import latent as latent_mode
from imagegen.models.ae import AE
from imagegen.sample import generate, seed_generators

from conftest import LOCAL, private_copy, read_only, run_main


def metrics_name(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith("FD-"))[3:]

DATA = {"source": "shapes", "limit": 96}
TRAIN = {"batch_size": 16, "log_every": 2, "sample_every": 0, "grid_size": 16, "checkpoint_every": 2}


def _cfg(family, model, steps, **train):
    return imagegen.resolve_config({"family": family, "model": model, "data": dict(DATA),
                                    "train": {**TRAIN, "steps": steps, **train}})


def _ae(out, steps=4, **model):
    return imagegen.train(_cfg("ae", {"width": 8, "critic_width": 8, "critic_start": 2, **model}, steps), out=out,
                          progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv("IMAGEGEN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def runs(request, cache, tmp_path_factory):
    """An ae run (32 px shapes, factor 4: 4 x 8 x 8 latents) and three latent runs on it."""
    out = tmp_path_factory.mktemp("latent")
    ae = _ae(out / "ae")
    built = {"ae": ae}
    for name, family, model in (("flow", "flow", {"width": 8, "mults": [1, 2]}),
                                ("flow-dit", "flow", {"backbone": "dit", "dit_size": "xxs", "patch": 2}),
                                ("ddpm", "ddpm", {"width": 8, "mults": [1, 2], "timesteps": 50})):
        built[name] = imagegen.train(_cfg(family, {**model, "autoencoder": str(ae)}, 4), out=out / name,
                                     progress=False)
    return {k: read_only(request, v) for k, v in built.items()}


@pytest.mark.rounding
def test_the_autoencoder_round_trip(runs):
    ae = load_run(runs["ae"]).model
    x = load_data(DataConfig(source="shapes", limit=12)).batch(torch.arange(12))["image"]
    z = ae.to_latent(x)
    assert z.shape == (12, 4, 8, 8)
    assert torch.equal(ae.to_latent(x[3:4]), z[3:4])                # an image's latent does not depend on its batch
    y = ae.round_trip(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y, ae.from_latent(z))
    assert torch.equal(ae.from_latent(z[5:6]), y[5:6])
    with pytest.raises(ConfigError, match="draws no images from noise"):
        ae.sample(2)
    grid, per_row = ae.preview(load_data(DataConfig(source="shapes", limit=40)), 32)
    assert per_row == 8 and grid.shape == (32, 3, 32, 32)


def test_autoencoder_resume_is_bit_identical(runs, tmp_path):
    """Across the critic's warm-up (critic_start 2), which a resumed run must count on from its step."""
    straight = _ae(tmp_path / "a", steps=4)
    resumed = imagegen.train(_cfg("ae", {"width": 8, "critic_width": 8, "critic_start": 2}, 4),
                             resume=_ae(tmp_path / "b", steps=2), progress=False)
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [json.loads(line).get("d") is not None for line in (straight / "log.jsonl").read_text().splitlines()] == [False, True]


def test_the_latent_run_names_its_autoencoder_and_carries_its_weights(runs):
    cfg = json.loads((runs["flow"] / "config.json").read_text())["model"]
    manifest = json.loads((runs["ae"] / "MANIFEST.json").read_text())
    assert cfg["autoencoder"] == str(runs["ae"])
    assert cfg["autoencoder_sha256"] == manifest["files"]["ema.safetensors"]
    assert (cfg["latent_factor"], cfg["latent_channels"]) == (4, 4)
    ae = load_run(runs["ae"]).model
    model = load_run(runs["flow"]).model
    for k, v in ae.decoder.state_dict().items():
        assert torch.equal(model.latent.decoder.state_dict()[k], v), k


def test_the_latents_are_cached_reused_and_invalidated(runs, cache, monkeypatch):
    ae, sha = latent_mode.open_autoencoder(runs["ae"])
    calls = []
    real = AE.to_latent
    monkeypatch.setattr(AE, "to_latent", lambda self, x: calls.append(len(x)) or real(self, x))
    ds = load_data(DataConfig(**DATA))
    first = latent_mode.cached_latents(ae, sha, ds, log=None)      # the runs above encoded these already
    assert calls == [] and first.shape == (96, 4, 8, 8)
    scale = json.loads((runs["flow"] / "config.json").read_text())["model"]["latent_scale"]
    assert scale == pytest.approx(1 / float(first.std()))
    other = load_data(DataConfig(source="shapes", limit=95))        # other data: encoded afresh
    assert torch.equal(latent_mode.cached_latents(ae, sha, other, log=None), first[:95]) and calls == [95]
    latent_mode.cached_latents(ae, "0" * 64, ds, log=None)          # another autoencoder: encoded afresh
    assert calls == [95, 96]
    latent_mode.cache_file(sha, latent_mode.images_sha256(other)).write_bytes(b"damaged")   # encoded again
    latent_mode.cached_latents(ae, sha, ds, log=None)
    latent_mode.cached_latents(ae, sha, other, log=None)
    latent_mode.cached_latents(ae, "0" * 64, ds, log=None)
    assert len(calls) == 3                                          # the damaged one, once


@pytest.mark.rounding
@pytest.mark.parametrize("name", ["flow", "flow-dit", "ddpm"])
def test_latent_samples_depend_only_on_their_seed(runs, name):
    model = load_run(runs[name]).model
    opts = {"steps": 3}
    labels = torch.tensor([0, 1, 2])
    many = generate(model, [4, 5, 6], labels=labels, **opts)
    one = generate(model, [5], labels=labels[1:2], **opts)
    assert many.shape == (3, 3, 32, 32) and torch.equal(many[1:2], one)
    assert not torch.equal(many[0], many[2])
    again = model.sample(3, labels=labels, generator=seed_generators([4, 5, 6]), steps=3, guidance=2.0)
    assert not torch.equal(again, many)                             # guidance reaches the latent backbone


def test_latent_resume_is_bit_identical(runs, tmp_path):
    model = {"width": 8, "mults": [1, 2], "autoencoder": str(runs["ae"])}
    straight = imagegen.train(_cfg("flow", model, 4), out=tmp_path / "a", progress=False)
    half = imagegen.train(_cfg("flow", model, 2), out=tmp_path / "b", progress=False)
    resumed = imagegen.train(_cfg("flow", model, 4), resume=half, progress=False)
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("name", ["flow", "ddpm"])
def test_latent_inpainting_keeps_every_known_pixel_exactly(runs, name):
    model = load_run(runs[name]).model
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 5:19, 9:27] = 1                                      # not aligned to the 4 px latent cells
    out = model.inpaint(image, mask, labels=torch.tensor([1]), generator=seed_generators([3]), steps=3, resample=1)
    keep = mask.expand_as(image) == 0
    assert torch.equal(out[keep], image[keep]) and not torch.equal(out[~keep], image[~keep])
    wide = torch.rand(1, 3, 32, 40) * 2 - 1                         # a canvas that is no multiple of 16
    wide_mask = torch.zeros(1, 1, 32, 40)
    wide_mask[..., 32:] = 1
    out = model.inpaint(wide, wide_mask, labels=torch.tensor([0]), generator=seed_generators([0]), steps=2, resample=1)
    assert out.shape == wide.shape and torch.equal(out[..., :32], wide[..., :32])


def test_latent_mode_refuses_what_it_cannot_do(runs, tmp_path):
    flow = load_run(runs["flow"]).model
    with pytest.raises(ConfigError, match="export of a latent model"):
        flow.export_spec()
    with pytest.raises(ConfigError, match="bits/dim"):
        flow.likelihood_estimator()
    with pytest.raises(ConfigError, match="distillation of a latent model"):
        flow.from_noise(torch.zeros(1, 4, 8, 8), labels=torch.tensor([0]))
    for family, model, message in (("consistency", {"width": 8}, "pixels only"),
                                   ("flow", {"width": 8, "dequantize": True}, "dequantize"),
                                   ("flow", {"backbone": "dit", "patch": 7}, "latent side 8"),
                                   ("ddpm", {"width": 8}, "an 'ddpm' run|a 'ddpm' run")):
        target = runs["ddpm"] if "ddpm' run" in message else runs["ae"]
        with pytest.raises(ConfigError, match=message):
            imagegen.train(_cfg(family, {**model, "autoencoder": str(target)}, 2), out=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="filled in from model.autoencoder"):
        _cfg("flow", {"latent_factor": 4}, 2)
    with pytest.raises(ConfigError, match="not a run folder"):
        imagegen.train(_cfg("flow", {"autoencoder": str(tmp_path / "nowhere")}, 2), out=tmp_path, progress=False)


def test_a_run_whose_autoencoder_is_missing_or_changed_is_refused(runs, tmp_path):
    ae = shutil.copytree(runs["ae"], tmp_path / "ae")
    run = imagegen.train(_cfg("flow", {"width": 8, "mults": [1, 2], "autoencoder": str(ae)}, 2), out=tmp_path / "r",
                         progress=False)
    imagegen.train(_cfg("ae", {"width": 8, "critic_width": 8, "critic_start": 2}, 6), resume=ae, progress=False)
    r = run_main("train", "--resume", run, "--steps", "4", "--no-progress")
    assert r.returncode == 2 and "changed since this run began" in r.stderr
    shutil.rmtree(ae)
    r = run_main("train", "--resume", run, "--steps", "4", "--no-progress")
    assert r.returncode == 2 and "not a run folder" in r.stderr
    assert load_run(run).model.sample(1, labels=torch.tensor([0]), steps=2).shape == (1, 3, 32, 32)   # sampling needs the run alone


def test_every_command_on_a_latent_run(runs, tmp_path, shared_evaluators, monkeypatch):
    """train, sample, vary (a seed and a file), inpaint, outpaint, evaluate (with bits/dim refused) and
    export (refused) through the CLI, on a latent flow run; evaluate on the autoencoder."""
    _, evaluators = shared_evaluators
    cache = shutil.copytree(evaluators, tmp_path / "cache")
    monkeypatch.setenv("IMAGEGEN_CACHE", str(cache))
    r = run_main("train", "--model", "ddpm", "--data", "shapes", "--set", "data.limit=64", "--steps", "2",
                 "--batch-size", "16", "--set", f"model.autoencoder={runs['ae']}", "--set", "model.width=8",
                 "--set", "model.mults=[1,2]", "--out", tmp_path / "runs", "--no-progress")
    assert r.returncode == 0, r.stderr
    run = private_copy(runs["flow"], tmp_path)     # evaluate writes its metrics.json into the run
    r = run_main("sample", run, "--seeds", "0-3", "--labels", "circle", "--steps", "2", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    first = np.asarray(Image.open(tmp_path / "s" / "seed000000.png"))
    assert first.shape == (32, 32, 3)
    r = run_main("vary", run, "--seed", "0", "--seeds", "1-2", "--strength", "0.5", "--labels", "circle",
                 "--steps", "2", "--out", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    r = run_main("vary", run, "--image", tmp_path / "s" / "seed000000.png", "--seeds", "1", "--labels", "circle",
                 "--steps", "2", "--out", tmp_path / "vf")
    assert r.returncode == 0, r.stderr
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = run_main("inpaint", run, "--image", tmp_path / "s" / "seed000000.png", "--mask", tmp_path / "mask.png",
                 "--labels", "circle", "--steps", "2", "--resample", "1", "--out", tmp_path / "in.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "in.png"))[mask == 0], first[mask == 0])
    r = run_main("outpaint", run, "--image", tmp_path / "s" / "seed000000.png", "--pad", "4", "--sides", "left",
                 "--steps", "2", "--resample", "1", "--out", tmp_path / "out.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png"))[:, 4:], first)
    r = run_main("evaluate", run, "--n", "64", "--likelihood", "8")
    assert r.returncode == 2 and "bits/dim" in r.stderr
    r = run_main("evaluate", run, "--n", "64")
    assert r.returncode == 0, r.stderr
    assert "FD-" in (run / "metrics.json").read_text()
    r = run_main("export", run, "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "export of a latent model" in r.stderr
    ae = private_copy(runs["ae"], tmp_path)
    r = run_main("evaluate", ae)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((ae / "metrics.json").read_text())["metrics"]
    assert 0 < metrics["psnr"] < 120 and metrics["FD-" + metrics_name(metrics)] >= 0


@pytest.mark.parametrize("family,model", [("flow", {"width": 8, "mults": [1, 2]}), ("ddpm", {"width": 8, "mults": [1, 2]}),
                                          ("vae", {"width": 8, "z_dim": 8}), ("ae", {"width": 8, "critic_width": 8})])
def test_the_validation_loss_is_logged_on_held_out_images(family, model, cache, tmp_path):
    """log.jsonl carries val_loss every train.val_every steps and at the end, measured with the same draws
    each time: a run and its resumed twin log the same numbers."""
    straight = imagegen.train(_cfg(family, model, 4, val_every=2), out=tmp_path / "a", progress=False)
    half = imagegen.train(_cfg(family, model, 2, val_every=2), out=tmp_path / "b", progress=False)
    imagegen.train(_cfg(family, model, 4, val_every=2), resume=half, progress=False)
    logged = [[json.loads(line).get("val_loss") for line in (run / "log.jsonl").read_text().splitlines()]
              for run in (straight, half)]
    assert logged[0] == logged[1] and len(logged[0]) == 2
    assert all(v is not None and np.isfinite(v) and v > 0 for v in logged[0])


def test_patience_ends_the_run_where_the_validation_loss_stopped_falling_and_a_resumed_run_too(cache, tmp_path):
    """train.patience: the run ends, saved, at the validation that makes `patience` in a row without a new
    lowest loss (replayed here from its own log); resumed from a checkpoint in the middle of such a row, it
    ends at the same step with the same weights, since the counters travel in the checkpoint."""
    def cfg(steps):   # a high rate and no EMA: the loss jumps about, so the row comes soon
        return _cfg("flow", {"width": 8, "mults": [1, 2], "lr": 0.05}, steps, val_every=2, patience=2, ema_decay=0.0)
    straight = imagegen.train(cfg(60), out=tmp_path / "a", progress=False)
    logged = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    best, since, stop, row_start = None, 0, None, None
    for line in logged:
        if "val_loss" not in line:
            continue
        if best is None or line["val_loss"] < best:
            best, since = line["val_loss"], 0
        else:
            since, row_start = since + 1, line["step"] if since == 0 else row_start
        if since == 2:
            stop = line["step"]
            break
    assert stop is not None and stop < 60 and logged[-1]["step"] == stop, (stop, logged[-1])
    assert int(load_checkpoint(list_checkpoints(straight)[-1])["state"]["step"]) == stop
    half = imagegen.train(cfg(row_start), out=tmp_path / "b", progress=False)   # one validation into the row
    resumed = imagegen.train(cfg(60), resume=half, progress=False)
    a, b = load_checkpoint(list_checkpoints(straight)[-1]), load_checkpoint(list_checkpoints(resumed)[-1])
    assert b["state"]["step"] == stop
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_patience_needs_a_validation_loss(cache, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2]},
                                   "data": {"source": f"folder:{folder}", "size": 16},
                                   "train": {**TRAIN, "steps": 2, "patience": 3}})
    with pytest.raises(ConfigError, match="train.patience .* held-out images"):
        imagegen.train(cfg, out=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_folder_has_a_validation_loss_only_with_data_held_out(cache, tmp_path, monkeypatch):
    """A folder's test split is its training images: nothing held out, nothing logged. With data.held_out
    its held-out share is measured, and those images are never trained on."""
    from imagegen import progress
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def cfg(held_out):
        return imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2]},
                                        "data": {"source": f"folder:{folder}", "size": 16, "held_out": held_out},
                                        "train": {**TRAIN, "steps": 2, "val_every": 2}})
    run = imagegen.train(cfg(0), out=tmp_path / "runs", progress=False)
    assert all("val_loss" not in json.loads(line) for line in (run / "log.jsonl").read_text().splitlines())
    loaded = []
    monkeypatch.setattr(progress, "load_data", lambda c: loaded.append(load_data(c)) or loaded[-1])
    run = imagegen.train(cfg(0.3), out=tmp_path / "runs", progress=False)
    logged = [json.loads(line).get("val_loss") for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged[-1] is not None and np.isfinite(logged[-1])
    train = load_data(DataConfig(source=f"folder:{folder}", size=16, held_out=0.3))
    held = loaded[0].images
    assert 0 < len(held) < 20 and len(train) == 20 - len(held)
    assert not any(torch.equal(h, t) for h in held for t in train.images)   # the validation images are not trained on


def test_the_flow_time_shift_follows_what_the_backbone_sees():
    """No shift up to 4,096 numbers (every 32 px image; 16 x 16 x 4 latents), sqrt(d / 4096) above, and the
    shifted times keep 0 and 1 and their order."""
    from imagegen.models.flow import Config, Flow
    assert Flow(Config(image_size=32, channels=3, width=8, mults=(1, 2))).shift == 1.0
    big = Flow(Config(image_size=64, channels=3, width=8, mults=(1, 2)))
    assert big.shift == pytest.approx(3 ** 0.5)
    assert Flow(Config(image_size=64, channels=3, width=8, mults=(1, 2), time_shift=2.5)).shift == 2.5
    t = torch.linspace(0, 1, 11)
    s = big.shifted(t)
    assert s[0] == 0 and s[-1] == 1 and bool((s.diff() > 0).all()) and bool((s[1:-1] < t[1:-1]).all())
    plan = big.plan(1, steps=4)
    assert plan.grid[0] == 0 and plan.grid[-1] == 1.0 and len(plan.grid) == 5 and plan.grid[1] < 0.25


def test_128_px_images_train_and_sample_on_latents_of_factor_4_and_8(cache, tmp_path):
    """128 px: the autoencoder at factor 8 gives 4 x 16 x 16 latents (no shift; the DiT takes patch 2, so
    64 tokens), at factor 4 with 8 channels 8 x 32 x 32 (shift sqrt(8,192 / 4,096)); both models sample
    128 px images, each seed's the same alone or in a batch."""
    data = {"source": "shapes", "limit": 32, "size": 128}
    for factor, channels, model, shift, tokens in ((8, 4, {"backbone": "dit", "dit_size": "xxs"}, 1.0, 64),
                                                   (4, 8, {"width": 8, "mults": [1, 2]}, 2 ** 0.5, None)):
        train = {**TRAIN, "batch_size": 8, "grid_size": 1}
        ae = imagegen.train(imagegen.resolve_config({
            "family": "ae", "model": {"width": 8, "critic_width": 8, "critic_start": 1, "factor": factor,
                                      "latent_channels": channels},
            "data": data, "train": {**train, "steps": 2}}), out=tmp_path / f"ae{factor}", progress=False)
        run = imagegen.load_run(imagegen.train(imagegen.resolve_config({
            "family": "flow", "model": {**model, "autoencoder": str(ae), "sample_steps": 2},
            "data": data, "train": {**train, "steps": 2}}), out=tmp_path / f"flow{factor}", progress=False))
        assert run.model.shift == pytest.approx(shift)
        if tokens:
            side = run.model.cfg.space[1]
            assert side == 16 and (side // run.model.cfg.patch_size) ** 2 == tokens
        batch = imagegen.generate(run.model, [3, 4, 5])
        assert batch.shape == (3, 3, 128, 128) and batch.abs().max() <= 1
        assert torch.equal(imagegen.generate(run.model, [4])[0], batch[1])


def test_a_flow_saved_before_the_time_shift_loads_without_one(tmp_path):
    """A 64 px flow trained before model.time_shift existed learned unshifted times: its config.json, which
    has no such key, loads as time_shift 1, not as 0 ("by size", 1.73 here), which would move its solver grid."""
    cfg = imagegen.resolve_config({"family": "flow", "model": {"width": 8, "mults": [1, 2]},
                                   "data": {"source": "shapes", "limit": 16, "size": 64},
                                   "train": {"steps": 1, "batch_size": 4, "sample_every": 0, "grid_size": 4}})
    run = imagegen.train(cfg, out=tmp_path, progress=False)
    assert load_run(run).model.shift == pytest.approx(3 ** 0.5)
    saved = json.loads((run / "config.json").read_text())
    del saved["model"]["time_shift"]
    (run / "config.json").write_text(json.dumps(saved))
    assert load_run(run).model.shift == 1.0


def test_the_server_serves_a_latent_run_and_says_why_not_its_autoencoder(runs, tmp_path):
    from fastapi.testclient import TestClient
    from imagegen.serve import create_app
    root = tmp_path / "served"
    for name in ("ae", "flow"):
        shutil.copytree(runs[name], root / name)
    said = []
    with TestClient(create_app(root, log=said.append), raise_server_exceptions=False, base_url=LOCAL) as client:
        names = [m["name"] for m in client.get("/api/models").json()]
        assert names == ["flow"]
        assert any("ae" in line and "draws no images" in line for line in said)
        r = client.post("/api/generate", json={"model": "flow", "seed": 3, "label": "circle", "steps": 2})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = client.post("/api/vary", json={"model": "flow", "source": 3, "seed": 1, "n": 2, "label": "circle",
                                           "steps": 2, "strength": 0.5})
        assert r.status_code == 200, r.text
