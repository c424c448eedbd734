"""The evaluator (trained, cached, verified) and `imagegen evaluate` on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch

import imagegen
from imagegen.errors import CheckpointError
from imagegen.evaluate.evaluator import EvaluatorConfig, load_evaluator, train_evaluator
from imagegen.evaluate.run_eval import compare, evaluate_run

TINY_EVAL = EvaluatorConfig(data="shapes", epochs=3, width=8, limit=2048, batch_size=64, lr=5e-3)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_CACHE", str(cache))
        ev = train_evaluator(TINY_EVAL, log=None)
    return ev, cache


def test_evaluator_is_deterministic_cached_and_verified(evaluator, tmp_path, monkeypatch):
    ev, cache = evaluator
    assert ev.info["test_accuracy"] > 0.9          # 4 easy classes
    assert ev.name.startswith("cnn32-shapes-") and ev.name.endswith(ev.info["sha256"][:8])
    again = train_evaluator(TINY_EVAL, out=tmp_path / "again", log=None)
    assert again.info["sha256"] == ev.info["sha256"]          # same data, seed, machine: same weights
    monkeypatch.setenv("IMAGEGEN_CACHE", str(cache))
    loaded = load_evaluator("shapes")
    x = imagegen.load_data("shapes").batch(torch.arange(8))["image"]
    assert torch.equal(loaded.features(x), ev.features(x)) and loaded.features(x).shape == (8, 32)
    weights = tmp_path / "again" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_evaluator("shapes", folder=tmp_path / "again")


def test_real_data_scores_better_than_the_random_baseline(evaluator):
    ev, _ = evaluator
    test = imagegen.load_data(imagegen.DataConfig(source="shapes", split="test"))
    train = imagegen.load_data("shapes")
    real_test = test.images[:1000].float() / 127.5 - 1
    real_train = train.images[:1000].float() / 127.5 - 1
    model = imagegen.build_model("random", {"image_size": 32, "channels": 3})
    model.prepare(train)
    noise = imagegen.generate(model, list(range(1000)))
    floor, rand = compare(ev, real_test, real_train), compare(ev, real_test, noise)
    fd = f"FD-{ev.name}"
    assert floor[fd] < rand[fd] / 5
    assert floor["precision"] > rand["precision"] and floor["recall"] > rand["recall"]
    assert floor["class_coverage"]["classes_present"] == 4


def test_evaluate_writes_stamped_metrics_and_a_report_section(evaluator, tiny_run, monkeypatch, capsys):
    _, cache = evaluator
    monkeypatch.setenv("IMAGEGEN_CACHE", str(cache))
    from imagegen.cli import main
    assert main(["evaluate", str(tiny_run), "--n", "300"]) == 0
    out = json.loads((tiny_run / "metrics.json").read_text())
    p = out["protocol"]
    assert p["generated"] == 300 and p["real"] == 2000 and p["real_split"] == "test" and p["seeds"] == "0-299"
    assert p["evaluator"].startswith("cnn32-shapes-") and len(p["evaluator_sha256"]) == 64
    assert out["metrics"][f"FD-{p['evaluator']}"] > 0
    assert "Evaluation" in (tiny_run / "report.html").read_text()
    assert "FD-cnn32-shapes-" in capsys.readouterr().out


def test_vae_evaluation_reports_reconstruction_error(evaluator, tmp_path):
    ev, _ = evaluator
    from conftest import tiny_config
    tree = tiny_config(4).to_json()
    tree["family"], tree["model"] = "vae", {"width": 8, "z_dim": 8}
    run_dir = imagegen.train(imagegen.resolve_config(tree), out=tmp_path, progress=False)
    out = evaluate_run(run_dir, n=50, extractor=ev, log=None)
    assert 0 < out["metrics"]["reconstruction_mse"] < 4
