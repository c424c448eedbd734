"""The `imagegen` command as a user runs it: one end-to-end run through the installed entry point (a fresh
interpreter), then every command in this process through the same `main`, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import imagegen
from imagegen.cli import main

from conftest import run_main


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "imagegen", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_end_to_end_cli_on_shapes(tmp_path):
    """Train through the installed entry point (`python -m imagegen`, a fresh interpreter), then every
    other everyday command on that run, in this process through the same `main`."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('[model]\nwidth = 8\nz_dim = 16\n[data]\nlimit = 512\n[train]\nlog_every = 5\nsample_every = 10\ngrid_size = 16\n')
    r = run_cli("train", "--data", "shapes", "--model", "dcgan", "--steps", "12", "--batch-size", "16",
                "--config", str(cfg), "--set", "train.checkpoint_every=6", "--out", str(tmp_path / "runs"), "--no-progress")
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "00000-shapes-dcgan"
    for name in ("config.json", "model.safetensors", "ema.safetensors", "MANIFEST.json", "log.jsonl", "report.html"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-0000010.png", "step-0000012.png"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["width"] == 8 and saved["model"]["image_size"] == 32 and saved["model"]["channels"] == 3
    assert saved["train"]["checkpoint_every"] == 6 and saved["classes"][0] == "circle"
    report = (run_dir / "report.html").read_text()
    assert "data:image/png;base64" in report and "loss curves" in report

    r = run_main("train", "--resume", run_dir, "--steps", "16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((run_dir / "MANIFEST.json").read_text())["step"] == 16
    # The first command again with --resume auto: it finds that run by its config and continues it.
    r = run_main("train", "--data", "shapes", "--model", "dcgan", "--steps", "18", "--batch-size", "16", "--config", cfg,
                 "--set", "train.checkpoint_every=6", "--out", tmp_path / "runs", "--no-progress", "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert f"resuming {run_dir}" in r.stdout and json.loads((run_dir / "MANIFEST.json").read_text())["step"] == 18
    assert len(list((tmp_path / "runs").iterdir())) == 1

    r = run_main("sample", run_dir, "--seeds", "0-7", "--out", tmp_path / "imgs", "--grid", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "imgs").glob("seed*.png"))) == 8 and (tmp_path / "g.png").is_file()

    r = run_main("interpolate", run_dir, "--seeds", "3,9", "--frames", "6", "--out", tmp_path / "strip.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "strip.png").size == (6 * 34 + 2, 34 + 2)

    r = run_main("report", run_dir)
    assert r.returncode == 0 and "report.html" in r.stdout

    r = run_main("data", "info", "shapes")
    assert r.returncode == 0 and "8000 x 3 x 32 x 32" in r.stdout and "circle" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["train", "--data", "shapes", "--model", "dcgan", "--set", "model.widht=3"], "unknown config key model.widht"),
    (["train", "--data", "shapes", "--model", "dcgan", "--set", "train.steps=-5"], "train.steps must be in 1..1000000000, got -5"),
    (["train", "--data", "nowhere", "--model", "dcgan", "--steps", "1"], "unknown source"),
    (["train", "--data", "shapes", "--model", "gpt", "--steps", "1"], "unknown model"),
    (["train", "--data", "shapes", "--model", "dcgan", "--config", "/nonexistent.toml"], "config file not found"),
    (["train", "--resume", "/nonexistent-run", "--steps", "5"], "not a run folder"),
    (["sample", "/nonexistent-run", "--out", "x"], "not a run folder"),
    (["sample", "/nonexistent-run", "--seeds", "9-1", "--out", "x"], "runs backwards"),
    (["data", "info", "idx:/nonexistent"], "not a directory"),
    (["train", "--data", "shapes", "--model", "dcgan", "--steps", "1", "--set", "family=[1]"], "[1] is not a name"),
])
def test_bad_input_is_one_clear_line_not_a_traceback(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "--data", "shapes", "--model", "dcgan", "--set", "model.loss=hinge", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out.split("\n#")[0])
    assert cfg["model"]["loss"] == "hinge" and cfg["data"]["source"] == "shapes" and cfg["train"]["steps"] > 0


