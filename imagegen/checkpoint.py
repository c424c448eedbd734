"""All run-folder I/O: atomic writes, SHA-256 manifests, checkpoints and `load_run`.

A run folder describes itself:

    runs/00003-fashion-mnist-dcgan/
      config.json            the resolved config (family, model, data, train) and the class names
      model.safetensors      latest weights;  ema.safetensors: their exponential moving average
      MANIFEST.json          SHA-256 of the weight files, checked on every load (config.json is
                             checked by strict parsing instead, since --resume updates it)
      checkpoints/step-0001000/{model,ema,optim}.safetensors, state.json, MANIFEST.json
      log.jsonl  samples/  report.html

Weights and optimizer tensors are safetensors; everything else is JSON. Nothing is ever unpickled:
`load_weights` reads a foreign `.pt` file only with `torch.load(weights_only=True)`.
A checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a
half-written checkpoint under its final name; a non-finite tensor is never written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import from_dict
from .files import (MANIFEST, manifest_step, sha256_bytes, sha256_file, verify_manifest, write_bytes_atomic,  # noqa: F401 (re-exported)
                    write_json_atomic)
from .errors import CheckpointError, ConfigError, ImagegenError
from .models import Family, family_class

CKPT_RE = re.compile(r"^step-(\d{7,})$")


# --- atomic files and hashes: files.py (re-exported: run-folder code calls them through this module)


# --- tensors ----------------------------------------------------------------------------------------


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"refusing to write {what}: tensor {name!r} holds NaN or Inf")


def tensors_to_bytes(tensors: dict[str, torch.Tensor], what: str) -> bytes:
    check_finite(tensors, what)
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def save_hashed_weights(path: Path, tensors: dict[str, torch.Tensor], what: str) -> str:
    """Write tensors to `path` as safetensors, atomically; the SHA-256 of the bytes written, for a record
    (evaluator.json, judge.json) that `load_hashed_weights` checks them against."""
    data = tensors_to_bytes(tensors, what)
    write_bytes_atomic(path, data)
    return sha256_bytes(data)


def load_hashed_weights(path: Path, sha256: str, record: str) -> dict[str, torch.Tensor]:
    """The tensors of `path`, refused unless its SHA-256 is the one `record` holds."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if sha256_bytes(data) != sha256:
        raise CheckpointError(f"{path}: SHA-256 does not match {record} (corrupt or replaced)")
    return st_load(data)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat dict of tensors from `.safetensors`, or from a `.pt`/`.pth` state dict read with
    `weights_only=True` (a pickle that carries code is refused and never runs)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if path.suffix == ".safetensors":
        try:
            return st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for code payloads, RuntimeError for junk
            raise CheckpointError(f"{path}: refused, not a plain tensor file ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise CheckpointError(f"{path}: expected a flat dict of name -> tensor")
        return obj
    raise CheckpointError(f"{path}: unknown weight format {path.suffix!r} (use .safetensors)")


def _optim_split(name: str, sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, JSON skeleton that points at them)."""
    tensors, state = {}, {}
    for pid, entry in sd["state"].items():
        out = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                key = f"{name}.{pid}.{k}"
                tensors[key] = v
                out[k] = {"tensor": key}
            else:
                out[k] = v
        state[str(pid)] = out
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _optim_join(skeleton: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


# --- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, model: dict, ema: dict, optimizers: dict[str, dict],
                    state: dict, keep: int) -> Path:
    """Write checkpoints/step-NNNNNNN atomically, refresh the top-level weights, keep the last `keep`."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    optim_tensors, skeletons = {}, {}
    for name, sd in optimizers.items():
        t, skeletons[name] = _optim_split(name, sd)
        optim_tensors.update(t)
    blobs = {
        "model.safetensors": tensors_to_bytes(model, "model weights"),
        "ema.safetensors": tensors_to_bytes(ema, "EMA weights"),
        "optim.safetensors": tensors_to_bytes(optim_tensors, "optimizer state"),
        "state.json": (json.dumps({**state, "step": step, "optimizers": skeletons}, indent=1) + "\n").encode(),
    }
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for fname, data in blobs.items():
        with (tmp / fname).open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    manifest = {"files": {k: sha256_bytes(v) for k, v in blobs.items()}}
    write_json_atomic(tmp / MANIFEST, manifest)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Top-level copies for load_run: weights first, then the manifest that vouches for them.
    top = {k: blobs[k] for k in ("model.safetensors", "ema.safetensors")}
    for fname, data in top.items():
        write_bytes_atomic(run_dir / fname, data)
    files = {k: sha256_bytes(v) for k, v in top.items()}
    write_json_atomic(run_dir / MANIFEST, {"files": files, "step": step})
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(ckpt_dir: Path) -> dict:
    """{"model", "ema", "optimizers", "state"} from a checkpoint folder, verified against its manifest."""
    verify_manifest(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{ckpt_dir / 'state.json'}: unreadable ({e})") from None
    optim_tensors = load_weights(ckpt_dir / "optim.safetensors")
    return {
        "model": load_weights(ckpt_dir / "model.safetensors"),
        "ema": load_weights(ckpt_dir / "ema.safetensors"),
        "optimizers": {name: _optim_join(sk, optim_tensors) for name, sk in state.pop("optimizers").items()},
        "state": state,
    }


# --- run folders -----------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """'folder:/data/My Cats' -> 'folder-My-Cats': safe for a folder name."""
    kind, _, arg = text.partition(":")
    text = f"{kind}-{Path(arg).name}" if arg else kind
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:40] or "data"


def run_folders(out_root: Path) -> list[Path]:
    """The numbered run folders in `out_root`, newest (highest number) first."""
    out_root = Path(out_root)
    if not out_root.is_dir():
        return []
    return sorted((p for p in out_root.iterdir() if p.is_dir() and p.name[:5].isdigit()), key=lambda p: p.name, reverse=True)


def start_over(run_dir: Path) -> None:
    """Empty a run folder that never reached a checkpoint (its job died first) so a new start can use it:
    only what training writes is removed (log, grids, TensorBoard events, report, unfinished checkpoints)."""
    run_dir = Path(run_dir)
    for name in ("log.jsonl", "report.html", "metrics.json"):
        (run_dir / name).unlink(missing_ok=True)
    for path in [*run_dir.glob("events.out.tfevents.*"), *(run_dir / "samples").glob("step-*.png")]:
        path.unlink()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """Keep the lines of log.jsonl up to `step`: a resumed run logs the later steps again, and a line a
    killed process left half-written would run into the next one."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    if len(kept) != len(lines):
        write_bytes_atomic(path, "".join(kept).encode())


def new_run_dir(out_root: Path, data_name: str, model_name: str) -> Path:
    """runs/NNNNN-<data>-<model>, numbered one past the highest existing number."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[:5]) for p in run_folders(out_root)]
    n = max(numbers, default=-1) + 1
    while True:
        path = out_root / f"{n:05d}-{slug(data_name)}-{model_name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


# The sections of config.json and the type each must have: a run folder may come from anyone (a shared
# folder, a download), so a wrong type is a CheckpointError naming the field, never a TypeError later.
CONFIG_SECTIONS = {"family": str, "model": dict, "data": dict, "train": dict, "classes": list}


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json)") from None
    except (ValueError, RecursionError) as e:    # RecursionError: JSON nested thousands deep
        raise CheckpointError(f"{path}: unreadable ({str(e)[:200] or type(e).__name__})") from None
    if not isinstance(cfg, dict) or "family" not in cfg or "model" not in cfg:
        raise CheckpointError(f"{path}: missing 'family' or 'model'")
    for key, kind in CONFIG_SECTIONS.items():
        if key in cfg and not isinstance(cfg[key], kind):
            raise CheckpointError(f"{path}: '{key}' is a {type(cfg[key]).__name__}, not a {kind.__name__}")
    if not all(isinstance(c, str) for c in cfg.get("classes", [])):
        raise CheckpointError(f"{path}: 'classes' must be a list of names")
    if not isinstance(cfg.get("data", {}).get("source", ""), (str, type(None))):
        raise CheckpointError(f"{path}: 'data.source' must be a string")
    return _as_saved_then(cfg)


