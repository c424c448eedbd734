"""The consistency family (models/consistency.py): its parametrisation's boundary condition, the iCT
curriculum and noise-level distribution, a stopped-gradient teacher, a sampler that is f itself, learning
a simple distribution, inpainting and editing, export, and what the front ends pick up from its file alone
(the CLI's options, the HTTP API's bounds and /api/models, the studio's families)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import imagegen
from imagegen.errors import ConfigError
from imagegen.models.base import per_item_normal
from imagegen.models.consistency import SIGMA_MAX, SIGMA_MIN, Config, Consistency, karras_sigmas
from imagegen.sample import seed_generators

from conftest import LOCAL, run_main, run_maker

VARIANTS = {"unet": ("consistency", {"width": 8, "mults": [1, 2], "sample_steps": 2})}   # the DiT: test_families.py


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, VARIANTS, steps=6)


def tiny(**kw) -> Consistency:
    torch.manual_seed(0)
    return Consistency(Config(**{"image_size": 8, "channels": 1, "width": 8, "mults": (1, 2), **kw}))


def test_f_is_the_identity_at_sigma_min_and_mostly_the_network_at_sigma_max():
    model = tiny()
    for p in model.net.parameters():       # a network whose output is not zero (backbones start at zero)
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.consistency(x, torch.full((3,), SIGMA_MIN), None, []), x)   # c_skip 1, c_out 0
        c_skip, c_out, c_in, c_noise = model.scalings(torch.tensor([SIGMA_MIN, SIGMA_MAX]))
    assert c_skip[1].item() < 1e-4 and c_out[1].item() == pytest.approx(0.5, rel=1e-3)
    assert c_noise.tolist() == pytest.approx([0.0, 1000.0])


def test_the_curriculum_doubles_from_min_to_max_intervals_over_its_steps():
    model = tiny(min_intervals=10, max_intervals=1280, curriculum_steps=8000)   # 8 phases of 1000 updates
    assert [model.intervals(k) for k in (0, 999, 1000, 2999, 3000, 7000, 10**6)] == [10, 10, 20, 40, 80, 1280, 1280]
    levels = karras_sigmas(11)
    assert levels[0] == pytest.approx(SIGMA_MAX) and levels[-1] == pytest.approx(SIGMA_MIN)
    assert all(a > b for a, b in zip(levels, levels[1:]))


def test_training_levels_follow_the_lognormal():
    model = tiny()
    sigmas = torch.tensor(karras_sigmas(641)[::-1], dtype=torch.float64)
    i = model.draw_intervals(20_000, sigmas, torch.Generator().manual_seed(0))
    log_mid = ((sigmas[i].log() + sigmas[i + 1].log()) / 2).float()
    # ln sigma ~ N(-1.1, 2.0) cut to [ln sigma_min, ln sigma_max]: the cut moves the mean up a little
    assert abs(log_mid.median().item() + 1.1) < 0.1 and abs(log_mid.std().item() - 2.0) < 0.25


def test_one_update_runs_the_network_twice_and_only_the_upper_level_has_a_gradient():
    model = tiny()
    opt = model.configure_optimizers(None)
    modes = []
    model.net.register_forward_pre_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    out = model.train_step({"image": torch.rand(4, 1, 8, 8) * 2 - 1}, opt, torch.Generator().manual_seed(0))
    assert modes == [False, True] and math.isfinite(out["loss"]) and out["curriculum"] == 10
    assert int(model.updates) == 1


def test_one_step_sample_is_f_of_sigma_max_noise_and_a_second_step_renoises():
    model = tiny()
    for p in model.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    z = per_item_normal(2, (1, 8, 8), seed_generators([3, 4]), "cpu")
    with torch.no_grad():
        want = model.consistency(SIGMA_MAX * z, torch.full((2,), SIGMA_MAX), None, []).clamp(-1, 1)
    torch.testing.assert_close(model.sample(2, generator=seed_generators([3, 4]), steps=1), want, atol=1e-5, rtol=0)
    two = model.sample(2, generator=seed_generators([3, 4]), steps=2)
    assert not torch.equal(two, want) and model.sigmas(2) == pytest.approx([SIGMA_MAX, model.cfg.mid_sigma])
    with pytest.raises(ConfigError, match="steps must be in 1..64"):
        model.sample(1, steps=65)


@pytest.mark.trained
def test_it_learns_a_two_point_distribution():
    """Half the images all -0.6, half all +0.6: after 300 updates, two steps from fresh noise land near one
    of the two, both of them drawn, and one step is far nearer than the untrained network (about 0
    everywhere). How the draws split between the two is not settled after 300 updates: rounding alone
    (one torch thread or two) moves the smaller mode's share between 13% and 20% of 512 draws, and
    which mode is the smaller, so "both drawn" asks for 1% of 512 each."""
    model = tiny(min_intervals=4, max_intervals=32, curriculum_steps=200, label_dropout=0.0)
    opt = model.configure_optimizers(None)

    def distance(images):   # each image's mean distance to the nearer of the two points
        return torch.minimum((images - 0.6).abs(), (images + 0.6).abs()).mean(dim=(1, 2, 3))

    before = distance(model.sample(64, generator=seed_generators(range(64)), steps=1)).mean()
    gen = torch.Generator().manual_seed(1)
    for step in range(300):
        sign = torch.randint(2, (32, 1, 1, 1), generator=gen) * 2 - 1
        model.train_step({"image": 0.6 * sign.float().expand(32, 1, 8, 8)}, opt, torch.Generator().manual_seed(step))
    one = distance(model.sample(64, generator=seed_generators(range(64)), steps=1)).mean()
    two = model.sample(512, generator=seed_generators(range(512)), steps=2)
    assert before > 0.5 and one < before - 0.15, (before, one)
    assert distance(two).mean() < 0.2, distance(two)
    means = two.mean(dim=(1, 2, 3))
    assert (means > 0.3).sum() >= 5 and (means < -0.3).sum() >= 5    # both modes, not one


@pytest.mark.rounding
def test_inpainting_keeps_the_known_pixels_exactly_and_edits_stay_near_the_image(runs):
    model = imagegen.load_run(runs("unet")).model
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    out = model.inpaint(image, mask, labels=torch.tensor([0, 1]), generator=seed_generators([1, 2]))
    assert torch.equal(out[..., :8, :], image[..., :8, :]) and not torch.equal(out[..., 8:20, 8:20], image[..., 8:20, 8:20])
    # outpainting: a canvas of another size
    wide = model.inpaint(torch.zeros(1, 3, 32, 48), torch.ones(1, 1, 32, 48), labels=torch.tensor([0]),
                         generator=seed_generators([1]))
    assert wide.shape == (1, 3, 32, 48)
    near = model.edit(image, 0.05, labels=torch.tensor([0, 1]), generator=seed_generators([1, 2]))
    far = model.edit(image, 1.0, labels=torch.tensor([0, 1]), generator=seed_generators([1, 2]))
    assert (near - image.clamp(-1, 1)).abs().mean() < 0.5 * (far - image).abs().mean()


@pytest.mark.trained
def test_the_exported_graph_is_f_and_one_call_gives_the_one_step_image(runs, tmp_path):
    """The graph wraps the backbone's call (exported for both backbones by test_export.py) in f's scalings."""
    ort = pytest.importorskip("onnxruntime")
    from imagegen.export import export_onnx
    run = imagegen.load_run(runs("unet"))
    done = export_onnx(run, tmp_path / "c.onnx")
    labels = torch.tensor([1, 0, 2])
    want = run.model.sample(3, labels=labels, generator=seed_generators([4, 5, 6]), steps=1, guidance=1.0)
    z = per_item_normal(3, (3, 32, 32), seed_generators([4, 5, 6]), "cpu")
    sess = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": (SIGMA_MAX * z).numpy(), "time": np.full(3, SIGMA_MAX, np.float32),
                          "label": labels.numpy()})[0]
    assert np.abs(np.clip(got, -1, 1) - want.numpy()).max() <= 1e-4 and want.std() > 0.01


def test_the_front_ends_pick_the_family_up_from_its_file(runs, tmp_path):
    """Nothing outside models/consistency.py names the family: the CLI takes its options, the server
    lists it with its own controls and checks its own range, the studio offers to train it."""
    from fastapi.testclient import TestClient
    from imagegen.serve import create_app
    from imagegen.serve.jobs import TRAIN_FAMILIES
    run = runs("unet")
    assert run_main("sample", run, "--seeds", "0-3", "--steps", "2", "--out", tmp_path / "s").returncode == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 4
    refused = run_main("sample", run, "--seeds", "0", "--solver", "heun", "--out", tmp_path / "t")
    assert refused.returncode != 0 and "--solver does not apply to a consistency model" in refused.stderr
    assert "consistency" in TRAIN_FAMILIES
    with TestClient(create_app(run.parent, log=None), raise_server_exceptions=False, base_url=LOCAL) as client:
        (info,) = client.get("/api/models").json()
        assert info["family"] == "consistency" and info["inpaints"] and info["varies"]
        assert info["options"]["steps"] == {"help": info["options"]["steps"]["help"], "min": 1, "max": 8, "step": 1,
                                            "value": 1, "choices": None}
        assert set(info["options"]) == {"steps", "guidance"}
        ok = client.post("/api/generate", json={"model": info["name"], "seed": 3, "steps": 2})
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
        assert "--steps 2" in ok.headers["X-Imagegen-Command"]
        too_many = client.post("/api/generate", json={"model": info["name"], "steps": 65})   # the family's own range
        assert too_many.status_code == 400 and "steps must be in 1..64" in too_many.json()["detail"]
        assert client.post("/api/generate", json={"model": info["name"], "eta": 0.5}).status_code == 400
        assert "consistency" in client.get("/api/train/families").json()
