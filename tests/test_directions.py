"""Principal latent directions (GANSpace) for GANs and VAEs: the studio's sliders and `sample --directions`
(issue 17): what the construction guarantees, the same pixels from the page, the API and the command."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.directions import direction_shift, principal_directions
from imagegen.errors import ConfigError

from conftest import LOCAL, chromium, fetched, live_server, run_main, run_maker

VARIANTS = {
    "dcgan": ("dcgan", {"width": 8, "z_dim": 16}),
    "cgan": ("cgan", {"width": 8, "z_dim": 16}),
    "vae": ("vae", {"z_dim": 8, "width": 8}),
    "cvae": ("cvae", {"z_dim": 8, "width": 8}),
    "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 2}),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, VARIANTS, steps=20)


def _early(model, z):
    net, call, early = model.latent_network()
    seen = []
    hook = early.register_forward_hook(lambda _m, _i, out: seen.append(out.flatten(1).clone()))
    labels = torch.zeros(len(z), dtype=torch.long) if model.conditional else None
    with torch.no_grad():
        model.eval()
        call(z, labels)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("variant", ["dcgan", "cgan", "vae", "cvae"])
def test_directions_are_unit_deterministic_ordered_and_move_the_early_features_most(runs, variant):
    model = imagegen.load_run(runs(variant)).model
    dirs, explained = principal_directions(model, 4)
    again, _ = principal_directions(imagegen.load_run(runs(variant)).model, 2)   # a fresh copy, fewer asked
    assert torch.equal(dirs[:2], again)
    assert torch.allclose(dirs.norm(dim=1), torch.ones(4), atol=1e-5)
    assert (explained[:-1] >= explained[1:]).all() and explained.sum() < 1
    # Direction 0 is fitted (least squares over the construction's latents) as the latent direction most
    # correlated with the early features' top principal coordinate; on fresh latents it still is, far
    # above random directions (which carry about 1 / sqrt(z_dim) of it).
    z = model.draw_noise(512, imagegen.sample.seed_generators(range(1000, 1512)))
    y = _early(model, z)
    y = y - y.mean(0)
    x0 = y @ torch.linalg.svd(y, full_matrices=False)[2][0]                  # the top principal coordinate

    def corr(direction):
        return torch.corrcoef(torch.stack([z @ direction, x0]))[0, 1].abs()
    rand = torch.randn(20, z.shape[1], generator=torch.Generator().manual_seed(0))
    others = torch.stack([corr(r / r.norm()) for r in rand])
    # seen: 0.83, 0.80, 0.33, 0.64 for dcgan, cgan, vae, cvae, against medians of 0.21, 0.16, 0.11, 0.25
    assert corr(dirs[0]) > 2 * others.median(), (corr(dirs[0]), others)


def test_the_command_gives_the_directions_pixels_and_bad_values_are_refused(runs, tmp_path):
    run_dir = runs("dcgan")
    model = imagegen.load_run(run_dir).model
    r = run_main("sample", run_dir, "--seeds", "0-2", "--directions", "1.5,0,-2", "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    want = imagegen.sample.to_uint8(imagegen.generate(model, [0, 1, 2], latent=direction_shift(model, [1.5, 0, -2])))
    plain = imagegen.sample.to_uint8(imagegen.generate(model, [0, 1, 2]))
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "d" / f"seed{i:06d}.png")).reshape(want[i].shape)
        assert np.array_equal(got, want[i]) and not np.array_equal(got, plain[i])
    for args, message in ((["--directions", "9"], "[-5, 5]"), (["--directions", "x"], "--directions"),
                          (["--directions", ",".join(["1"] * 9)], "at most 8"),
                          (["--directions", "1", "--latent", "1"], "not both")):
        r = run_main("sample", run_dir, "--seeds", "0", "--out", tmp_path / "e", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    with pytest.raises(ConfigError, match="no latent space"):
        direction_shift(imagegen.load_run(runs("flow")).model, [1.0])


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for variant in ("dcgan", "flow"):
        (root / variant).symlink_to(runs(variant).resolve())
    return root


def test_the_api_moves_along_directions_with_a_command_that_reproduces_it(runs, served, tmp_path):
    from fastapi.testclient import TestClient

    from imagegen.serve import create_app
    client = TestClient(create_app(served, log=None), base_url=LOCAL)
    r = client.post("/api/generate", json={"model": "dcgan", "seed": 4, "directions": [0.7, -1.2]})
    assert r.status_code == 200, r.text
    command = r.headers["X-Imagegen-Command"].split()
    assert command[command.index("--directions") + 1] == "0.7,-1.2"
    done = run_main(*command[1:command.index("--out")], "--out", tmp_path / "c")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c" / "seed000004.png").read_bytes() == r.content
    info = client.post("/api/directions", json={"model": "dcgan", "k": 3}).json()
    assert info["k"] == 3 and len(info["explained"]) == 3 and info["z_dim"] == 16
    strip = client.post("/api/direction-strip", json={"model": "dcgan", "index": 1, "seed": 4, "frames": 5})
    assert strip.status_code == 200
    tiles = np.asarray(Image.open(io.BytesIO(strip.content)))
    side = imagegen.load_run(runs("dcgan")).model.cfg.image_size
    middle = tiles[2:2 + side, 2 + 2 * (side + 2): 2 + 2 * (side + 2) + side]
    own = imagegen.sample.to_uint8(imagegen.generate(imagegen.load_run(runs("dcgan")).model, [4]))[0]
    assert np.array_equal(middle.reshape(own.shape), own)                  # the middle frame is the seed itself
    for path, body, status, message in (
            ("/api/generate", {"model": "dcgan", "directions": [6.0]}, 400, "[-5, 5]"),
            ("/api/generate", {"model": "dcgan", "directions": [1.0], "latent": [1.0]}, 400, "not both"),
            ("/api/generate", {"model": "flow", "directions": [1.0]}, 400, "no latent space"),
            ("/api/directions", {"model": "flow"}, 400, "no latent space"),
            ("/api/direction-strip", {"model": "dcgan", "index": 8}, 422, "index")):
        r = client.post(path, json=body)
        assert r.status_code == status and message in r.json()["detail"], (path, body, r.text)


def test_the_page_has_direction_sliders_with_strips_and_its_command_gives_its_pixels(runs, served, tmp_path):
    with live_server(served) as port, chromium() as context:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 2")
        page.select_option("#model", "dcgan")
        page.fill("#seed", "6")
        page.wait_for_function("[0, 1, 2, 3].every(i => document.getElementById('strip-' + i)"
                               " && document.getElementById('strip-' + i).complete"
                               " && document.getElementById('strip-' + i).naturalWidth > 0)")
        assert "%" in page.inner_text("#sliders")                              # each labelled with its share
        page.evaluate("() => { const s = document.getElementById('z-1'); s.value = '1.5'; s.dispatchEvent(new Event('input')); }")
        page.wait_for_function("document.getElementById('command').textContent.includes('--directions 0.0,1.5,0.0,0.0')"
                               " && document.getElementById('image').complete")
        command = page.inner_text("#command")
        shown = fetched(page, "document.getElementById('image').src")
    parts = command.split()
    done = run_main(*parts[1:parts.index("--out")], "--out", tmp_path / "p")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p" / "seed000006.png").read_bytes() == shown