# Model fields added after runs were saved: (the saved models they concern, the fields, with the values those
# runs were trained with). The first field's absence marks a run saved before them.
ADDED_LATER = (
    # text runs: cross-attention in the middle only, without position codes
    (lambda model: model.get("text_dim"), {"text_levels": 0, "text_positions": False}),
    (lambda model: "mults" in model, {"unet_patch": 1}),                # U-Nets: no patches
    (lambda model: "time_sampling" in model, {"time_shift": 1.0}),      # flows: no resolution shift
    (lambda model: "schedule" in model, {"schedule_shift": 1.0}),       # ddpm runs: no resolution shift
)


def _as_saved_then(cfg: dict) -> dict:
    """A config.json written before a model field existed, with the value that field stands for in it."""
    model = cfg["model"]
    if not isinstance(model, dict):
        return cfg
    for concerns, fields in ADDED_LATER:
        if concerns(model) and next(iter(fields)) not in model:
            model = {**model, **fields}
    return {**cfg, "model": model}


@dataclass
class Run:
    """A trained run rebuilt from its folder: the model (EMA weights by default) and what describes it."""
    path: Path
    config: dict              # the resolved config.json
    model: Family
    step: int

    @property
    def family(self) -> str:
        return self.config["family"]

    @property
    def classes(self) -> list[str]:
        return list(self.config.get("classes", []))

    @property
    def data_source(self) -> str | None:
        """The `--data` spec the run trained on (e.g. "fashion-mnist")."""
        return self.config.get("data", {}).get("source")


