"""Variations ("more like this") and breeding: imagegen.vary / imagegen.breed and `imagegen vary` /
`imagegen breed` (issue 17): what each mechanism guarantees, seed-to-pixels at any batch size, the CLI
giving the library's pixels, and clear errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.errors import ConfigError
from imagegen.sample import to_uint8

from conftest import LOCAL, chromium, fetched, live_server, run_main, run_maker

VARIANTS = {   # on shapes: the diffusion families and the CVAE are class-conditional, the DCGAN and VAE not
    "dcgan": ("dcgan", {"width": 8, "z_dim": 16}),
    "vae": ("vae", {"z_dim": 8, "width": 8}),
    "cvae": ("cvae", {"z_dim": 8, "width": 8}),
    "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 4}),
    "ddpm": ("ddpm", {"width": 8, "mults": [1, 2], "sample_steps": 4}),
    "random": ("random", {}),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, VARIANTS, steps=6)


def _model(runs, variant):
    return imagegen.load_run(runs(variant)).model


@pytest.mark.parametrize("variant", ["dcgan", "vae", "cvae", "flow", "ddpm"])
def test_a_variation_depends_only_on_its_seed_and_small_strengths_stay_close(runs, variant):
    model = _model(runs, variant)
    seeds = [0, 1, 2, 3, 4]
    together = imagegen.vary(model, 7, seeds, strength=0.5)
    alone = torch.cat([imagegen.vary(model, 7, [s], strength=0.5, batch_size=1) for s in seeds])
    assert torch.equal(together, alone)                                       # any batch size, same pixels
    assert together.shape == (5, model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
    assert together.min() >= -1 and together.max() <= 1
    source = imagegen.generate(model, [7], labels=torch.tensor([7 % model.num_classes]) if model.conditional else None)
    near = (imagegen.vary(model, 7, seeds, strength=0.05) - source).abs().mean()
    far = (imagegen.vary(model, 7, seeds, strength=1.0) - source).abs().mean()
    assert near < 0.5 * far, (near, far)
    assert not torch.equal(together[0], together[1])                          # the seeds differ


@pytest.mark.parametrize("variant", ["dcgan", "vae", "flow"])
def test_strength_one_is_the_seeds_own_image(runs, variant):
    """Latent families turn the source's latent all the way to the seed's; flow starts from the seed's
    pure noise: both are exactly what `generate` gives for that seed. (DDPM's last timestep keeps a
    trace of the image, so it is not exact there.)"""
    model = _model(runs, variant)
    labels = torch.tensor([7 % model.num_classes] * 3) if model.conditional else None
    assert torch.equal(imagegen.vary(model, 7, [3, 4, 5], strength=1.0),
                       imagegen.generate(model, [3, 4, 5], labels=labels))


@pytest.mark.parametrize("variant", ["dcgan", "vae", "flow", "ddpm"])
def test_breeding_at_mix_zero_is_varying_the_first_parent_and_the_mix_matters(runs, variant):
    model = _model(runs, variant)
    assert torch.equal(imagegen.breed(model, [3, 9], [0, 1], strength=0.4, mix=0.0),
                       imagegen.vary(model, 3, [0, 1], strength=0.4))
    half = imagegen.breed(model, [3, 9], [0, 1], strength=0.4, mix=0.5)
    assert not torch.equal(half, imagegen.breed(model, [3, 9], [0, 1], strength=0.4, mix=1.0))


@pytest.mark.parametrize("variant", ["vae", "flow", "ddpm"])
def test_an_image_file_can_be_varied_by_families_that_can_read_one(runs, variant):
    """A sketch: a flat square of colour. Diffusion and flow re-noise its pixels (SDEdit); a VAE starts
    from its posterior mean. At low strength the result keeps the sketch's layout."""
    model = _model(runs, variant)
    s, c = model.cfg.image_size, model.cfg.channels
    sketch = -torch.ones(1, c, s, s)
    sketch[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 0.8
    out = imagegen.vary(model, sketch, [0, 1, 2], strength=0.2)
    assert torch.equal(out[1:2], imagegen.vary(model, sketch, [1], strength=0.2))
    if variant != "vae":   # SDEdit keeps most of the pixels at strength 0.2; a 6-step VAE need not
        inside, outside = out[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4].mean(), out[..., :s // 8, :].mean()
        assert inside > outside + 0.5, (inside, outside)


def test_what_cannot_be_varied_is_refused_clearly(runs):
    dcgan, random = _model(runs, "dcgan"), _model(runs, "random")
    s = dcgan.cfg.image_size
    with pytest.raises(ConfigError, match="no encoder"):
        imagegen.vary(dcgan, torch.zeros(1, dcgan.cfg.channels, s, s), [0], strength=0.5)
    with pytest.raises(ConfigError, match="cannot make variations"):
        imagegen.vary(random, 0, [0], strength=0.5)
    with pytest.raises(ConfigError, match="strength"):
        imagegen.vary(dcgan, 0, [0], strength=0.0)
    with pytest.raises(ConfigError, match="mix"):
        imagegen.breed(dcgan, [0, 1], [0], strength=0.5, mix=1.5)
    with pytest.raises(ConfigError, match="takes no --prompt"):
        imagegen.vary(dcgan, 0, [0], strength=0.5, prompt="a red circle")
    flow = _model(runs, "flow")
    with pytest.raises(ConfigError, match="1 x 1 x 16 x 16|1 x 3 x"):
        imagegen.vary(flow, torch.zeros(1, flow.cfg.channels, s + 4, s + 4), [0], strength=0.5)


@pytest.mark.parametrize("variant", ["dcgan", "flow"])
def test_the_commands_give_the_librarys_pixels(runs, variant, tmp_path):
    run_dir = runs(variant)
    model = imagegen.load_run(run_dir).model
    r = run_main("vary", str(run_dir), "--seed", "7", "--strength", "0.3", "--seeds", "0-2", "--out", str(tmp_path / "v"),
                 "--grid", str(tmp_path / "v.png"))
    assert r.returncode == 0, r.stderr
    want = to_uint8(imagegen.vary(model, 7, [0, 1, 2], strength=0.3))
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "v" / f"seed{i:06d}.png"))
        assert np.array_equal(got.reshape(want[i].shape), want[i])
    assert (tmp_path / "v.png").is_file()
    r = run_main("breed", str(run_dir), "--parents", "3,9", "--mix", "0.25", "--strength", "0.6", "--seeds", "4",
                 "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    want = to_uint8(imagegen.breed(model, [3, 9], [4], strength=0.6, mix=0.25))[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "seed000004.png")).reshape(want.shape), want)
    Image.fromarray(want.squeeze()).save(tmp_path / "mine.png")            # an image file as the source
    r = run_main("vary", str(run_dir), "--image", str(tmp_path / "mine.png"), "--seeds", "0", "--out", str(tmp_path / "f"))
    assert (r.returncode == 0) == (variant == "flow"), r.stderr
    if variant == "dcgan":
        assert "no encoder" in r.stderr


def test_the_commands_refuse_bad_arguments(runs, tmp_path):
    run_dir = str(runs("dcgan"))
    for args, message in ((["vary", run_dir, "--out", str(tmp_path)], "--seed S"),
                          (["breed", run_dir, "--parents", "3", "--out", str(tmp_path)], "two parents"),
                          (["vary", run_dir, "--seed", "1", "--strength", "2", "--out", str(tmp_path)], "strength"),
                          (["vary", run_dir, "--image", str(tmp_path / "none.png"), "--out", str(tmp_path)], "none.png")):
        r = run_main(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
    """A runs folder holding the dcgan, flow and random runs (symlinked)."""
    root = tmp_path_factory.mktemp("served")
    for variant in ("dcgan", "flow", "random"):
        (root / variant).symlink_to(runs(variant).resolve())
    return root


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    from imagegen.serve import create_app
    return TestClient(create_app(served, log=None), base_url=LOCAL)


@pytest.mark.parametrize("body", [{"model": "flow", "source": 7, "seed": 2, "n": 3, "strength": 0.3, "steps": 3},
                                  {"model": "dcgan", "source": 3, "parent": 9, "mix": 0.2512345678, "seed": 0, "n": 2,
                                   "strength": 0.6123456789}], ids=["vary-flow", "breed-dcgan"])   # all digits kept
def test_the_vary_route_gives_the_librarys_pixels_and_a_command_that_reproduces_them(client, runs, body, tmp_path):
    r = client.post("/api/vary", json=body)
    assert r.status_code == 200, r.text
    model = imagegen.load_run(runs(body["model"])).model
    parents = [body["source"]] + ([body["parent"]] if "parent" in body else [])
    seeds = list(range(body["seed"], body["seed"] + body["n"]))
    opts = {"steps": body["steps"]} if "steps" in body else {}
    want = imagegen.breed(model, parents, seeds, strength=body["strength"], mix=body.get("mix", 0.5), **opts)
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    assert np.array_equal(got, np.asarray(imagegen.sample.grid(want)))
    command = r.headers["X-Imagegen-Command"].split()
    assert command[:2] == ["imagegen", "breed" if "parent" in body else "vary"]
    out = tmp_path / "cmd"
    done = run_main(*command[1:command.index("--out")], "--out", str(out))
    assert done.returncode == 0, done.stderr
    for i, s in enumerate(seeds):
        png = np.asarray(Image.open(out / f"seed{s:06d}.png"))
        assert np.array_equal(png.reshape(to_uint8(want[i:i + 1])[0].shape), to_uint8(want[i:i + 1])[0])


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope", "source": 1}, 404, "unknown model"),
    ({"model": "random", "source": 1}, 400, "cannot make variations"),
    ({"model": "dcgan", "source": 1, "strength": 0}, 422, "strength"),
    ({"model": "dcgan", "source": 1, "mix": 2}, 422, "mix"),
    ({"model": "dcgan", "source": 1, "latent": [1.0]}, 400, "latent"),
    ({"model": "dcgan", "source": 1, "prompt": "a red circle"}, 400, "takes no prompt"),
    ({"model": "flow", "source": 1, "n": 64, "steps": 100}, 400, "image-steps"),
    ({"model": "dcgan", "source": 1, "typo": 1}, 422, "typo"),
])
def test_the_vary_route_refuses_bad_requests_with_a_4xx_that_names_the_problem(client, body, status, message):
    r = client.post("/api/vary", json=body)
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_the_page_varies_and_breeds_the_image_on_screen_and_its_command_gives_the_same_pixels(served, runs, tmp_path):
    with live_server(served) as port, chromium() as context:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.select_option("#model", "random")
        page.wait_for_selector("#vary-panel", state="hidden")                   # the baseline cannot vary
        page.select_option("#model", "flow")
        page.wait_for_selector("#vary-panel", state="visible")
        page.fill("#seed", "7")
        page.wait_for_function("document.getElementById('command').textContent.includes('--seeds 7 ')")
        page.evaluate("() => { const s = document.getElementById('strength'); s.value = '0.3';"
                      " s.dispatchEvent(new Event('input')); }")
        page.fill("#vary-seed", "2")
        shown = []
        for parent in ("", "9"):
            page.fill("#parent", parent)
            page.click("#vary")
            page.wait_for_function("document.getElementById('vary-command').textContent.includes("
                                   + ("'--parents 7,9'" if parent else "'--seed 7 '") + ")"
                                   " && document.getElementById('variations').complete")
            data = fetched(page, "document.getElementById('variations').src")
            shown.append((page.inner_text("#vary-command"), data))
        assert page.is_hidden("#error")
    model = imagegen.load_run(runs("flow")).model
    for i, (command, data) in enumerate(shown):
        parts = command.split()
        assert "--strength 0.3" in command and "--seeds 2-9" in command
        out = tmp_path / f"c{i}"
        done = run_main(*parts[1:parts.index("--out")], "--out", str(out))
        assert done.returncode == 0, done.stderr
        files = torch.stack([torch.from_numpy(np.asarray(Image.open(out / f"seed{s:06d}.png")).copy()).permute(2, 0, 1)
                             for s in range(2, 10)])
        page_png = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(page_png, np.asarray(imagegen.sample.grid(imagegen.sample.to_float(files))))
    assert shown[0][1] != shown[1][1]
    # the page's class menu starts at the first class, and its option controls at 20 steps, guidance 1.5
    assert f"--labels {imagegen.load_run(runs('flow')).classes[0]}" in shown[0][0]
    assert "--steps 20 --guidance 1.5 --solver heun" in shown[0][0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown[0][1]))),
                          np.asarray(imagegen.sample.grid(imagegen.vary(
                              model, 7, range(2, 10), strength=0.3, labels=torch.tensor([0]), steps=20, guidance=1.5))))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_the_sketch_route_gives_the_pixels_of_its_command_on_the_same_file(client, runs, tmp_path):
    model = imagegen.load_run(runs("flow")).model
    s = model.cfg.image_size
    drawing = np.zeros((s, s, 3), np.uint8)
    drawing[s // 4: s // 2, s // 4: 3 * s // 4] = (224, 48, 48)                 # a red bar
    body = {"model": "flow", "seed": 3, "n": 4, "strength": 0.7, "steps": 4, "label": "0"}
    r = client.post("/api/sketch", data={"request": json.dumps(body)},
                    files={"image": ("sketch.png", _png(drawing), "image/png")})
    assert r.status_code == 200, r.text
    command = r.headers["X-Imagegen-Command"].split()
    assert command[:2] == ["imagegen", "vary"] and command[command.index("--image") + 1] == "sketch.png"
    (tmp_path / "sketch.png").write_bytes(_png(drawing))
    command[command.index("--image") + 1] = str(tmp_path / "sketch.png")
    done = run_main(*command[1:command.index("--out")], "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    files = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / f"seed{i:06d}.png")).copy()).permute(2, 0, 1)
                         for i in range(3, 7)])
    page = np.asarray(Image.open(io.BytesIO(r.content)))
    assert np.array_equal(page, np.asarray(imagegen.sample.grid(imagegen.sample.to_float(files))))


