"""`imagegen distill`: a trained flow or ddpm run in, a new run folder out whose student samples in 1, 2
or 4 steps (models/distilled.py for the method).

1. Couplings: `pairs` noises z_i, each drawn from the generator of seed COUPLING_SEEDS + i (never the
   seeds 0..n-1 that `evaluate` draws), and the teacher's deterministic image of each (flow: its ODE
   solver; ddpm: DDIM with eta = 0), with labels i mod classes for a conditional teacher, at the
   teacher's own sampling options unless `teacher_steps` is given.
2. The student trains on them through the ordinary training loop (`train`): the same run folder,
   checkpoints, EMA, log, grids and report as any run; its config names the teacher and its hash.

The teacher's images of the couplings are kept in the student's folder (COUPLINGS, uint8 with the
labels and the teacher's hash; the noise is drawn again from its seeds), so that a resume
(`resume=RUN`) continues the run without asking the teacher again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import MANIFEST, load_run, read_config, write_bytes_atomic
from .config import Range, apply_overrides
from .data import DataConfig, load_data
from .data.dataset import ImageDataset
from .errors import ConfigError
from .models.base import per_item_normal
from .models.distilled import Distilled
from .sample import default_labels, quantize, seed_generators
from .train import resolve_config, train

COUPLINGS = "couplings.safetensors"
COUPLING_SEEDS = 1_000_000_000   # couplings use seeds from here on: evaluation draws 0..n-1
PAIRS = Range(16, 10_000_000)
STUDENT_STEPS = Range(1, 4)   # of which 1, 2 and 4


@dataclass
class CouplingDataset(ImageDataset):
    """The teacher's images (`images`, uint8) with the noise each came from (`noise`, float N x C x H x W)
    and, for the adversarial term, the real training images (`real`). A batch holds all three."""
    noise: torch.Tensor = field(default=None)
    real: ImageDataset | None = None

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().batch(index)
        out["noise"] = self.noise[index]
        if self.real is not None:   # real images unrelated to the couplings: any index will do
            out["real"] = self.real.batch(index % len(self.real))["image"]
        return out


def teacher_hash(run_dir: Path) -> str:
    return json.loads((Path(run_dir) / MANIFEST).read_text())["files"]["ema.safetensors"]


def couplings(teacher, n: int, *, steps: int | None = None, batch_size: int = 256, real: ImageDataset | None = None,
              progress: bool = True, first: int = 0) -> CouplingDataset:
    """n (noise, teacher image, label) triples from a loaded teacher run (module docstring, step 1):
    couplings first .. first + n - 1 (so a long draw can be split)."""
    model = teacher.model
    if not model.distillable:
        raise ConfigError(f"distill takes a flow or ddpm run; {teacher.path} is {teacher.family!r}")
    PAIRS.check(first + n, "--pairs")
    seeds = list(range(COUPLING_SEEDS + first, COUPLING_SEEDS + first + n))
    labels = default_labels(model, seeds)
    shape = (model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
    noise = coupling_noise(seeds, shape)
    images = torch.empty((n, *shape), dtype=torch.uint8)
    opts = {} if steps is None else {"steps": steps}
    with tqdm(total=n, desc="teacher couplings", unit="img", disable=not progress) as bar:
        for i in range(0, n, batch_size):
            lab = None if labels is None else labels[i:i + batch_size]
            x = model.from_noise(noise[i:i + batch_size], labels=lab, **opts)
            images[i:i + len(x)] = quantize(x)
            bar.update(len(x))
    return _dataset(teacher, images, labels if labels is not None else torch.full((n,), -1), noise, real)


def coupling_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of each coupling seed (len(seeds) x *shape), from that seed's generator alone."""
    return per_item_normal(len(seeds), shape, seed_generators(seeds), torch.device("cpu"))


def _dataset(teacher, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
             real: ImageDataset | None) -> CouplingDataset:
    return CouplingDataset(images=images, labels=labels, classes=teacher.classes if teacher.model.conditional else [],
                           name=f"couplings of {teacher.path}", source=str(teacher.path), noise=noise, real=real)


def save_couplings(ds: CouplingDataset, run_dir: Path, sha256: str) -> None:
    from safetensors.torch import save
    write_bytes_atomic(Path(run_dir) / COUPLINGS, save({"images": ds.images.contiguous(), "labels": ds.labels.contiguous()},
                                                      metadata={"teacher_sha256": sha256}))