def build_model(family: str, model_cfg: dict) -> Family:
    cls = family_class(family)
    try:
        cfg = from_dict(cls.Config, model_cfg, "model")
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None
    return cls(cfg)


def weight_bytes(family: str, model_cfg: dict) -> int:
    """The bytes of the state dict that a model config describes, counted on the meta device: nothing is
    allocated, so a config asking for 10 GiB of weights costs nothing to refuse."""
    try:
        with torch.device("meta"):
            model = build_model(family, model_cfg)
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())
    except ImagegenError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"config.json: the model cannot be built ({type(e).__name__}: {str(e)[:200]})") from None


def load_run(path: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu",
             max_bytes: int | None = None) -> Run:
    """Rebuild a run's model from its folder alone, after checking the files against the manifest and the
    model's size against its weights file (and `max_bytes`, if given), before allocating it."""
    run_dir = Path(path)
    if weights not in ("ema", "model"):
        raise ValueError("weights must be 'ema' or 'model'")
    cfg = read_config(run_dir)
    verify_manifest(run_dir)
    file = run_dir / f"{weights}.safetensors"
    need = weight_bytes(cfg["family"], cfg["model"])
    if max_bytes is not None and need > max_bytes:
        raise CheckpointError(f"{run_dir / 'config.json'}: the model needs {need / 2**20:.0f} MiB of weights; "
                              f"at most {max_bytes / 2**20:.0f} MiB are loaded here")
    have = file.stat().st_size if file.is_file() else None
    if have is not None and need > have:
        raise CheckpointError(f"{run_dir / 'config.json'}: the model needs {need / 2**20:.1f} MiB of weights; "
                              f"{file.name} holds {have / 2**20:.1f} MiB")
    model = build_model(cfg["family"], cfg["model"])
    try:
        model.load_state_dict(load_weights(file))
    except RuntimeError as e:
        raise CheckpointError(f"{file}: does not fit the model in config.json ({e})") from None
    # The memory format the run trained and drew its grids in: convolution kernels round differently in
    # each, so this keeps `sample` bit-identical to the run's own grids.
    channels_last = cfg.get("train", {}).get("channels_last", True)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.eval().requires_grad_(False)
    return Run(path=run_dir, config=cfg, model=model, step=manifest_step(run_dir))