@pytest.mark.parametrize("request_body, image_side, status, message", [
    ({"model": "flow", "strength": 0.5}, 8, 400, "this model draws"),
    ({"model": "flow", "strength": 0}, None, 422, "strength"),
    ({"model": "flow", "parent": 3}, None, 400, "parent"),
    ({"model": "dcgan"}, None, 400, "no encoder"),
    ("not json", None, 422, "request"),
])
def test_the_sketch_route_refuses_bad_requests(client, runs, request_body, image_side, status, message):
    side = image_side or imagegen.load_run(runs("flow")).model.cfg.image_size
    data = request_body if isinstance(request_body, str) else json.dumps(request_body)
    r = client.post("/api/sketch", data={"request": data},
                    files={"image": ("sketch.png", _png(np.zeros((side, side, 3), np.uint8)), "image/png")})
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_the_page_explores_16_candidates_and_turns_a_sketch_into_images_it_can_reproduce(served, runs, tmp_path):
    with live_server(served) as port, chromium() as context:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.select_option("#model", "dcgan")
        page.wait_for_selector("#sketch-panel", state="hidden")                 # a GAN has no way in from pixels
        page.fill("#explore-seed", "40")
        page.click("#explore")
        page.wait_for_function("Array.from(document.querySelectorAll('.candidate'))"
                               ".filter(i => i.complete && i.dataset.command).length === 16")
        commands = page.eval_on_selector_all(".candidate", "els => els.map(e => e.dataset.command)")
        assert [f"--seeds {40 + i} " in c for i, c in enumerate(commands)] == [True] * 16
        cell = fetched(page, "document.querySelectorAll('.candidate')[5].src")
        page.click(".candidate >> nth=5")                                        # the 6th becomes the image above
        page.wait_for_function("document.getElementById('command').textContent.includes('--seeds 45 ')"
                               " && document.getElementById('image').complete")
        main = fetched(page, "document.getElementById('image').src")
        assert main == cell
        # Sketch on the flow model: a stroke of the brush, then images from it.
        page.select_option("#model", "flow")
        page.wait_for_selector("#sketch-panel", state="visible")
        box = page.locator("#sketch").bounding_box()
        page.mouse.move(box["x"] + 40, box["y"] + 60)
        page.mouse.down()
        for k in range(12):
            page.mouse.move(box["x"] + 40 + 12 * k, box["y"] + 60 + 4 * k)
        page.mouse.up()
        page.click("#sketch-go")
        page.wait_for_function("document.getElementById('sketch-command').textContent.includes('--image sketch.png')"
                               " && document.getElementById('sketched').complete")
        assert page.is_hidden("#error")
        command = page.inner_text("#sketch-command")
        shown = fetched(page, "document.getElementById('sketched').src")
        drawing = fetched(page, "document.getElementById('sketch-download').href")
    sketch = np.asarray(Image.open(io.BytesIO(drawing)).convert("RGB"))
    side = imagegen.load_run(runs("flow")).model.cfg.image_size
    assert (sketch[..., 0] > 150).sum() > 10 and sketch.shape[:2] == (side, side)   # the red stroke, at the model's size
    (tmp_path / "sketch.png").write_bytes(drawing)
    parts = command.split()
    parts[parts.index("--image") + 1] = str(tmp_path / "sketch.png")
    done = run_main(*parts[1:parts.index("--out")], "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    seeds = range(int(parts[parts.index("--seeds") + 1].split("-")[0]), int(parts[parts.index("--seeds") + 1].split("-")[1]) + 1)
    files = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / f"seed{i:06d}.png")).copy()).permute(2, 0, 1)
                         for i in seeds])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown))), np.asarray(imagegen.sample.grid(imagegen.sample.to_float(files))))


