"""Run folders: manifests catch flipped bytes, pickles never run, non-finite tensors are never written."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

import imagegen
from imagegen.checkpoint import list_checkpoints, load_checkpoint, load_weights, save_checkpoint
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
