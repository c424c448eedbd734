"""The onnxruntime sampling engine (imagegen/engine.py): every kind of network samples through it with
each seed's image independent of its batch, within rounding of torch; it follows weight changes; the CLI
takes --engine.

Not marked `rounding`: the second pass of `make test` lowers the instruction set of torch's libraries
(ATen, oneDNN, MKL), which onnxruntime does not read. On any CPU, run_fixed_batch's checks
(exact_rows, wide_rows) hold the promise under this engine as under torch."""

from __future__ import annotations

import copy
import io
import shlex
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.cli import main
from imagegen.runtime.engine import engine_of, use_engine
from imagegen.errors import ConfigError
from imagegen.models.base import adam
from imagegen.sample import generate

from conftest import LOCAL, run_maker
from test_cyclegan import cg_config
from test_families import family_config

# Within rounding of torch: the export check's tolerance, 1e-4, with room for a few sampler steps.
CLOSE = 1e-3

pytestmark = pytest.mark.filterwarnings("ignore")


def _labels(model, seeds):
    return torch.tensor(seeds) % model.num_classes if model.conditional else None


def _check_engine_draws_like_torch_at_any_batch(model, draw):
    """draw(model, seeds, batch_size) -> images. Under onnxruntime: close to torch, and each seed's image
    the same bits alone, in a batch, and in a batch that starts elsewhere."""
    seeds = list(range(20))
    want = draw(model, seeds, 64)
    use_engine(model, "onnxruntime")
    assert engine_of(model) == "onnxruntime"
    got = draw(model, seeds, 64)
    assert got.shape == want.shape and (got - want).abs().max() <= CLOSE
    assert not torch.equal(got, torch.zeros_like(got))
    alone = torch.cat([draw(model, [s], 1) for s in (0, 3, 19)])
    assert torch.equal(alone, got[[0, 3, 19]])
    assert torch.equal(draw(model, seeds[7:], 5), got[7:])


# One of each kind of network: a GAN generator with and without labels, a VAE decoder with labels, the
# U-Net and the DiT under their samplers with guidance. (The others share these graphs' operators.)
@pytest.mark.parametrize("family", ["cgan", "cvae", "dcgan", "ddpm-dit", "flow"])
def test_each_family_samples_through_onnxruntime_alike_at_any_batch(family, tmp_path):
    model = imagegen.load_run(imagegen.train(family_config(family, 2), out=tmp_path, progress=False)).model
    _check_engine_draws_like_torch_at_any_batch(
        model, lambda m, seeds, b: generate(m, seeds, labels=_labels(m, seeds), batch_size=b))


@pytest.fixture(scope="module")
def teachers(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, {"flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 2})},
                     steps=2)


def test_a_distilled_student_samples_through_onnxruntime(teachers, tmp_path):
    from imagegen.distill import distill
    overrides = ["model.width=8", "model.mults=[1, 2]", "train.batch_size=8", "train.sample_every=0",
                 "train.checkpoint_every=2"]
    run = distill(teachers("flow"), steps=1, out=tmp_path, pairs=16, train_steps=2, overrides=overrides, progress=False)
    model = imagegen.load_run(run).model
    _check_engine_draws_like_torch_at_any_batch(
        model, lambda m, seeds, b: generate(m, seeds, labels=_labels(m, seeds), batch_size=b))


def test_cyclegan_translates_through_onnxruntime(tmp_path):
    model = imagegen.load_run(imagegen.train(cg_config(2), out=tmp_path, progress=False)).model
    gen = torch.Generator().manual_seed(0)
    s = model.cfg.image_size
    images = torch.rand(20, model.cfg.channels, s, s, generator=gen) * 2 - 1
    _check_engine_draws_like_torch_at_any_batch(model, lambda m, seeds, b: m.translate(images[seeds]))


def test_a_text_model_with_its_layout_prior_samples_through_onnxruntime(tmp_path, private_cache):
    from test_grounding import _cfg
    # Two solver steps: the engine runs the same graph at every step, and two show the state carried over.
    model = imagegen.load_run(imagegen.train(_cfg(2, sample_steps=2), out=tmp_path, progress=False)).model
    assert model.layout_prior is not None
    prompts = ["a red star left of a blue circle", "two green squares"]
    _check_engine_draws_like_torch_at_any_batch(
        model, lambda m, seeds, b: generate(m, seeds, batch_size=b, prompts=[prompts[s % 2] for s in seeds]))


def test_the_engine_exports_again_after_the_weights_change(tmp_path):
    model = imagegen.load_run(imagegen.train(family_config("dcgan", 2), out=tmp_path, progress=False)).model
    use_engine(model, "onnxruntime")
    before = generate(model, [0, 1])

    def torch_of(m):
        return generate(use_engine(copy.deepcopy(m), "torch"), [0, 1])

    # an in-place change (a new version), then a fused Adam step (the version stays the same)
    with torch.no_grad():
        next(model.G.parameters()).mul_(1.5)
    changed = generate(model, [0, 1])
    assert not torch.equal(changed, before) and (changed - torch_of(model)).abs().max() <= CLOSE
    params = [p.requires_grad_() for p in model.G.parameters()]   # a loaded run's are frozen
    versions = [p._version for p in params]
    opt = adam(params, 0.1, (0.5, 0.999))
    with torch.enable_grad():   # in eval mode, so that no batch-norm statistics change: only the step does
        model.G(torch.randn(4, model.cfg.z_dim)).square().mean().backward()
    opt.step()
    assert all(p._version == v for p, v in zip(params, versions)), "a fused step leaves the versions alone"
    stepped = generate(model, [0, 1])
    assert not torch.equal(stepped, changed) and (stepped - torch_of(model)).abs().max() <= CLOSE


def test_an_unknown_engine_is_refused_by_name(tiny_run, tmp_path, capsys):
    model = imagegen.load_run(tiny_run).model
    with pytest.raises(ConfigError, match="tensorrt"):
        use_engine(model, "tensorrt")
    assert main(["sample", str(tiny_run), "--seeds", "0", "--out", str(tmp_path), "--engine", "tensorrt"]) == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_sample_with_the_onnxruntime_engine_differs_from_torch_by_rounding_at_most(tiny_run, tmp_path):
    for engine in ("torch", "onnxruntime"):
        assert main(["sample", str(tiny_run), "--seeds", "0-5", "--out", str(tmp_path / engine), "--engine", engine]) == 0
    for k in range(6):
        a, b = (np.asarray(Image.open(tmp_path / e / f"seed{k:06d}.png"), dtype=int) for e in ("torch", "onnxruntime"))
        assert np.abs(a - b).max() <= 1


def test_the_server_samples_with_its_engine_and_its_command_gives_the_same_pixels(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from imagegen.serve import create_app
    shutil.copytree(tiny_run, tmp_path / "runs" / "gan")
    with TestClient(create_app(tmp_path / "runs", log=None, engine="onnxruntime"), base_url=LOCAL) as c:
        r = c.post("/api/generate", json={"model": "gan", "seed": 5})
    assert r.status_code == 200
    command = shlex.split(r.headers["X-Imagegen-Command"])
    assert command[command.index("--engine") + 1] == "onnxruntime"
    out = command.index("--out")
    command[out + 1] = str(tmp_path / "cli")
    assert main(command[1:]) == 0
    page = np.asarray(Image.open(io.BytesIO(r.content)))
    assert np.array_equal(page, np.asarray(Image.open(tmp_path / "cli" / "seed000005.png")))
    with pytest.raises(ConfigError, match="tensorrt"):
        create_app(tmp_path / "runs", log=None, engine="tensorrt")