def load_couplings(teacher, run_dir: Path, n: int, real: ImageDataset | None, *,
                   fewer: bool = False) -> CouplingDataset | None:
    """The couplings kept in a student's folder, or None when there are none for this teacher and n (with
    `fewer`, also the first m < n of them: the caller draws the rest)."""
    from safetensors import safe_open
    path = Path(run_dir) / COUPLINGS
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if f.metadata().get("teacher_sha256") != teacher_hash(teacher.path):
            return None
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
    if images.shape[0] != n and not (fewer and images.shape[0] < n):
        return None
    noise = coupling_noise(list(range(COUPLING_SEEDS, COUPLING_SEEDS + images.shape[0])), tuple(images.shape[1:]))
    return _dataset(teacher, images, labels, noise, real)


def sampler_of(teacher, steps: int | None) -> str:
    settings = teacher.model.sampling_settings()
    what = {k: settings[k] for k in ("solver", "sample_steps", "guidance") if k in settings}
    if steps is not None:
        what["sample_steps"] = steps
    if "sampler" in settings:            # ddpm: its couplings come from deterministic DDIM
        what["sampler"] = "ddim, eta 0"
    return ", ".join(f"{k} {v}" for k, v in what.items())


def distill(teacher_dir: str | Path, *, steps: int = 1, out: str | Path = "runs", pairs: int = 20_000,
            teacher_steps: int | None = None, overrides: list[str] = (), resume: str | Path | None = None,
            train_steps: int | None = None, progress: bool = True, couplings_from: str | Path | None = None) -> Path:
    """A new run folder under `out` (or `resume` continued up to train_steps) whose student samples in
    `steps` steps what the teacher run at `teacher_dir` samples; `overrides` are KEY=VALUE strings
    (model.method=reflow, model.adversarial=0.05, train.batch_size=128...). `couplings_from`: another
    student of the same teacher whose kept couplings (same pairs and teacher steps) a new student reuses,
    so that trying another student costs no teacher time."""
    if steps not in (1, 2, 4):
        raise ConfigError(f"--steps must be 1, 2 or 4, got {steps}")
    teacher = load_run(teacher_dir)
    if resume is not None:
        saved = read_config(resume)
        if saved.get("family") != Distilled.name or saved["model"].get("teacher_sha256") != teacher_hash(teacher.path):
            raise ConfigError(f"{resume} is not a distilled run of {teacher.path} (family or teacher hash differ)")
        tree = {k: saved.get(k, {}) for k in ("family", "model", "data", "train")}
        if train_steps is not None:
            tree["train"] = {**tree["train"], "steps": train_steps}
        pairs, teacher_steps = int(saved["model"]["pairs"]), int(saved["model"]["teacher_steps"]) or None
    else:
        tree = {"family": "distilled", "data": dict(teacher.config.get("data", {})),
                "model": {"steps": steps, "teacher": str(Path(teacher.path).resolve()), "teacher_family": teacher.family,
                          "teacher_sha256": teacher_hash(teacher.path), "teacher_sampler": sampler_of(teacher, teacher_steps),
                          "pairs": pairs, "teacher_steps": teacher_steps or 0},
                "train": {} if train_steps is None else {"steps": train_steps}}
        apply_overrides(tree, list(overrides))
    cfg = resolve_config(tree)
    real = None
    if cfg.model.adversarial:
        real = load_data(DataConfig.as_saved(teacher.config.get("data", {})))
    if couplings_from is not None:
        if resume is not None:
            raise ConfigError("--couplings-from is for a new student; a resumed one keeps its own couplings")
        donor = read_config(couplings_from)
        if donor.get("family") != Distilled.name or int(donor["model"].get("teacher_steps", 0)) != (teacher_steps or 0):
            raise ConfigError(f"{couplings_from} is not a student drawn at the same teacher steps "
                              f"({teacher_steps or 'the teacher own'})")
        kept = load_couplings(teacher, couplings_from, pairs, real, fewer=True)
        if kept is None:
            raise ConfigError(f"{couplings_from} keeps no couplings of {teacher.path} up to --pairs {pairs} "
                              "(teacher hash differs, or it keeps more)")
        if len(kept) < pairs:   # draw only the missing ones: couplings len(kept) .. pairs - 1
            more = couplings(teacher, pairs - len(kept), steps=teacher_steps, real=real, progress=progress,
                             first=len(kept))
            kept = _dataset(teacher, torch.cat([kept.images, more.images]), torch.cat([kept.labels, more.labels]),
                            torch.cat([kept.noise, more.noise]), real)
    else:
        kept = load_couplings(teacher, resume, pairs, real) if resume is not None else None
    pairs_ds = kept if kept is not None else couplings(teacher, pairs, steps=teacher_steps, real=real, progress=progress)
    run_dir = train(cfg, out=out, resume=resume or "never", progress=progress, dataset=pairs_ds)
    if kept is None or couplings_from is not None:   # keep them in this folder too, for a resume
        save_couplings(pairs_ds, run_dir, teacher_hash(teacher.path))
    return run_dir
