"""`imagegen serve`: every route and limit through FastAPI's TestClient, micro-batching, schemathesis on
/openapi.json, path traversal against a live server, and the page in Debian's Chromium via Playwright."""

from __future__ import annotations

import asyncio
import http.client
import io
import shlex
import json
import shutil
import threading
import time
import urllib.request
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.serve import app as S
from imagegen.serve import common as C
from imagegen.serve import worker as W
from imagegen.cli import main
from imagegen.distill import distill
from imagegen.serve import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from conftest import LOCAL, live_server, read_only, serve_process
from test_cyclegan import cg_config
from test_families import family_config

DCGAN, CGAN, DDPM, CYCLE = "00000-shapes-dcgan", "00001-shapes-cgan", "00002-shapes-ddpm", "00003-pair-shapes-circle-square-cyclegan"
VAE, FLOW, STUDENT = "00004-shapes-vae", "00005-shapes-flow", "00006-shapes-distilled"


@pytest.fixture(scope="module")
def runs_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for family in ("dcgan", "cgan", "ddpm"):
        imagegen.train(family_config(family, 4), out=root, progress=False)
    imagegen.train(cg_config(2), out=root, progress=False)
    imagegen.train(family_config("vae", 4), out=root, progress=False)
    imagegen.train(family_config("flow-dit", 4), out=root, progress=False)
    distill(root / FLOW, steps=1, out=root, pairs=32, train_steps=4, progress=False,
            overrides=["model.width=8", "model.mults=[1, 2]", "train.batch_size=16", "train.sample_every=0"])
    # A sibling folder whose name extends a run's name: never served.
    (root / f"{DCGAN}-evil").mkdir()
    (root / f"{DCGAN}-evil" / "secret.png").write_bytes(b"SECRET-SIBLING")
    return read_only(request, root)


