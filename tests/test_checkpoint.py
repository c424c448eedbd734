"""Run folders: manifests catch flipped bytes, pickles never run, non-finite tensors are never written."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

import imagegen
from imagegen.checkpoint import list_checkpoints, load_checkpoint, load_weights, save_checkpoint
from imagegen.cli import main

from conftest import private_copy
from imagegen.errors import CheckpointError


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_load_run_rebuilds_the_model_from_the_folder(tiny_run):
    run = imagegen.load_run(tiny_run)
    assert run.family == "dcgan" and run.step == 20
    assert run.classes == ["circle", "square", "triangle", "star"]
    images = imagegen.generate(run.model, [0, 1, 2])
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("name", ["ema.safetensors", "model.safetensors"])
def test_flipped_byte_in_top_level_weights_is_detected(tiny_run, tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    _flip_byte(run_dir / name)
    with pytest.raises(CheckpointError, match=name):
        imagegen.load_run(run_dir, weights=name.split(".")[0])


def test_flipped_byte_in_checkpoint_is_detected(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    ckpt = list_checkpoints(run_dir)[-1]
    _flip_byte(ckpt / "optim.safetensors")
    with pytest.raises(CheckpointError, match="optim.safetensors"):
        load_checkpoint(ckpt)


class _Payload:
    """Unpickling this would run code (creating the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    with path.open("wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(path)
    assert not marker.exists()
    # torch.save's zip format with the same payload is refused as well
    path2 = tmp_path / "weights2.pt"
    torch.save({"weight": _Payload(marker)}, path2)
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(path2)
    assert not marker.exists()


def test_plain_tensor_pt_file_loads(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.arange(3.0)}, path)
    assert load_weights(path)["a"].tolist() == [0.0, 1.0, 2.0]


def test_non_finite_tensor_is_never_written(tmp_path):
    model = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        save_checkpoint(tmp_path, 5, model, model, {}, {}, keep=2)
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / "model.safetensors").exists()


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    model = {"w": torch.ones(2)}
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, model, {}, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000030", "step-0000040"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_not_a_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder"):
        imagegen.load_run(tmp_path)


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# Each way a run folder can be damaged, and the words of the CheckpointError that must name it.
DAMAGE = {
    "manifest missing": (lambda r: (r / "MANIFEST.json").unlink(), "MANIFEST.json: missing"),
    "manifest not JSON": (lambda r: (r / "MANIFEST.json").write_text("{oops"), "MANIFEST.json: unreadable manifest"),
    "manifest without files": (lambda r: (r / "MANIFEST.json").write_text('{"step": 20}'), "unreadable manifest"),
    "listed file gone": (lambda r: (r / "ema.safetensors").unlink(), "ema.safetensors: listed in the manifest but missing"),
    "config not JSON": (lambda r: (r / "config.json").write_text("not json"), "config.json: unreadable"),
    "config without family": (lambda r: _edit_json(r / "config.json", lambda d: d.pop("family")), "missing 'family' or 'model'"),
    "config with an unknown key": (lambda r: _edit_json(r / "config.json", lambda d: d["model"].update(widht=8)),
                                   "unknown config key model.widht"),
    "weights do not fit the config": (lambda r: _edit_json(r / "config.json", lambda d: d["model"].update(width=4)),
                                      "ema.safetensors: does not fit the model in config.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_run_folder_is_refused_naming_what_is_wrong(tiny_run, tmp_path, damage, capsys):
    run_dir = private_copy(tiny_run, tmp_path)
    damage_fn, words = DAMAGE[damage]
    damage_fn(run_dir)
    with pytest.raises(CheckpointError) as err:
        imagegen.load_run(run_dir)
    assert words in str(err.value)
    # The CLI says the same in one line and exits 2.
    assert main(["sample", str(run_dir), "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().err
    assert words in out and "Traceback" not in out and not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_state_is_refused(tiny_run, tmp_path):
    run_dir = private_copy(tiny_run, tmp_path)
    ckpt = list_checkpoints(run_dir)[-1]
    (ckpt / "state.json").write_text("{")                  # listed in the checkpoint's manifest
    with pytest.raises(CheckpointError, match="state.json: SHA-256 does not match"):
        load_checkpoint(ckpt)
    shutil.rmtree(ckpt)
    ckpt = list_checkpoints(run_dir)[-1]
    (ckpt / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="MANIFEST.json: missing"):
        load_checkpoint(ckpt)


def test_weights_are_written_atomically_and_verified(tmp_path):
    model = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, 1, model, model, {}, {}, keep=2)
    assert not any(p.name.startswith(".tmp") or p.suffix == ".partial" for p in tmp_path.rglob("*"))
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[-1])["model"]["w"], model["w"])
    assert torch.equal(load_weights(tmp_path / "model.safetensors")["w"], model["w"])
    (tmp_path / "x.npz").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="unknown weight format '.npz'"):
        load_weights(tmp_path / "x.npz")
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="x.pt: refused"):
        load_weights(tmp_path / "x.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="flat dict"):
        load_weights(tmp_path / "list.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path / "missing.safetensors")
