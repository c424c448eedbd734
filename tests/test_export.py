"""`imagegen export --format onnx` (issue 18): every family that samples from noise exports a graph that
onnxruntime runs to within 1e-4 of torch, and driving the graph as its metadata documents gives the
library's own images (DCGAN, VAE, the distilled sampler, flow's Euler steps, ddpm's network call)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import imagegen
from imagegen.export import ExportError, export_onnx
from imagegen.models.base import per_item_normal
from imagegen.sample import seed_generators

from conftest import run_main, run_maker, read_only

VARIANTS = {   # on shapes: the diffusion families and the CVAE/CGAN are class-conditional
    "dcgan": ("dcgan", {"width": 8, "z_dim": 16}),
    "cgan": ("cgan", {"width": 8, "z_dim": 16}),
    "vae": ("vae", {"z_dim": 8, "width": 8}),
    "cvae": ("cvae", {"z_dim": 8, "width": 8}),
    "flow": ("flow", {"width": 8, "mults": [1, 2], "sample_steps": 4, "solver": "euler"}),
    "flow-dit": ("flow", {"backbone": "dit", "dit_size": "xxs", "patch": 4, "sample_steps": 4}),
    "ddpm": ("ddpm", {"width": 8, "mults": [1, 2], "sample_steps": 4}),
    "random": ("random", {}),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_maker(request, tmp_path_factory, VARIANTS, steps=6)


@pytest.fixture(scope="module")
def student(request, runs, tmp_path_factory):
    from imagegen.distill import distill
    return read_only(request, distill(runs("flow"), steps=2, out=tmp_path_factory.mktemp("student"), pairs=32,
                                      train_steps=4, overrides=["model.width=8", "train.batch_size=16"], progress=False))


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.trained
@pytest.mark.parametrize("variant", ["dcgan", "cgan", "vae", "cvae"])
def test_latent_models_export_the_library_images(runs, variant, tmp_path):
    """image = graph(z[, label]) is, to 1e-4, what `sample` draws from the same z, at a batch of 5 (the
    check inside export used 3: the batch axis is dynamic)."""
    run = imagegen.load_run(runs(variant))
    z = per_item_normal(5, (run.model.cfg.z_dim,), seed_generators(range(5)), "cpu")
    labels = torch.tensor([0, 1, 2, 0, 1]) if run.model.conditional else None
    before = run.model.sample(5, noise=z, labels=labels)
    done = export_onnx(run, tmp_path / "g.onnx")
    assert done.max_abs_diff <= 1e-4 and done.inputs["z"][1] == ("N", run.model.cfg.z_dim)
    want = run.model.sample(5, noise=z, labels=labels)
    assert torch.equal(want, before)   # the run's own model is left as it was, bit for bit
    want = want.numpy()
    feeds = {"z": z.numpy()} | ({"label": labels.numpy()} if labels is not None else {})
    got = _session(done.path).run(None, feeds)[0]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    assert want.std() > 0.01      # a real image, not a constant that any graph would match
    # Past 16 rows: the graph holds neither the old 16-row pad nor a per-sample product (nets/layers.Linear).
    z = per_item_normal(40, (run.model.cfg.z_dim,), seed_generators(range(40)), "cpu")
    labels = torch.arange(40) % run.model.num_classes if run.model.conditional else None
    want = run.model.sample(40, noise=z, labels=labels).numpy()
    feeds = {"z": z.numpy()} | ({"label": labels.numpy()} if labels is not None else {})
    assert np.abs(_session(done.path).run(None, feeds)[0] - want).max() <= 1e-4


@pytest.mark.trained
@pytest.mark.parametrize("variant", ["flow", "flow-dit"])
def test_flow_velocity_graph_with_euler_gives_the_library_images(runs, variant, tmp_path):
    """The flow graph is one velocity call; K Euler steps over it from the seed's noise, as the metadata
    documents, land on `sample` with the euler solver."""
    run = imagegen.load_run(runs(variant))
    done = export_onnx(run, tmp_path / "v.onnx")
    meta = {p.key: p.value for p in onnx.load(str(done.path)).metadata_props}
    assert meta["imagegen.family"] == "flow" and "integrate from z" in meta["imagegen.usage"]
    k = int(meta["imagegen.sample_steps"])
    labels = torch.tensor([1, 0, 2])
    want = run.model.sample(3, labels=labels, generator=seed_generators([4, 5, 6]), solver="euler", steps=k,
                            guidance=1.0)
    cfg = run.model.cfg
    x = per_item_normal(3, (cfg.channels, 32, 32), seed_generators([4, 5, 6]), "cpu").numpy()
    sess, labels = _session(done.path), labels.numpy()
    for i in range(k):
        x = x + sess.run(None, {"x": x, "time": np.full(3, i / k, np.float32), "label": labels})[0] / k
    assert np.abs(np.clip(x, -1, 1) - want.numpy()).max() <= 1e-4


@pytest.mark.trained
def test_ddpm_graph_is_one_network_call_with_its_schedule(runs, tmp_path):
    run = imagegen.load_run(runs("ddpm"))
    done = export_onnx(run, tmp_path / "d.onnx")
    meta = {p.key: p.value for p in onnx.load(str(done.path)).metadata_props}
    ab = np.array(json.loads(meta["imagegen.alphas_cumprod"]))
    assert len(ab) == run.model.cfg.timesteps and np.allclose(ab, run.model.ab.numpy(), atol=1e-8)
    k = run.model.num_classes
    assert meta["imagegen.null_class"] == str(k) and meta["imagegen.prediction"] == run.model.cfg.prediction
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, run.model.cfg.channels, 32, 32, generator=g), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, k])
    want = run.model.guided(x, t, y, 1.0)
    got = _session(done.path).run(None, {"x": x.numpy(), "time": t.numpy(), "label": y.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4 and want.abs().max() > 1e-3


@pytest.mark.trained
def test_distilled_student_exports_its_whole_sampler(student, tmp_path):
    run = imagegen.load_run(student)
    done = export_onnx(run, tmp_path / "s.onnx")
    assert list(done.inputs) == ["z", "label"] and done.outputs["image"][1] == ("N", 3, 32, 32)
    z = per_item_normal(6, (3, 32, 32), seed_generators(range(6)), "cpu")
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    want = run.model.sample(6, labels=labels, generator=seed_generators(range(6))).numpy()
    got = _session(done.path).run(None, {"z": z.numpy(), "label": labels.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4


def test_export_refuses_a_model_without_network_and_a_bad_check(runs, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="no network"):
        export_onnx(imagegen.load_run(runs("random")), tmp_path / "r.onnx")
    # An export whose check fails leaves nothing at --out (nor its partial file).
    with pytest.raises(ExportError, match="differ from torch"):
        export_onnx(imagegen.load_run(runs("dcgan")), tmp_path / "g.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_export_command(runs, tmp_path):
    out = tmp_path / "deploy" / "dcgan.onnx"
    r = run_main("export", str(runs("dcgan")), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "input  z" in r.stdout and "checked: onnxruntime matches torch" in r.stdout
    onnx.checker.check_model(onnx.load(str(out)))
    r = run_main("export", str(runs("random")), "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "no network" in r.stderr and "Traceback" not in r.stderr
    r = run_main("export", str(runs("dcgan")), "--out", str(tmp_path / "x.bin"))
    assert r.returncode == 2 and "ends in .onnx" in r.stderr
    r = run_main("export", str(runs("dcgan")), "--format", "tflite", "--out", str(tmp_path / "x.onnx"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
