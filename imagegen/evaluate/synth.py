"""Generated images as training data: labelled synthetic datasets, and train-on-synthetic / test-on-real.

TSTR (Esteban et al., "Real-valued (Medical) Time Series Generation with Recurrent Conditional GANs",
2017; Ravuri & Vinyals, "Classification Accuracy Score for Conditional Generative Models", NeurIPS 2019):
train the evaluator's architecture, with the evaluator's recipe, on generated labelled images only, and
report its accuracy on the real test split next to the same classifier trained on real data.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

from ..checkpoint import load_run
from ..config import Range
from ..data import ImageDataset, load_data
from ..errors import ConfigError
from ..sample import generate, quantize, save_images, to_float
from .evaluator import EvaluatorConfig, accuracy, fit_classifier, run_data, run_evaluator

MAX_PER_CLASS = 20_000
PER_CLASS = Range(1, MAX_PER_CLASS)


def synthetic_dataset(run_dir: str | Path, per_class: int, *, seed_offset: int = 0) -> ImageDataset:
    """per_class images of every class from a conditional run: class c uses seeds
    seed_offset + c * per_class ... (c + 1) * per_class - 1. uint8 in memory, like any dataset."""
    PER_CLASS.check(per_class, "--per-class")
    run = load_run(run_dir)
    if not run.model.conditional:
        raise ConfigError(f"{run_dir}: a {run.family} model is not class-conditional, so it cannot label what it "
                          "generates (use cgan, cvae, or ddpm trained on labelled data)")
    images, labels = [], []
    for c in range(run.model.num_classes):
        seeds = list(range(seed_offset + c * per_class, seed_offset + (c + 1) * per_class))
        x = generate(run.model, seeds, labels=torch.full((per_class,), c))
        images.append(quantize(x))
        labels.append(torch.full((per_class,), c))
    return ImageDataset(images=torch.cat(images).contiguous(), labels=torch.cat(labels), classes=run.classes,
                        name=f"synthetic:{Path(run_dir).name}", source=str(run_dir))


def write_dataset(ds: ImageDataset, out_dir: str | Path, fmt: str = "folder") -> Path:
    """`folder`: out/<class>/NNNNNN.png (read back with --data folder:OUT --set data.size=S);
    `idx`: MNIST-style gzipped IDX files, grayscale only (read back with --data idx:OUT)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "idx":
        if ds.channels != 1:
            raise ConfigError("--format idx holds grayscale images only; use --format folder for colour")
        n, _, h, w = ds.images.shape
        (out / "train-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", n, h, w) + ds.images.numpy().tobytes()))
        (out / "train-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", n) + ds.labels.to(torch.uint8).numpy().tobytes()))
        (out / "classes.txt").write_text("\n".join(ds.classes) + "\n")
    elif fmt == "folder":
        for c, name in enumerate(ds.classes):
            folder = out / "".join(ch if ch.isalnum() or ch in " -_." else "-" for ch in name)
            sel = (ds.labels == c).nonzero().flatten()
            save_images(to_float(ds.images[sel]), folder, sel.tolist())
    else:
        raise ConfigError(f"--format must be folder or idx, got {fmt!r}")
    return out


def train_on_synthetic(run_dir: str | Path, *, per_class: int = 1000, log=print) -> dict:
    """TSTR accuracy of a conditional run next to the real-data accuracy of the same classifier recipe."""
    run = load_run(run_dir)
    evaluator = run_evaluator(run, log=log)
    cfg = EvaluatorConfig(**{**evaluator.info["config"], "limit": 0})
    synth = synthetic_dataset(run_dir, per_class, seed_offset=10**6)   # seeds apart from evaluate's 0..n-1
    net = fit_classifier(synth, cfg, log=None)
    test = load_data(run_data(run))
    return {"tstr_accuracy": accuracy(net, test), "real_accuracy": evaluator.info["test_accuracy"],
            "synthetic_images": len(synth), "per_class": per_class, "classifier": f"{evaluator.name} recipe",
            "real_test_images": len(test)}
