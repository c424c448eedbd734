"""Diffusion and flow, on the U-Net and the DiT: schedules, pure solvers, determinism, guidance,
inpainting / outpainting, and bad requests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.errors import ConfigError
from imagegen.models.ddpm import alphas_cumprod
from imagegen.solvers import ddim, ddpm_ancestral, repaint, spaced_timesteps
from imagegen.data import DataConfig
from imagegen.sample import extend_image, generate, outpaint_canvas, seed_generators, to_float

from conftest import run_main, run_maker, tiny_config

# The diffusion and flow families, each on the U-Net and on the DiT: the tests below hold for all four.
VARIANTS = {
    "ddpm": ("ddpm", {"width": 8, "mults": [1, 2], "sample_steps": 4}),
    "ddpm-dit": ("ddpm", {"backbone": "dit", "dit_size": "xxs", "patch": 4, "sample_steps": 4}),
    "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 4}),
    "flow-dit": ("flow", {"backbone": "dit", "dit_size": "xxs", "patch": 4, "sample_steps": 4}),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """variant -> a run folder trained for 4 steps on shapes (class-conditional), once per module."""
    return run_maker(request, tmp_path_factory, VARIANTS, steps=4)


@pytest.fixture(scope="module")
def ddpm_run(runs):
    return runs("ddpm")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, runs):
    return imagegen.load_run(runs(request.param)).model


@pytest.fixture(scope="module", params=["ddpm", "ddpm-dit"])
def ddpm_model(request, runs):
    return imagegen.load_run(runs(request.param)).model


@pytest.fixture(scope="module", params=["flow", "flow-dit"])
def flow_model(request, runs):
    return imagegen.load_run(runs(request.param)).model


_cli = run_main   # the CLI in this process: no interpreter start per call


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedules_decrease_from_one_towards_zero(kind):
    ab = alphas_cumprod(kind, 1000)
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    assert 0.99 < ab[0] < 1 and ab[-1] < 0.01


def test_the_schedule_shift_follows_what_the_backbone_sees_and_divides_every_snr(tmp_path):
    """No shift up to 4,096 numbers (32 px images), sqrt(3) for 64 px RGB pixels, the config's when set; the
    shifted table divides the signal-to-noise ratio of every step by k^2 and keeps the order of the steps."""
    import json
    from imagegen.models.ddpm import DDPM, Config
    small = DDPM(Config(image_size=32, channels=3, width=8, mults=(1, 2)))
    assert small.shift == 1.0 and torch.equal(small.ab, alphas_cumprod("cosine", 1000).float())
    big = DDPM(Config(image_size=64, channels=3, width=8, mults=(1, 2)))
    assert big.shift == pytest.approx(3 ** 0.5)
    assert DDPM(Config(image_size=64, channels=3, width=8, mults=(1, 2), schedule_shift=2.5)).shift == 2.5
    for kind in ("cosine", "linear"):
        ab, shifted = alphas_cumprod(kind, 1000), alphas_cumprod(kind, 1000, 3 ** 0.5)
        snr = lambda a: a / (1 - a)   # noqa: E731
        assert torch.allclose(snr(shifted) / snr(ab), torch.full_like(ab, 1 / 3), rtol=1e-9)
        assert (shifted[1:] < shifted[:-1]).all() and (shifted < ab).all()
    # A ddpm saved before the field learned the unshifted table: it loads as schedule_shift 1, not "by size".
    cfg = imagegen.resolve_config({"family": "ddpm", "model": {"width": 8, "mults": [1, 2]},
                                   "data": {"source": "shapes", "limit": 16, "size": 64},
                                   "train": {"steps": 1, "batch_size": 4, "sample_every": 0, "grid_size": 4}})
    run = imagegen.train(cfg, out=tmp_path, progress=False)
    assert imagegen.load_run(run).model.shift == pytest.approx(3 ** 0.5)
    saved = json.loads((run / "config.json").read_text())
    del saved["model"]["schedule_shift"]
    (run / "config.json").write_text(json.dumps(saved))
    assert imagegen.load_run(run).model.shift == 1.0


def test_spaced_timesteps_start_at_the_last_step():
    assert spaced_timesteps(1000, 1) == [999]
    ts = spaced_timesteps(1000, 20)
    assert len(ts) == 20 and ts[0] == 999 and ts == sorted(ts, reverse=True) and ts[-1] >= 0
    assert spaced_timesteps(10, 10) == list(range(9, -1, -1))


def test_solvers_recover_the_image_with_a_perfect_denoiser():
    """With denoise(x, t) returning the true x0 (and the implied eps), every solver lands on x0."""
    ab = alphas_cumprod("cosine", 100)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(x0.shape, generator=gen)

    def denoise(x, t):
        a = float(ab[t])
        return x0, (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    noise = lambda: torch.randn(x0.shape, generator=gen)   # noqa: E731
    ts = spaced_timesteps(100, 10)
    assert torch.allclose(ddim(denoise, x_T, ab, ts), x0, atol=1e-5)
    assert torch.allclose(ddim(denoise, x_T, ab, ts, eta=1.0, noise=noise), x0, atol=1e-5)
    assert torch.allclose(ddpm_ancestral(denoise, x_T, ab, ts, noise=noise), x0, atol=1e-5)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    out = repaint(denoise, x_T, ab, ts, known=x0, mask=mask, resample=2, noise=noise)
    assert torch.allclose(out, x0, atol=1e-5)


def test_ddim_with_eta_zero_is_deterministic(ddpm_model):
    model = ddpm_model
    a = generate(model, [0, 1, 2], steps=5, eta=0.0)
    b = generate(model, [0, 1, 2], steps=5, eta=0.0)
    assert torch.equal(a, b)
    # the noise only enters at the start: eta = 0 needs no per-step noise, eta = 1 does
    c = generate(model, [0, 1, 2], steps=5, eta=1.0)
    assert not torch.equal(a, c)
    # and a seed's image does not depend on the batch it is drawn in, for both samplers and guidance
    for opts in ({"eta": 0.0}, {"eta": 0.5}, {"sampler": "ddpm"}, {"guidance": 2.0}):
        labels = torch.tensor([0, 1, 2, 3, 0])
        whole = generate(model, [7, 8, 9, 10, 11], labels=labels, steps=3, **opts)
        single = generate(model, [7, 8, 9, 10, 11], labels=labels, steps=3, batch_size=1, **opts)
        assert torch.equal(whole, single), opts


def test_flow_solvers_are_deterministic_and_per_seed(flow_model):
    """The flow's only randomness is the starting noise: every solver gives the same image for a seed,
    whatever the batch, with guidance too (dopri5 solves each image on its own for that)."""
    model = flow_model
    labels = torch.tensor([0, 1, 2, 3, 0])
    for opts in ({"solver": "euler"}, {"solver": "midpoint"}, {"solver": "heun", "guidance": 2.0},
                 {"solver": "dopri5"}):
        whole = generate(model, [7, 8, 9, 10, 11], labels=labels, steps=3, **opts)
        single = generate(model, [7, 8, 9, 10, 11], labels=labels, steps=3, batch_size=1, **opts)
        assert torch.equal(whole, single), opts
        assert torch.equal(whole, generate(model, [7, 8, 9, 10, 11], labels=labels, steps=3, **opts))
    euler, heun = (generate(model, [0], labels=labels[:1], steps=3, solver=s) for s in ("euler", "heun"))
    assert not torch.equal(euler, heun)


def test_guidance_and_unconditional_sampling(model):
    labels = torch.tensor([1, 1])
    g1 = generate(model, [0, 1], labels=labels, steps=3, guidance=1.0)
    g3 = generate(model, [0, 1], labels=labels, steps=3, guidance=3.0)
    assert not torch.equal(g1, g3)
    uncond = model.sample(2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], steps=3)
    assert uncond.shape == (2, 3, 32, 32)


def test_inpainting_keeps_every_known_pixel_exactly(model):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 8:20, 4:30] = 1
    out = extend_image(model, image, mask, seed=3, labels=torch.tensor([2]), steps=4, resample=2)
    keep = mask.expand_as(image) == 0
    assert torch.equal(out[keep], image[keep])
    assert not torch.equal(out[~keep], image[~keep])
    again = extend_image(model, image, mask, seed=3, labels=torch.tensor([2]), steps=4, resample=2)
    assert torch.equal(out, again)


def test_outpainting_extends_the_canvas_and_keeps_the_image(model):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    canvas, mask = outpaint_canvas(image, 6, ["left", "bottom"])
    assert canvas.shape == (1, 3, 38, 38) and mask.shape == (1, 1, 38, 38)
    out = extend_image(model, canvas, mask, seed=0, labels=torch.tensor([0]), steps=3, resample=1)
    assert out.shape == (1, 3, 38, 38)
    assert torch.equal(out[:, :, :32, 6:], image)       # the original sits top-right, untouched
    with pytest.raises(ConfigError, match="not a side"):
        outpaint_canvas(image, 4, ["up"])
    with pytest.raises(ConfigError, match="--pad"):
        outpaint_canvas(image, 0)


@pytest.mark.parametrize("variant", ["ddpm", "flow-dit"])
def test_cli_inpaint_keeps_known_pixels_of_the_png(runs, variant, tmp_path):
    ddpm_run = runs(variant)
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[10:22, 10:22] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = _cli("inpaint", ddpm_run, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
             "--out", tmp_path / "out.png", "--steps", 3, "--resample", 2, "--labels", "square")
    assert r.returncode == 0, r.stderr
    out = np.asarray(Image.open(tmp_path / "out.png"))
    keep = mask == 0
    assert np.array_equal(out[keep], src[keep])
    assert not np.array_equal(out[~keep], src[~keep])

    r = _cli("outpaint", ddpm_run, "--image", tmp_path / "in.png", "--pad", 4, "--sides", "left,right",
             "--out", tmp_path / "wide.png", "--steps", 2, "--resample", 1)
    assert r.returncode == 0, r.stderr
    wide = np.asarray(Image.open(tmp_path / "wide.png"))
    assert wide.shape == (32, 40, 3) and np.array_equal(wide[:, 4:36], src)


@pytest.mark.parametrize("args,message", [
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--steps", "0"], "argument --steps: must be in 1..1000, got 0"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--labels", "hexagon"], "unknown class 'hexagon'"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--labels", "7"], "7 is out of range"),
    (["sample", "{run}", "--seeds", "0-2", "--out", "{tmp}/s", "--labels", "0,1"], "2 labels for 3 seeds"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--guidance", "-1"], "argument --guidance: must be in [0, 30], got -1"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--eta", "2"], "argument --eta: must be in [0, 1], got 2"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--sampler", "euler"], "sampler must be"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--truncation", "1"], "--truncation does not apply"),
    (["inpaint", "{run}", "--image", "{tmp}/img.png", "--mask", "{tmp}/small.png", "--out", "{tmp}/o.png"],
     "must be the same size"),
    (["inpaint", "{run}", "--image", "{tmp}/img.png", "--mask", "{tmp}/black.png", "--out", "{tmp}/o.png"],
     "no white pixels"),
    (["inpaint", "{run}", "--image", "{tmp}/missing.png", "--mask", "{tmp}/small.png", "--out", "{tmp}/o.png"],
     "missing.png"),
    (["inpaint", "{run}", "--image", "{tmp}/img.png", "--mask", "{tmp}/mask.png", "--out", "{tmp}/o.png",
      "--steps", "0"], "argument --steps: must be in"),
    (["outpaint", "{run}", "--image", "{tmp}/img.png", "--pad", "0", "--out", "{tmp}/o.png"], "argument --pad: must be in 1..256, got 0"),
    (["sample", "{run}", "--seeds", "0-1", "--out", "{tmp}/s", "--solver", "heun"], "--solver does not apply"),
    (["sample", "{flow}", "--seeds", "0-1", "--out", "{tmp}/s", "--solver", "rk4"], "solver must be one of euler, midpoint, heun, dopri5"),
    (["sample", "{flow}", "--seeds", "0-1", "--out", "{tmp}/s", "--eta", "0.5"], "--eta does not apply"),
    (["sample", "{flow}", "--seeds", "0-1", "--out", "{tmp}/s", "--steps", "1001"], "argument --steps: must be in 1..1000, got 1001"),
])
def test_bad_requests_are_one_line_errors(runs, tmp_path, args, message):
    ddpm_run, flow_run = runs("ddpm"), runs("flow")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    r = _cli(*[a.format(run=ddpm_run, flow=flow_run, tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_families_without_inpainting_say_so(tiny_run, tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    r = _cli("outpaint", tiny_run, "--image", tmp_path / "img.png", "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "cannot inpaint" in r.stderr


def test_vae_encodes_decodes_and_interpolates_real_images(tmp_path):
    tree = tiny_config(4).to_json()
    tree["family"], tree["model"] = "vae", {"width": 8, "z_dim": 8}
    run_dir = imagegen.train(imagegen.resolve_config(tree), out=tmp_path, progress=False)
    vae = imagegen.load_run(run_dir).model
    x = imagegen.load_data("shapes").batch(torch.arange(4))["image"]
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, 8)
    assert vae.decode(mu).shape == vae.reconstruct(x).shape == (4, 3, 32, 32)
    for i, img in enumerate(x[:2]):
        Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / f"{i}.png")
    r = _cli("interpolate", run_dir, "--images", f"{tmp_path / '0.png'},{tmp_path / '1.png'}", "--frames", 5,
             "--out", tmp_path / "strip.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "strip.png").size == (5 * 34 + 2, 36)


@pytest.mark.trained
@pytest.mark.parametrize("family", ["vae", "cvae"])
def test_vae_inpainting_keeps_known_pixels_is_per_seed_and_fills_the_hole(tmp_path, family):
    tree = tiny_config(300).to_json()
    tree["family"], tree["model"] = family, {"width": 8, "z_dim": 8}
    vae = imagegen.load_run(imagegen.train(imagegen.resolve_config(tree), out=tmp_path, progress=False)).model
    data = imagegen.load_data(DataConfig(source="shapes", split="test"))
    n = 64
    x, y = to_float(data.images[:n]), data.labels[:n]
    labels = y if vae.conditional else None
    mask = torch.zeros(n, 1, 32, 32)
    mask[..., 16:] = 1                                                    # right half unknown
    out = vae.inpaint(x, mask, labels=labels, generator=seed_generators(list(range(n))))
    assert torch.equal(out[..., :16], x[..., :16])                        # known pixels kept exactly
    # Per seed: an image inpainted in a batch equals the same image inpainted alone, seed for seed.
    batch = vae.inpaint(x[:3], mask[:3], labels=None if labels is None else labels[:3],
                        generator=seed_generators([5, 6, 7]))
    alone = vae.inpaint(x[1:2], mask[1:2], labels=None if labels is None else labels[1:2], generator=seed_generators([6]))
    assert torch.equal(batch[1:2], alone)
    # The fill follows the known half: given each image's own left half it lands nearer the true right
    # half than when given another image's left half (measured 0.35 vs 0.43 for vae, 0.29 vs 0.39 cvae).
    other = vae.inpaint(x.roll(1, 0), mask, labels=labels, generator=seed_generators(list(range(n))))
    own_error, other_error = ((f - x)[..., 16:].abs().mean() for f in (out, other))
    assert own_error < 0.9 * other_error, (own_error, other_error)


def test_vae_inpainting_refuses_what_it_cannot_do(tmp_path):
    tree = tiny_config(2).to_json()
    tree["family"], tree["model"] = "vae", {"width": 8, "z_dim": 8}
    run_dir = imagegen.train(imagegen.resolve_config(tree), out=tmp_path, progress=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    r = _cli("inpaint", run_dir, "--image", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "--out", tmp_path / "o.png")
    assert r.returncode == 0, r.stderr
    r = _cli("inpaint", run_dir, "--image", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "--out", tmp_path / "o.png",
             "--resample", 3)
    assert r.returncode == 2 and "has no option resample" in r.stderr
    r = _cli("outpaint", run_dir, "--image", tmp_path / "img.png", "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "inpaints 32x32 images" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.trained
def test_a_run_saved_before_the_backbone_moved_gives_the_same_pixels():
    """tests/data/ddpm-run-before-nets: a tiny class-conditional ddpm run saved, with its seeds 0-3, before
    the U-Net moved to imagegen/nets/unet.py. It must load (same parameter names) and draw the same images.
    They were drawn on an AVX-512 CPU; another CPU's convolutions may round a pixel by one grey level."""
    folder = Path(__file__).parent / "data" / "ddpm-run-before-nets"
    model = imagegen.load_run(folder).model
    now = np.concatenate(list(imagegen.sample.to_uint8(generate(model, [0, 1, 2, 3], labels=torch.arange(4)))), axis=1)
    saved = np.asarray(Image.open(folder / "seeds-0-3.png"))
    diff = np.abs(now.astype(int) - saved.astype(int))
    assert now.shape == saved.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01