def test_resume_refuses_to_change_the_config(tiny_run, capsys):
    assert main(["train", "--resume", str(tiny_run), "--steps", "30", "--set", "model.width=4"]) == 2
    assert "cannot change" in capsys.readouterr().err
    assert main(["train", "--resume", str(tiny_run), "--steps", "10"]) == 2
    assert "already at step 20" in capsys.readouterr().err


def test_demo_falls_back_to_shapes_when_fashion_mnist_is_missing(tmp_path, monkeypatch, capsys):
    from imagegen.cli import training as cli
    from imagegen.errors import DataError

    real_load = cli.load_data

    def no_fashion(cfg):
        if cfg.source == "fashion-mnist":
            raise DataError("fashion-mnist: not found and the download failed")
        return real_load(cfg)

    monkeypatch.setattr(cli, "load_data", no_fashion)
    assert main(["demo", "--steps", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "neither installed nor downloadable" in captured.err and "shapes" in captured.err
    assert (tmp_path / "00000-shapes-dcgan" / "report.html").is_file()


def _labelled_folder(root, per_class: int = 16, split: str = "test"):
    """Shapes images as a folder with one subfolder per class, as a user's own labelled data would be."""
    ds = imagegen.load_data(imagegen.DataConfig(source="shapes", split=split))
    for c, name in enumerate(ds.classes):
        (root / name).mkdir(parents=True)
        for i, k in enumerate((ds.labels == c).nonzero().flatten()[:per_class].tolist()):
            Image.fromarray(ds.images[k].permute(1, 2, 0).numpy()).save(root / name / f"{i:03d}.png")
    return root


def test_evaluator_evaluate_tstr_analyse_and_synth_through_the_cli(tmp_path, monkeypatch, capsys):
    """The evaluation commands as a user runs them on their own labelled folder: `evaluator train`, then
    `evaluate --tstr`, `analyse --keep` and `synth` on a conditional run trained on that folder."""
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    data = f"folder:{_labelled_folder(tmp_path / 'imgs')}"
    assert main(["evaluator", "train", "--data", data, "--epochs", "1"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["train", "--data", data, "--model", "cgan", "--steps", "4", "--batch-size", "16", "--set", "model.width=8",
                 "--set", "data.size=32", "--set", "train.sample_every=0", "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = next((tmp_path / "runs").iterdir())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--n", "64", "--tstr", "--per-class", "8"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert "tstr" in metrics["metrics"] and metrics["metrics"]["tstr"]["synthetic_images"] == 32
    assert "64 generated" in out and "tstr" in out and "tstr" in (run / "report.html").read_text()
    assert main(["analyse", str(run), "--n", "64", "--keep", "0.5", "--out", str(tmp_path / "an")]) == 0
    kept = list((tmp_path / "an" / "kept").glob("*.png"))
    assert abs(len(kept) - 32) <= 4 and (tmp_path / "an" / "gallery.html").is_file()
    assert len(json.loads((tmp_path / "an" / "analysis.json").read_text())["images"]) == 64
    assert main(["synth", str(run), "--per-class", "3", "--out", str(tmp_path / "synth")]) == 0
    assert "wrote 12 images in 4 classes" in capsys.readouterr().out
    assert sorted(len(list(d.iterdir())) for d in (tmp_path / "synth").iterdir()) == [3, 3, 3, 3]
    # A folder that is not a run: one line, exit 2.
    assert main(["synth", str(run.parent.parent / "nope"), "--per-class", "3", "--out", str(tmp_path / "s2")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_a_grid_in_a_new_folder_is_written_and_a_metrics_list_is_refused(tiny_run, tmp_path):
    r = run_main("sample", tiny_run, "--seeds", "0-3", "--out", tmp_path / "o", "--grid", tmp_path / "new" / "deeper" / "g.png")
    assert r.returncode == 0 and (tmp_path / "new" / "deeper" / "g.png").is_file()
    r = run_main("sample", tiny_run, "--seeds", "0", "--out", tmp_path / "o", "--grid", "/proc/no-such-folder/g.png")
    assert r.returncode == 2 and "cannot write the image" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("[1, 2]")
    r = run_main("leaderboard", tmp_path / "run")
    assert r.returncode == 2 and "not a metrics or anchors file" in r.stderr
