"""The evaluator: a small CNN classifier imagegen trains itself, per dataset, whose features every metric uses.

Standard FID needs ImageNet Inception weights, which cannot be fetched here and mean little on 28x28
grayscale. So each dataset gets its own classifier, trained deterministically on the train split; its
penultimate layer (global-average-pooled, `feature_dim` wide) is the feature space, its softmax the class
probabilities. Metrics are named after it (`FD-<evaluator name>`), and the name carries the SHA-256 of
its weights, so two numbers are comparable only when the names match.

Cached under $IMAGEGEN_CACHE/evaluators/<data>/ (default ~/.cache/imagegen): weights.safetensors and
evaluator.json (config, test accuracy, hash). Any feature extractor with `name`, `features(images)` and
`probs(images)` can stand in for it (`FeatureExtractor`), e.g. an Inception backbone for whoever has the
weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_hashed_weights, save_hashed_weights, slug, write_json_atomic
from ..config import MAX_BATCH, MAX_IMAGE_SIZE, MAX_SEED, MAX_WIDTH, cache_path, from_dict, ranged, validate
from ..data import DataConfig, load_data
from ..data.registry import HELD_OUT
from ..errors import CheckpointError, ConfigError
from .contrastive import PROJECTION, fit_contrastive, retrieval_accuracy
from .geneval import get_judge

BATCH = 256  # images per forward pass when extracting features


class FeatureExtractor(Protocol):
    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor: ...   # N x C x H x W in [-1, 1] -> N x D

    # -> N x K class probabilities; None for an extractor without image classes (the scenes judge),
    # which skips the metrics that need them
    def probs(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EvaluatorConfig:
    data: str = "fashion-mnist"
    epochs: int = ranged(2, 1, 1000)
    batch_size: int = ranged(128, 1, MAX_BATCH)
    lr: float = ranged(2e-3, 0.0, 1.0, lo_open=True)
    width: int = ranged(32, 1, MAX_WIDTH)   # channels of the first block, doubled per block; features are 4 * width
    seed: int = ranged(0, 0, MAX_SEED)
    limit: int = ranged(0, 1, 2**31 - 1, zero="all")   # train on the first N images only (tests)
    # image side the evaluator works at, and its channels (1 or 3); 0 = the data's own (as data.size)
    size: int = ranged(0, 8, MAX_IMAGE_SIZE, zero="the data's own")
    channels: int = ranged(0, 1, 3, zero="the data's own")
    # "classifier" (needs classes), "contrastive" (any images: evaluate/contrastive.py), or "auto": the
    # classifier where the data has classes, else contrastive
    kind: Literal["auto", "classifier", "contrastive"] = "auto"
    held_out: float = ranged(0.0, HELD_OUT)   # the data's data.held_out: trained on the rest, measured on it

    def validate(self) -> None:
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"evaluator.channels must be 0, 1 or 3, got {self.channels}")


class EvalNet(nn.Module):
    """conv-BN-ReLU blocks at full, 1/2 and 1/4 resolution, global average pool, linear classifier."""

    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(channels, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:           # N x C x H x W -> N x 4w
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # -> N x classes logits
        return self.head(self.features(x))


class Evaluator:
    """A trained EvalNet and what describes it: name (with weight hash), classes, test accuracy."""

    def __init__(self, net: EvalNet, info: dict) -> None:
        self.net = net.eval().requires_grad_(False)
        self.info = info
        self.name = info["name"]
        if info.get("kind") == "contrastive":   # no classes: the metrics that need them are skipped
            self.probs = None

    @torch.no_grad()
    def _run(self, images: torch.Tensor, head: bool) -> torch.Tensor:
        size, channels = self.info["image_size"], self.info["channels"]
        if images.shape[1:] != (channels, size, size):
            raise ConfigError(f"evaluator {self.name} takes {channels}x{size}x{size} images, got "
                              f"{'x'.join(map(str, images.shape[1:]))}")
        out = []
        for i in range(0, images.shape[0], BATCH):
            x = images[i:i + BATCH].float()
            out.append(self.net(x).softmax(1) if head else self.net.features(x))
        return torch.cat(out).double()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, head=False)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, head=True)


def cache_dir(data: str, size: int = 0, channels: int = 0, kind: str = "auto", held_out: float = 0.0) -> Path:
    """One folder per (data, size, channels, kind, held-out share). Specs with a path also carry a hash of
    the spec, so two folders with the same name never share an evaluator."""
    name = slug(data) + (f"-{size}px" if size else "") + (f"-{channels}ch" if channels else "")
    name += ("" if kind == "auto" else f"-{kind}") + (f"-heldout{held_out:g}" if held_out else "")
    if "/" in data:
        name += "-" + hashlib.sha256(data.encode()).hexdigest()[:8]
    return cache_path("evaluators", name)


def fit_classifier(train_ds, cfg: EvaluatorConfig, log=print) -> EvalNet:
    """An EvalNet trained on a labelled dataset: Adam with a one-cycle schedule, batches from
    (seed, step), so the same data, config and machine give the same weights."""
    if not train_ds.labelled:
        raise ConfigError(f"the evaluator is a classifier: {train_ds.name!r} has no classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = EvalNet(train_ds.channels, len(train_ds.classes), cfg.width)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps = cfg.epochs * train_ds.steps_per_epoch(cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    net.train()
    for step in range(steps):
        b = train_ds.batch_at(step, cfg.batch_size, cfg.seed)
        loss = F.cross_entropy(net(b["image"]), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 200 == 0:
            log(f"classifier step {step + 1}/{steps}  loss {loss.item():.3f}")
    return net.eval()


def accuracy(net: EvalNet, ds) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ds), BATCH):
            b = ds.batch(torch.arange(i, min(i + BATCH, len(ds))))
            correct += int((net(b["image"]).argmax(1) == b["label"]).sum())
    return correct / len(ds)


def train_evaluator(cfg: EvaluatorConfig, *, out: Path | None = None, log=print) -> Evaluator:
    """Train the evaluator on cfg.data's train split (deterministic for a given seed and machine),
    measure it on the test split, save it to the cache (or `out`) and return it."""
    validate(cfg, "evaluator")
    # A pair of domains (pair:DIR) gives a two-class domain classifier: label 0 = A, 1 = B.
    train_ds, test_ds = (_labelled(load_data(DataConfig(source=cfg.data, split=split, limit=limit, size=cfg.size,
                                                        channels=cfg.channels, held_out=cfg.held_out)))
                         for split, limit in (("train", cfg.limit), ("test", 0)))
    kind = cfg.kind if cfg.kind != "auto" else "classifier" if train_ds.labelled else "contrastive"
    t0 = time.perf_counter()
    if kind == "classifier":
        net = fit_classifier(train_ds, cfg, log)
        measured = {"test_accuracy": accuracy(net, test_ds)}
    else:   # no classes needed: SimCLR on the images themselves
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = EvalNet(train_ds.channels, PROJECTION, cfg.width)
        net = fit_contrastive(net, train_ds, cfg, log)
        measured = {"test_retrieval": retrieval_accuracy(net, test_ds)}

    folder = Path(out) if out is not None else cache_dir(cfg.data, cfg.size, cfg.channels, cfg.kind, cfg.held_out)
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_hashed_weights(folder / "weights.safetensors", net.state_dict(), "the evaluator")
    prefix = "cnn" if kind == "classifier" else "simclr"
    info = {"name": f"{prefix}{4 * cfg.width}-{slug(train_ds.name)}-{digest[:8]}", "sha256": digest, "config": asdict(cfg),
            "kind": kind, "classes": train_ds.classes if kind == "classifier" else [], "image_size": train_ds.size,
            "channels": train_ds.channels, **measured, "test_images": len(test_ds), "train_images": len(train_ds),
            "train_seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(folder / "evaluator.json", info)
    return Evaluator(net, info)


def _labelled(ds):
    return ds.labelled_view() if hasattr(ds, "labelled_view") else ds


def load_evaluator(data: str, *, folder: Path | None = None, size: int = 0, channels: int = 0,
                   held_out: float = 0.0) -> Evaluator:
    """The cached evaluator of `data`, verified against its recorded SHA-256."""
    folder = Path(folder) if folder is not None else cache_dir(data, size, channels, held_out=held_out)
    try:
        info = json.loads((folder / "evaluator.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no evaluator for {data!r} in {folder}; run `imagegen evaluator train --data {data}`") from None
    weights = load_hashed_weights(folder / "weights.safetensors", info["sha256"], "evaluator.json")
    cfg = from_dict(EvaluatorConfig, info["config"], "evaluator")
    net = EvalNet(info["channels"], len(info["classes"]) or PROJECTION, cfg.width)
    net.load_state_dict(weights)
    return Evaluator(net, info)


# A source's own evaluator settings where the defaults do not fit it: `emoji` has 1,619 training images,
# 12 batches an epoch, so the default 2 epochs are 24 updates; 30 epochs reach 74% test accuracy on its 10
# categories (20 epochs: 73%, 60: 75%; the majority category is 30%).
SOURCE_DEFAULTS = {"emoji": {"epochs": 30}}


def get_evaluator(data: str, *, size: int = 0, channels: int = 0, held_out: float = 0.0, log=print) -> Evaluator:
    """The cached evaluator of `data` (at `size` and `channels`, 0 = the data's own; with the folder's
    `held_out` share as its test split), trained first (default config, with SOURCE_DEFAULTS) when there
    is none."""
    folder = cache_dir(data, size, channels, held_out=held_out)
    if (folder / "evaluator.json").exists():
        return load_evaluator(data, size=size, channels=channels, held_out=held_out)
    if log:
        log(f"training the evaluator for {data} (once; cached in {folder})")
    return train_evaluator(default_config(data, size=size, channels=channels, held_out=held_out), log=log)


def default_config(data: str, **fields) -> EvaluatorConfig:
    """The evaluator config of `data`: the defaults, the source's own (SOURCE_DEFAULTS), then `fields`
    (those given as None are left out)."""
    own = SOURCE_DEFAULTS.get(data.partition(":")[0], {})
    return EvaluatorConfig(data=data, **{**own, **{k: v for k, v in fields.items() if v is not None}})


def run_data(run, data: str | None = None, split: str = "test") -> DataConfig:
    """The DataConfig to measure a run against: its own source at its own size, channels and held-out
    share, or `data` (at that source's own size and channels)."""
    own = data is None or data == run.data_source
    if own and not run.data_source:
        raise ConfigError(f"{run.path}: config.json names no data source; pass --data")
    saved = run.config.get("data", {}) if own else {}
    source = run.data_source if own else data
    # captioned:X has X's images: it is measured against X's test split, by X's evaluator
    return DataConfig.as_saved(saved, split, source.removeprefix("captioned:"))


def run_evaluator(run, data: str | None = None, log=print) -> FeatureExtractor:
    """The evaluator that matches run_data(run, data); for `scenes`, which has no classes to train a
    classifier on, the scenes judge (evaluate/geneval.py), whose features are its nine cells'."""
    d = run_data(run, data)
    if d.source == "scenes":
        return get_judge(log=log)
    return get_evaluator(d.source, size=d.size, channels=d.channels, held_out=d.held_out, log=log)