@pytest.fixture(scope="module")
def client(runs_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_CACHE", str(tmp_path_factory.mktemp("no-evaluators")))
        with TestClient(create_app(runs_dir, log=None), raise_server_exceptions=False, base_url=LOCAL) as c:
            yield c


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def png_upload(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int) -> bytes:
    """A valid grayscale PNG header claiming side x side pixels, with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    raw = zlib.compress(b"\x00" * (side + 1) * 64)             # a few rows; the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_models_health_docs(client):
    models = {m["name"]: m for m in client.get("/api/models").json()}
    assert set(models) == {DCGAN, CGAN, DDPM, CYCLE, VAE, FLOW, STUDENT}
    assert models[STUDENT]["family"] == "distilled" and models[STUDENT]["options"] == {}
    assert {m for m in models if models[m]["inpaints"]} == {DDPM, VAE, FLOW}
    assert models[DCGAN]["family"] == "dcgan" and models[DCGAN]["classes"] == [] and models[DCGAN]["latent_dims"] == 16
    assert models[CGAN]["classes"] == ["circle", "square", "triangle", "star"]
    assert set(models[DDPM]["options"]) == {"steps", "guidance", "eta", "sampler"}
    assert set(models[FLOW]["options"]) == {"steps", "guidance", "solver"}
    assert models[CYCLE]["translates"] and models[CYCLE]["domains"] == ["circle", "square"]
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 404                             # no third-party script in this origin
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/models", "/api/generate", "/api/interpolate", "/api/translate", "/api/inpaint", "/api/analyse", "/health"} <= set(paths)
    assert "<select id=\"model\"" in client.get("/").text and client.get("/static/app.js").status_code == 200


def test_generate_is_per_seed_and_reproducible(client, runs_dir, tmp_path):
    one = client.post("/api/generate", json={"model": DCGAN, "seed": 7})
    assert png(one).shape == (32, 32, 3)
    assert client.post("/api/generate", json={"model": DCGAN, "seed": 7}).content == one.content
    grid = png(client.post("/api/generate", json={"model": DCGAN, "seed": 6, "n": 4}))
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    assert np.array_equal(grid[2:34, 36:68], png(one))            # seed 7 is the grid's second image
    # "Reproduce this": the command in the header draws the same pixels.
    command = one.headers["x-imagegen-command"].split()
    assert command[:5] == ["imagegen", "sample", str(runs_dir / DCGAN), "--seeds", "7"]
    out = tmp_path / "s"
    assert main(command[1:command.index("--out")] + ["--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "seed000007.png")), png(one))
    # Options, labels and latent sliders pass through, and the command carries them.
    r = client.post("/api/generate", json={"model": CGAN, "seed": 2, "label": "Star", "latent": [1.5, -0.5], "truncation": 1})
    png(r)
    assert "--labels Star --latent 1.5,-0.5 --truncation 1" in r.headers["x-imagegen-command"]
    out2 = tmp_path / "s2"
    cmd = r.headers["x-imagegen-command"].split()
    assert main(cmd[1:cmd.index("--out")] + ["--out", str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out2 / "seed000002.png")), png(r))
    png(client.post("/api/generate", json={"model": DDPM, "seed": 1, "steps": 2, "guidance": 2, "label": "circle"}))
    # The flow model: its solver passes through, into the command too, which draws the same pixels.
    r = client.post("/api/generate", json={"model": FLOW, "seed": 4, "steps": 2, "solver": "midpoint", "label": "star"})
    assert "--solver midpoint" in r.headers["x-imagegen-command"]
    cmd = r.headers["x-imagegen-command"].split()
    assert main(cmd[1:cmd.index("--out")] + ["--out", str(tmp_path / "s3")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s3" / "seed000004.png")), png(r))
    euler = client.post("/api/generate", json={"model": FLOW, "seed": 4, "steps": 2, "solver": "euler", "label": "star"})
    assert png(euler).shape == png(r).shape and euler.content != r.content
    # Its one-step student: served like any run, and its command draws the same pixels too.
    r = client.post("/api/generate", json={"model": STUDENT, "seed": 4, "label": "star"})
    cmd = r.headers["x-imagegen-command"].split()
    assert main(cmd[1:cmd.index("--out")] + ["--out", str(tmp_path / "s4")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s4" / "seed000004.png")), png(r))
    assert client.post("/api/generate", json={"model": STUDENT, "seed": 4, "steps": 2}).status_code == 400


@pytest.mark.parametrize("body,status,fragment", [
    ({"model": DCGAN, "n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ({"model": DCGAN, "n": C.MAX_IMAGES + 1}, 422, "n: Input should be less than or equal to 64"),
    ({"model": DCGAN, "seed": -1}, 422, "seed"),
    ({"model": DCGAN, "seed": 2**63}, 422, "seed"),
    ({"model": DCGAN, "seed": 10**40}, 422, "seed"),
    ({"model": DCGAN, "seed": 2**63 - 2, "n": 4}, 400, "largest seed"),
    ({"model": DCGAN, "seed": "seven"}, 422, "seed"),
    ({"model": "nope"}, 404, "unknown model 'nope'"),
    ({"model": CGAN, "label": "hexagon"}, 400, "unknown class 'hexagon'"),
    ({"model": CGAN, "label": "9"}, 400, "out of range"),
    ({"model": DCGAN, "label": "circle"}, 400, "not class-conditional"),
    ({"model": DCGAN, "steps": 5}, 400, "steps does not apply to a dcgan model"),
    ({"model": DDPM, "steps": C.MAX_STEPS + 1}, 422, "steps"),
    ({"model": DDPM, "steps": 100, "n": 17}, 400, "image-steps"),
    ({"model": DDPM, "latent": [1.0]}, 400, "latent does not apply"),
    ({"model": FLOW, "solver": "rk4"}, 422, "solver"),
    ({"model": FLOW, "eta": 0.5}, 400, "eta does not apply"),
    ({"model": DDPM, "solver": "heun"}, 400, "solver does not apply"),
    ({"model": FLOW, "solver": "dopri5", "n": 17}, 400, "image-steps"),
    ({"model": DCGAN, "latent": [0.0] * (C.MAX_LATENT_DIMS + 1)}, 422, "latent"),
    ({"model": DCGAN, "latent": [11.0]}, 400, "must be in [-10, 10], got 11"),
    ({"model": DCGAN, "colour": "red"}, 422, "colour"),
    ({"model": CYCLE}, 400, "/api/translate"),
    ({}, 422, "model"),
])
def test_bad_generate_requests_are_4xx_with_a_message(client, body, status, fragment):
    r = client.post("/api/generate", json=body)
    assert r.status_code == status and fragment in r.json()["detail"], r.text


def test_malformed_bodies_are_4xx(client):
    assert client.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/generate", content=b"[]", headers={"content-type": "application/json"}).status_code == 422
    assert client.get("/api/generate").status_code == 405


def test_the_image_routes_answer_with_the_command_that_does_the_same(client, runs_dir, tmp_path):
    """/api/interpolate, /api/inpaint and /api/translate name the `imagegen` command (the request layer's)
    that draws the same pixels from the same files."""
    photo = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "hole.png")
    files = {"image": ("photo.png", png_upload(photo), "image/png"), "mask": ("hole.png", png_upload(mask), "image/png")}
    answers = [client.post("/api/interpolate", json={"model": CGAN, "seed_a": 3, "seed_b": 9, "frames": 3, "label": "1"}),
               client.post("/api/inpaint", data={"model": FLOW, "seed": "4", "steps": "2", "label": "star"}, files=files),
               client.post("/api/translate", data={"model": CYCLE, "direction": "b2a"}, files={"image": files["image"]})]
    for i, r in enumerate(answers):
        want = png(r)
        words = shlex.split(r.headers["X-Imagegen-Command"])
        assert words[0] == "imagegen" and words[2] == str(runs_dir / words[2]) and words[-2] == "--out", words
        out = tmp_path / (f"{i}" if words[1] == "translate" else f"{i}.png")
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            done = main([*words[1:-1], str(out)])
        assert done == 0
        got = np.asarray(Image.open(out / "photo.png" if words[1] == "translate" else out))
        assert np.array_equal(got, want), words[1]


def test_interpolate_translate_inpaint_analyse(client, runs_dir):
    strip = png(client.post("/api/interpolate", json={"model": DCGAN, "seed_a": 1, "seed_b": 2, "frames": 4}))
    assert strip.shape == (34 + 2, 4 * 34 + 2, 3)
    assert client.post("/api/interpolate", json={"model": DCGAN, "frames": 1}).status_code == 422
    assert client.post("/api/interpolate", json={"model": DCGAN, "frames": C.MAX_FRAMES + 1}).status_code == 422
    assert "no latent space" in client.post("/api/interpolate", json={"model": DDPM}).json()["detail"]

    photo = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    files = {"image": ("x.png", png_upload(photo), "image/png")}
    out = png(client.post("/api/translate", data={"model": CYCLE, "direction": "b2a"}, files=files))
    assert out.shape == (32, 32, 3)
    model = imagegen.load_run(runs_dir / CYCLE).model
    x = torch.from_numpy(np.array(Image.fromarray(photo).resize((32, 32), Image.Resampling.BICUBIC))).permute(2, 0, 1)[None]
    assert np.array_equal(out, imagegen.sample.to_uint8(model.translate(x.float() / 127.5 - 1, "b2a"))[0])
    assert client.post("/api/translate", data={"model": DCGAN}, files=files).status_code == 400
    assert client.post("/api/translate", data={"model": CYCLE, "direction": "up"}, files=files).status_code == 422
    assert client.post("/api/translate", data={"model": CYCLE}).status_code == 422           # no file
    too_big = {"image": ("big.png", b"\x89PNG" + b"\0" * C.MAX_UPLOAD_BYTES, "image/png")}
    r = client.post("/api/translate", data={"model": CYCLE}, files=too_big)
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    r = client.post("/api/translate", data={"model": CYCLE}, files={"image": ("big.png", bomb_png(5000), "image/png")})
    assert r.status_code == 413 and "5000x5000 is over the limit" in r.json()["detail"]
    r = client.post("/api/translate", data={"model": CYCLE}, files={"image": ("bomb.png", bomb_png(20000), "image/png")})
    assert r.status_code == 413 and "decompression bomb" in r.json()["detail"]
    r = client.post("/api/translate", data={"model": CYCLE}, files={"image": ("x.png", b"garbage", "image/png")})
    assert r.status_code == 400 and "cannot decode" in r.json()["detail"]
    r = client.post("/api/translate", data={"model": CYCLE}, files={"image": ("x.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["detail"]

    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    files = {"image": ("i.png", png_upload(image), "image/png"), "mask": ("m.png", png_upload(mask), "image/png")}
    filled = png(client.post("/api/inpaint", data={"model": DDPM, "seed": "3", "steps": "2", "label": "square"}, files=files))
    assert np.array_equal(filled[:, :16], image[:, :16])                      # known pixels kept exactly
    filled = png(client.post("/api/inpaint", data={"model": FLOW, "seed": "3", "steps": "2", "label": "star"}, files=files))
    assert np.array_equal(filled[:, :16], image[:, :16]) and not np.array_equal(filled, image)
    assert client.post("/api/inpaint", data={"model": DCGAN}, files=files).status_code == 400
    filled = png(client.post("/api/inpaint", data={"model": VAE, "seed": "3"}, files=files))    # VAE: Rezende et al.'s chain
    assert np.array_equal(filled[:, :16], image[:, :16]) and not np.array_equal(filled, image)
    assert "does not apply" in client.post("/api/inpaint", data={"model": VAE, "steps": "2"}, files=files).json()["detail"]
    small = {**files, "mask": ("m.png", png_upload(mask[:16]), "image/png")}
    assert "must be the same size" in client.post("/api/inpaint", data={"model": DDPM}, files=small).json()["detail"]
    black = {**files, "mask": ("m.png", png_upload(mask * 0), "image/png")}
    assert "no white pixels" in client.post("/api/inpaint", data={"model": DDPM}, files=black).json()["detail"]
    assert client.post("/api/inpaint", data={"model": DDPM, "seed": "-1"}, files=files).status_code == 422

    scores = client.post("/api/analyse", json={"model": DCGAN, "seed": 3, "n": 2}).json()
    assert [s["seed"] for s in scores["images"]] == [3, 4] and all("discriminator" in s for s in scores["images"])
    assert scores["evaluator"] is None and "imagegen evaluator train" in scores["notes"][0]
    assert client.post("/api/analyse", json={"model": CYCLE}).status_code == 400


def test_an_inpaint_canvas_counts_as_its_pixels(client):
    """A canvas k times the model's pixels costs k ** 1.5 images (common.CANVAS_EXPONENT): the largest one
    (256 px a side, which took over 30 s at one step) is refused, one of twice the model's side is drawn
    at 2 steps, and the model's own size at 10."""
    side = {m["name"]: m for m in client.get("/api/models").json()}[DDPM]["image_size"]
    for canvas, steps, status in ((256, 1, 400), (2 * side, 2, 200), (side, 10, 200)):
        image = np.random.default_rng(1).integers(0, 256, (canvas, canvas, 3), dtype=np.uint8)
        mask = np.zeros((canvas, canvas), np.uint8)
        mask[:, canvas // 2:] = 255
        files = {"image": ("i.png", png_upload(image), "image/png"), "mask": ("m.png", png_upload(mask), "image/png")}
        r = client.post("/api/inpaint", data={"model": DDPM, "steps": str(steps), "label": "square"}, files=files)
        assert r.status_code == status, (canvas, steps, r.text)
        if status == 400:
            assert f"counted as {(canvas / side) ** 3:g} images" in r.json()["detail"] and "image-steps" in r.json()["detail"]
        else:
            assert png(r).shape[:2] == (canvas, canvas)


def test_overload_is_503_with_retry_after(client):
    worker = client.app.state.worker
    worker.pending = W.MAX_PENDING
    try:
        r = client.post("/api/generate", json={"model": DCGAN})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert client.get("/health").status_code == 200                       # health is never queued
    finally:
        worker.pending = 0
    assert client.post("/api/generate", json={"model": DCGAN}).status_code == 200


def test_concurrent_requests_are_micro_batched_without_changing_pixels(runs_dir):
    import httpx
    app = create_app(runs_dir, log=None)
    calls = []
    original = S.generate

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as c:
            return await asyncio.gather(*[c.post("/api/generate", json={"model": DCGAN, "seed": s}) for s in range(12)])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "generate", counting)
        answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    assert sum(calls) == 12 and len(calls) < 12                                # gathered into fewer calls
    with TestClient(app, base_url=LOCAL) as c:
        for s, a in enumerate(answers):
            assert c.post("/api/generate", json={"model": DCGAN, "seed": s}).content == a.content


# --- schemathesis ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_schema(runs_dir):
    import schemathesis
    # schemathesis's ASGI client sends Host: testserver, so the gate answers to that name here.
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(runs_dir, log=None, hosts=("testserver",)))


def _schemathesis_test():
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.pytest.from_fixture("api_schema")

    @schema.parametrize()
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def test_schemathesis_finds_no_server_error(case):
        case.call_and_validate(checks=[not_a_server_error])

    return test_schemathesis_finds_no_server_error


test_schemathesis_finds_no_server_error = _schemathesis_test()


# --- a live server: raw paths (no client normalisation) and the browser ------------------------------

@pytest.fixture(scope="module")
def live(runs_dir):
    with live_server(runs_dir) as port:
        yield port


TRAVERSALS = [
    "../version.py",                                 # ../
    "..%2fversion.py",                               # ..%2f
    "%2e%2e/version.py",                             # %2e%2e/
    "..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",   # deep ..%2f
    f"../{DCGAN}-evil/secret.png",                   # sibling-prefix path
    "/etc/passwd",                                   # absolute path
    "....//....//....//etc/passwd",                  # ....//
]


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (http.client does not normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


@pytest.mark.parametrize("payload", TRAVERSALS)
def test_path_traversal_gets_404_and_no_content(live, payload):
    for prefix in ("/static/", f"/files/{DCGAN}/", "/files/"):
        path = prefix + payload
        status, body = raw_get(live, path)
        assert status == 404, (path, status)
        assert b"root:" not in body and b"SECRET" not in body and b"def create_app" not in body, path


def test_uploads_decode_as_files_do(client, runs_dir, tmp_path):
    """A PNG with transparency gives the same translation through the API as through `imagegen
    translate`: one decoder, which composites transparent pixels on white, serves both."""
    rgba = np.random.default_rng(2).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :16, 3] = 0                                       # left half fully transparent, right half opaque
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "x.png")
    files = {"image": ("x.png", (tmp_path / "in" / "x.png").read_bytes(), "image/png")}
    api = png(client.post("/api/translate", data={"model": CYCLE, "direction": "a2b"}, files=files))
    assert main(["translate", str(runs_dir / CYCLE), "--direction", "a2b", "--input", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out")]) == 0
    assert np.array_equal(api, np.asarray(Image.open(tmp_path / "out" / "x.png")))
    # What both saw: white where the upload was transparent, not the hidden colour values.
    model = imagegen.load_run(runs_dir / CYCLE).model
    white = rgba[..., :3].copy()
    white[:, :16] = 255
    x = imagegen.sample.to_float(torch.from_numpy(white).permute(2, 0, 1)[None])
    assert np.array_equal(api, imagegen.sample.to_uint8(model.translate(x, "a2b"))[0])


def test_run_files_are_served_and_nothing_else(live):
    status, body = raw_get(live, f"/files/{DCGAN}/samples/step-0000004.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    assert raw_get(live, f"/files/{DCGAN}-evil/secret.png")[0] == 404        # a sibling folder, not a run
    assert raw_get(live, f"/files/{DCGAN}/checkpoints")[0] == 404             # folders are not listed
    assert raw_get(live, f"/files/{DCGAN}/model.safetensors")[0] == 404       # only PNG, HTML and JSON


def test_browser_generates_reproducibly_and_shows_errors(live):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(bypass_csp=True)   # wait_for_function evaluates with eval(), which the page's CSP forbids
        page.goto(f"http://127.0.0.1:{live}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 7")
        page.select_option("#model", DCGAN)

        def image_for(seed: int) -> list[int]:
            page.fill("#seed", str(seed))
            page.wait_for_function(f"document.getElementById('command').textContent.includes('--seeds {seed} ')"
                                   " && document.getElementById('image').complete")
            assert page.evaluate("document.getElementById('image').naturalWidth") == 32   # the PNG decoded
            return page.evaluate("async () => Array.from(new Uint8Array(await (await fetch("
                                 "document.getElementById('image').src)).arrayBuffer()))")

        first = image_for(11)
        other = image_for(12)
        again = image_for(11)
        assert first == again and first != other
        assert page.is_hidden("#error")
        page.fill("#seed", "-5")                                               # refused by the server (422)
        page.wait_for_selector("#error", state="visible")
        assert "seed" in page.inner_text("#error") and "422" in page.inner_text("#error")
        page.fill("#seed", "1.5")                                              # refused by the page
        page.wait_for_function("document.getElementById('error').textContent.includes('whole number')")
        assert page.is_hidden("#inpaint-panel")                               # a GAN cannot inpaint...
        page.select_option("#model", VAE)
        page.wait_for_selector("#inpaint-panel", state="visible")             # ... a VAE can
        # The flow model: steps and guidance sliders and a solver menu, whose choice reaches the command.
        page.select_option("#model", FLOW)
        page.wait_for_selector("#opt-solver")
        assert page.is_visible("#opt-steps") and page.is_visible("#opt-guidance")
        page.fill("#seed", "3")
        page.select_option("#opt-solver", "euler")
        page.wait_for_function("document.getElementById('command').textContent.includes('--solver euler')")
        # Its one-step student: no sampling controls, an image straight away.
        page.select_option("#model", STUDENT)
        page.wait_for_function(f"document.getElementById('command').textContent.includes('{STUDENT}')"
                               " && document.getElementById('image').complete")
        assert not page.is_visible("#opt-steps") and page.is_hidden("#error")
        browser.close()


def test_the_page_works_under_its_content_security_policy(live):
    """The page as a browser enforces its policy: no violation while it lists the models and draws an
    image (waits through locators, since wait_for_function's eval() is what the policy forbids)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        said = []
        page.on("console", lambda m: said.append(m.text))
        page.on("pageerror", lambda e: said.append(str(e)))
        page.goto(f"http://127.0.0.1:{live}/")
        page.locator("#model option").nth(6).wait_for(state="attached")
        page.select_option("#model", DCGAN)
        page.fill("#seed", "5")
        page.locator("#command", has_text="--seeds 5 ").wait_for()
        page.locator("#image[src^='blob:']").wait_for(state="attached")
        deadline = time.time() + 20
        while not page.evaluate("document.getElementById('image').naturalWidth"):
            assert time.time() < deadline, "the image did not load"
            time.sleep(0.05)
        assert page.evaluate("document.getElementById('image').naturalWidth") == 32
        browser.close()
    assert not [line for line in said if "Content Security Policy" in line], said


# --- start-up, the command and the deadline ------------------------------------------------------------

def test_serve_command_finds_nested_runs_and_reports_broken_ones(tiny_run, tmp_path):
    """`imagegen serve` as a user starts it: runs are found up to RUN_SEARCH_DEPTH deep and named by their
    path; a corrupt run is reported at start-up and left out; the page and the API answer."""
    root = tmp_path / "runs"
    shutil.copytree(tiny_run, root / "team" / "exp" / "good")                  # 3 deep: served
    shutil.copytree(tiny_run, root / "a" / "b" / "c" / "too-deep")             # 4 deep: not searched
    broken = root / "broken"
    shutil.copytree(tiny_run, broken)
    data = bytearray((broken / "ema.safetensors").read_bytes())
    data[-50] ^= 1
    (broken / "ema.safetensors").write_bytes(bytes(data))
    proc, port = serve_process(root)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert '<select id="model"' in r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=10) as r:
            assert [m["name"] for m in json.loads(r.read())] == ["team/exp/good"]
        body = b'{"model": "team/exp/good", "seed": 3}'
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            served = np.asarray(Image.open(io.BytesIO(r.read())))
        # The run's seed-3 image. The server computes with 1 torch thread (--threads 1), this test maybe with
        # more, and a kernel may round differently by thread count: a pixel may move by one grey level.
        here = imagegen.sample.to_uint8(imagegen.generate(imagegen.load_run(tiny_run).model, [3]))[0].astype(int)
        other = imagegen.sample.to_uint8(imagegen.generate(imagegen.load_run(tiny_run).model, [4]))[0].astype(int)
        assert np.abs(served.astype(int) - here).max() <= 1 and np.abs(served.astype(int) - other).max() > 8
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"not serving {broken}" in out and "ema.safetensors: SHA-256 does not match" in out
    assert "serving 1 run(s)" in out and "Traceback" not in out


def test_serve_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere"), "--port", "8765"]) == 2
    err = capsys.readouterr().err
    assert "nowhere: not a folder" in err and "Traceback" not in err


def test_work_past_its_deadline_stops_at_the_next_network_call(runs_dir, monkeypatch):
    """A 100-step request whose deadline passes after a few steps: its answer is 503, and the model thread
    stops at its next network call instead of running the other steps (which would hold it 5 s)."""
    app = create_app(runs_dir, log=None)
    calls = []

    def slow_step(module, args):
        calls.append(time.monotonic())
        time.sleep(0.05)
    app.state.runs[DDPM].model.net.register_forward_pre_hook(slow_step)
    monkeypatch.setattr(W, "DEADLINE_S", 0.3)
    with TestClient(app, base_url=LOCAL) as c:
        for route, body in (("/api/generate", {"model": DDPM, "steps": 100}),       # the micro-batched path
                            ("/api/analyse", {"model": DDPM, "n": 1})):             # Worker.call
            calls.clear()
            assert c.post(route, json=body).status_code == 503
            time.sleep(0.5)
            # Each step takes 0.05 s at least, so at most 0.3 / 0.05 steps start before the deadline, and one more
            # at which the thread stops. How many fewer depends on the machine's load: a busy CI runner started
            # one, and a busy 2-core machine none (the deadline passed before the first step), so there is no
            # lower bound; what any machine guarantees is the upper one, and that the steps end.
            stopped_at = len(calls)
            assert stopped_at <= 10, stopped_at
            time.sleep(0.3)
            assert len(calls) == stopped_at                  # stopped, not still running its 100 steps
        monkeypatch.setattr(W, "DEADLINE_S", 30.0)
        assert c.post("/api/generate", json={"model": DDPM, "steps": 2}).status_code == 200


def test_a_stop_by_the_model_threads_own_deadline_check_is_503(runs_dir):
    """The model thread's deadline starts counting before the request's wait does, so on a loaded machine
    the thread can stop (Late, at a network call) before the request has timed out: that answer is the
    same 503, on both paths, not an exception out of the app."""
    app = create_app(runs_dir, log=None)
    hook = {}

    def late(module, args):
        if hook.get("on"):
            raise W.Late()
    app.state.runs[DDPM].model.net.register_forward_pre_hook(late)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=True) as c:
        hook["on"] = True
        for route, body in (("/api/generate", {"model": DDPM, "steps": 2}),          # the micro-batched path
                            ("/api/analyse", {"model": DDPM, "n": 1})):              # Worker.call
            r = c.post(route, json=body)
            assert r.status_code == 503 and "deadline" in r.json()["detail"], (route, r.status_code, r.text)
            assert r.headers["Retry-After"] == str(W.RETRY_AFTER_S)
        hook["on"] = False
        assert c.post("/api/generate", json={"model": DDPM, "steps": 2}).status_code == 200


def test_a_request_past_the_deadline_is_503_and_the_server_recovers(runs_dir, monkeypatch):
    """The answer comes at the deadline, while the work is still held in the model thread before any
    network call (so not from the thread's own check at its next network call)."""
    app = create_app(runs_dir, log=None)
    release = {"generate": threading.Event(), "interpolate": threading.Event()}
    ended = []

    def held(name, fn):
        def run(*args, **kwargs):
            release[name].wait(20)                 # until the test lets it go
            ended.append(name)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(W, "DEADLINE_S", 0.1)
    monkeypatch.setattr(S, "generate", held("generate", S.generate))
    monkeypatch.setattr(S, "interpolate", held("interpolate", S.interpolate))
    with TestClient(app, base_url=LOCAL) as c:
        for name, route, body in (("generate", "/api/generate", {"model": DCGAN, "seed": 1}),
                                  ("interpolate", "/api/interpolate",                     # Worker.call
                                   {"model": DCGAN, "seed_a": 1, "seed_b": 2, "frames": 2})):
            r = c.post(route, json=body)
            assert r.status_code == 503 and "0.1 s deadline" in r.json()["detail"] and r.headers["retry-after"] == "1"
            assert name not in ended                                  # answered while its work was held
            release[name].set()
            for _ in range(200):                                      # the model thread lets it go
                if name in ended:
                    break
                time.sleep(0.05)
        assert ended == ["generate", "interpolate"]
        assert app.state.worker.pending == 0                          # nothing left admitted
        monkeypatch.setattr(W, "DEADLINE_S", 30.0)
        assert c.post("/api/generate", json={"model": DCGAN, "seed": 1}).status_code == 200
