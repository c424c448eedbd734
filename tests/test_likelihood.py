"""Bits per dimension: the dequantisation convention, the families' likelihoods (flow by the ODE, vae and
cvae by the importance-weighted bound), their independence of the batch, and the CLI's --likelihood.
The ODE's likelihood against the analytic log-density of Gaussian data is in test_solvers.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import imagegen
from imagegen.evaluate.likelihood import bits_per_dim, dequantize, image_bits_per_dim

from conftest import run_main, run_maker

FAMILIES = {
    "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 4}),
    "flow-dit": ("flow", {"backbone": "dit", "dit_size": "xxs", "patch": 4, "sample_steps": 4}),
    "vae": ("vae", {"z_dim": 8, "width": 8}),
    "vae-gaussian": ("vae", {"z_dim": 8, "width": 8, "likelihood": "gaussian", "sigma": 0.3}),
    "cvae": ("cvae", {"z_dim": 8, "width": 8}),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """variant -> a run folder trained for 6 steps on shapes (labelled), made once per module."""
    return run_maker(request, tmp_path_factory, FAMILIES, steps=6)


def test_dequantisation_fills_each_pixels_bin_and_a_uniform_density_is_8_bits():
    k = torch.tensor([0, 1, 254, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(500, 1, 1, 1)
    x = dequantize(k, [torch.Generator().manual_seed(i) for i in range(500)])
    lo = k.float() / 128 - 1                                  # the bin of k is [2k/256 - 1, 2(k+1)/256 - 1)
    assert (x >= lo).all() and (x < lo + 1 / 128).all()
    assert (x - lo).std() > 0.2 / 128                         # spread over the bin, not a point
    assert torch.equal(dequantize(k[:3], [torch.Generator().manual_seed(i) for i in range(3)]), x[:3])
    dims = 784                                                # the uniform density on [-1, 1]^D: 2^-D
    assert bits_per_dim(torch.tensor(-dims * math.log(2)), dims) == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor(0.0), dims) == pytest.approx(7.0)


def test_dequantised_training_batches_fill_the_bins_the_likelihood_is_measured_on():
    from imagegen.models.flow import dequantize_batch
    k = torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x = dequantize_batch(k.float() / 127.5 - 1, torch.Generator().manual_seed(1))
    lo = k.float() / 128 - 1
    assert (x >= lo).all() and (x < lo + 1 / 128).all() and (x - lo).std() > 0.2 / 128


@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_bits_per_dim_of_an_image_does_not_depend_on_its_batch(variant, runs):
    model = imagegen.load_run(runs(variant)).model
    test = imagegen.load_data(imagegen.DataConfig(source="shapes", split="test", limit=7))
    seeds = list(range(100, 107))
    # The flow's ODE at 8 steps, not its 64: what is asserted (the batch, the seed) does not depend on the
    # steps, and 64 Heun steps with a divergence each took 54 s of the suite for the U-Net.
    opts = {"steps": 8} if model.name == "flow" else {}
    whole = image_bits_per_dim(model, test.images, seeds, labels=test.labels, batch_size=7, **opts)
    parts = image_bits_per_dim(model, test.images, seeds, labels=test.labels, batch_size=3, **opts)
    assert torch.equal(whole, parts)
    assert whole.isfinite().all() and whole.std() > 0          # a real score, one per image
    # Another seed dequantises (and probes or draws) differently: the figure moves, a little.
    other = image_bits_per_dim(model, test.images, [s + 1 for s in seeds], labels=test.labels, batch_size=7, **opts)
    assert not torch.equal(whole, other) and (whole - other).abs().max() < 0.5


@pytest.mark.parametrize("variant", ["vae", "vae-gaussian"])
def test_the_importance_weighted_bound_is_above_the_elbos_of_its_own_draws(variant, runs):
    model = imagegen.load_run(runs(variant)).model
    test = imagegen.load_data(imagegen.DataConfig(source="shapes", split="test", limit=16))
    x = dequantize(test.images, [torch.Generator().manual_seed(i) for i in range(16)])
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(16)]   # noqa: E731
    w = model.log_weights(x, generator=gens(), samples=64)                  # 16 x 64
    bound = model.log_likelihood(x, generator=gens(), samples=64)
    assert torch.equal(bound, torch.logsumexp(w, 1) - math.log(64))
    # Jensen: the log of the mean weight is at least the mean log-weight (the ELBO of each draw),
    # strictly when the weights differ, whatever the weights are.
    assert (bound > w.mean(1)).all()


def test_evaluate_likelihood_writes_bits_per_dim_with_its_convention(runs, evaluators, tmp_path):
    import shutil
    run = shutil.copytree(runs("flow"), tmp_path / "flow")
    r = run_main("evaluate", str(run), "--n", "50", "--likelihood", "6")
    assert r.returncode == 0, r.stderr
    out = json.loads((run / "metrics.json").read_text())
    assert 5 < out["metrics"]["bits_per_dim"] < 12 and out["metrics"]["bits_per_dim_se"] > 0
    lk = out["protocol"]["likelihood"]
    assert lk["images"] == 6 and lk["dequantization"].startswith("uniform") and "Hutchinson" in lk["estimator"]
    assert "bits/dim on 6 test images" in r.stdout


def test_likelihood_on_a_family_without_one_is_a_one_line_error(tiny_run):
    r = run_main("evaluate", str(tiny_run), "--n", "50", "--likelihood", "5")
    assert r.returncode == 2 and "has no likelihood" in r.stderr and "Traceback" not in r.stderr
    r = run_main("analyse", str(tiny_run), "--images", str(tiny_run), "--out", "/tmp/never")
    assert r.returncode == 2 and "has no likelihood" in r.stderr


def test_analyse_scores_a_folder_of_own_images_and_reports_bad_files(runs, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    test = imagegen.load_data(imagegen.DataConfig(source="shapes", split="test", limit=3))
    for i, img in enumerate(test.images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"real{i}.png")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "analysis"
    r = run_main("analyse", str(runs("vae")), "--images", str(folder), "--out", str(out), "--reference", "20")
    assert r.returncode == 0, r.stderr
    assert "broken.png" in r.stdout                            # reported, skipped
    result = json.loads((out / "analysis.json").read_text())
    scores = {s["file"].rsplit("/", 1)[-1]: s for s in result["scores"]}
    assert set(scores) == {"real0.png", "real1.png", "real2.png", "noise.png"}
    # The same figure as scoring the images directly (file order = seed order).
    files = sorted(folder.glob("*.png"))
    kept = [f for f in files if f.name != "broken.png"]
    direct = image_bits_per_dim(imagegen.load_run(runs("vae")).model,
                                torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in kept]),
                                list(range(len(kept))))
    assert [scores[f.name]["bits_per_dim"] for f in kept] == pytest.approx(direct.tolist())
    assert 0 <= scores["noise.png"]["test_share_below"] <= 1 and (out / "gallery.html").exists()