def test_a_link_to_the_page_restores_its_image_and_the_board_keeps_images_across_reloads(served, tmp_path):
    import zipfile


    def shown(page) -> bytes:
        return fetched(page, "document.getElementById('image').src")

    with live_server(served) as port, chromium(accept_downloads=True) as context:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.select_option("#model", "flow")
        page.wait_for_selector("#opt-solver")
        page.fill("#seed", "21")
        page.select_option("#opt-solver", "euler")
        page.wait_for_function("document.getElementById('command').textContent.includes('--seeds 21 ')"
                               " && document.getElementById('command').textContent.includes('--solver euler')"
                               " && document.getElementById('image').complete")
        url, command, image = page.url, page.inner_text("#command"), shown(page)
        assert "seed=21" in url and "solver=euler" in url and "model=flow" in url
        page.click("#keep")
        page.fill("#seed", "22")
        page.wait_for_function("document.getElementById('command').textContent.includes('--seeds 22 ')"
                               " && document.getElementById('image').complete")
        page.click("#keep")
        page.wait_for_function("document.querySelectorAll('#board .kept').length === 2")
        # A new tab at the saved link: the same controls, command and pixels; the board is still there.
        other = context.new_page()
        other.goto(url)
        other.wait_for_function("document.getElementById('command').textContent.includes('--seeds 21 ')"
                                " && document.getElementById('image').complete")
        assert other.input_value("#model") == "flow" and other.input_value("#opt-solver") == "euler"
        assert other.inner_text("#command") == command and shown(other) == image
        assert other.eval_on_selector_all("#board .kept", "els => els.length") == 2
        with other.expect_download() as download:
            other.click("#board-download")
        path = tmp_path / "board.zip"
        download.value.save_as(path)
        other.click("#board-clear")
        other.wait_for_function("document.querySelectorAll('#board .kept').length === 0")
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None                                        # every CRC right
        assert z.namelist() == ["01-seed21.png", "02-seed22.png", "commands.txt"]
        assert z.read("01-seed21.png") == image
        lines = z.read("commands.txt").decode().splitlines()
        assert lines[0] == f"01-seed21.png: {command}" and "--seeds 22 " in lines[1]
