"""Run folders loaded defensively (checkpoint.read_config, files.read_manifest, checkpoint.weight_bytes and
serve.common.find_runs): each broken folder is skipped with its one-line reason while the good runs are
served, and a config that asks for tens of GiB of weights is refused without allocating them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import imagegen
from imagegen.checkpoint import weight_bytes
from imagegen.errors import CheckpointError, ImagegenError
from imagegen.serve import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from conftest import LOCAL, run_main

HUGE = {"width": 1024, "image_size": 64}     # a DCGAN of about 27 GiB of weights


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_model(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# name -> (how the copy of a good run is broken, a word its reason must hold)
BROKEN = {
    "model-is-text": (lambda d: edit_json(d / "config.json", model="ab"), "'model' is a str"),
    "family-is-list": (lambda d: edit_json(d / "config.json", family=["dcgan"]), "'family' is a list"),
    "train-is-list": (lambda d: edit_json(d / "config.json", train=[]), "'train' is a list"),
    "data-is-text": (lambda d: edit_json(d / "config.json", data="x"), "'data' is a str"),
    "classes-are-numbers": (lambda d: edit_json(d / "config.json", classes=[1, 2]), "list of names"),
    "nested-100000-deep": (lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000), "unreadable"),
    "manifest-files-list": (lambda d: edit_json(d / "MANIFEST.json", files=[]), "'files' must map"),
    "manifest-step-text": (lambda d: edit_json(d / "MANIFEST.json", step="x"), "not a step number"),
    "manifest-escapes": (lambda d: edit_json(d / "MANIFEST.json", files={"../good/ema.safetensors": "0" * 64}),
                         "not a file inside"),
    "huge-model": (lambda d: edit_model(d, **HUGE), "MiB of weights"),
    "wider-than-its-weights": (lambda d: edit_model(d, width=64), "holds"),
    "unknown-family": (lambda d: edit_json(d / "config.json", family="nope"), "nope"),
}


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(tiny_run, root / "good")
    for name, (brake, _) in BROKEN.items():
        brake(Path(shutil.copytree(tiny_run, root / name)))
    return root


def test_each_broken_run_is_skipped_with_its_reason_and_the_good_one_serves(runs):
    said = []
    with TestClient(create_app(runs, log=said.append), base_url=LOCAL, raise_server_exceptions=False) as c:
        r = c.get("/api/models")
        assert r.status_code == 200 and [m["name"] for m in r.json()] == ["good"]
        assert r.headers["X-Imagegen-Skipped"] == str(len(BROKEN))
        skipped = {s["name"]: s["reason"] for s in c.get("/api/skipped").json()}
        assert set(skipped) == set(BROKEN)
        for name, (_, word) in BROKEN.items():
            assert word in skipped[name], (name, skipped[name])
            assert "\n" not in skipped[name] and str(runs) not in skipped[name]   # one line, no absolute path
        assert c.post("/api/generate", json={"model": "good", "seed": 1}).status_code == 200
        assert c.post("/api/generate", json={"model": "data-is-text"}).status_code == 404
    assert len(said) == len(BROKEN) and all(line.startswith("not serving ") for line in said)


def test_the_library_names_what_is_wrong(runs):
    for name, (_, word) in BROKEN.items():
        with pytest.raises(ImagegenError) as e:       # CheckpointError; ConfigError for the unknown family
            imagegen.load_run(runs / name)
        assert word in str(e.value), (name, str(e.value))
    with pytest.raises(CheckpointError, match="are loaded here"):
        imagegen.load_run(runs / "good", max_bytes=1 << 10)
    assert weight_bytes("dcgan", HUGE) > 10 << 30
    r = run_main("sample", runs / "huge-model", "--seeds", "0", "--out", runs.parent / "never")
    assert r.returncode == 2 and "MiB of weights" in r.stderr and "Traceback" not in r.stderr


def test_a_config_asking_for_27_gib_is_refused_without_allocating(runs, tmp_path):
    """In a fresh process, so that its peak resident memory is the load's own: VmHWM of /proc/self/status,
    the high-water mark of this program's memory (ru_maxrss would keep the forking test process's peak,
    which Linux carries across exec)."""
    only = tmp_path / "only"
    shutil.copytree(runs / "huge-model", only / "huge-model")
    code = ("import sys; from pathlib import Path; from imagegen.serve.common import find_runs\n"
            "skipped = {}; runs = find_runs(Path(sys.argv[1]), log=None, skipped=skipped)\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
            "print(len(runs), int(hwm) >> 10, skipped['huge-model'])")
    out = subprocess.run([sys.executable, "-c", code, str(only)], capture_output=True, text=True, timeout=120)
    served, peak_mib, reason = out.stdout.split(" ", 2)
    assert served == "0" and "MiB of weights" in reason
    assert int(peak_mib) < 2048, f"peak {peak_mib} MiB"     # 27 GiB would be far above; torch itself is ~0.5 GiB
