"""Anchors that give a metric its scale, measured under the same protocol as the runs, and the leaderboard.

- floor:  real training images (the best any model can do: two samples of the real distribution);
- blur:   real training images blurred (Gaussian, sigma 1.5 px): right content, wrong detail; blur1 the
          same at sigma 1 px;
- noise:  Gaussian noise images: nothing right;
- random: the `random` baseline (per-pixel histograms), the floor every model must beat;
- shift:  real training images moved one pixel right (wrapped), and
- grain:  real training images with Gaussian noise of sigma 0.05 (6.4 grey levels): two small, known
          damages that look right to a person (benchmarks/fd_scale.py shows more), the scale a model's
          FD is best read against.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import slug, write_json_atomic
from ..data import DataConfig, load_data
from ..errors import ConfigError
from ..models.baseline import RandomPixels
from ..sample import generate, to_float
from .evaluator import get_evaluator
from .memorisation import held_out_nearest, memorisation
from .run_eval import N_IMAGES, compare

ANCHORS = ("floor", "shift", "grain", "blur1", "blur", "noise", "random")
GRAIN_SIGMA = 0.05


def shifted(images: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """N x C x H x W images moved `pixels` to the right, the last columns wrapped round to the left."""
    return torch.roll(images, pixels, dims=-1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of N x C x H x W images, edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def anchor_images(name: str, train, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    real = to_float(train.images[torch.randperm(len(train), generator=gen)[:n]])
    if name == "floor":
        return real
    if name == "shift":
        return shifted(real)
    if name == "grain":   # its own generator, so the other anchors' draws are what they were before it
        grain = torch.Generator().manual_seed(seed + 1)
        return (real + GRAIN_SIGMA * torch.randn(real.shape, generator=grain)).clamp(-1, 1)
    if name in ("blur", "blur1"):
        return gaussian_blur(real, 1.5 if name == "blur" else 1.0)
    if name == "noise":
        return torch.randn(real.shape, generator=gen).clamp(-1, 1)
    if name == "random":
        model = RandomPixels(RandomPixels.Config(image_size=train.size, channels=train.channels))
        model.prepare(train)
        return generate(model, list(range(n)))
    raise ConfigError(f"unknown anchor {name!r} (known: {', '.join(ANCHORS)})")


def evaluate_anchors(data: str, *, n: int = 10_000, out_dir: str | Path = "runs", log=print, size: int = 0,
                     held_out: float = 0.0) -> dict:
    """anchors-<data>.json in out_dir: every anchor's metrics against the real test split (at `size`, 0:
    the data's own; a folder's test split the `held_out` share of it, as its runs' data.held_out)."""
    N_IMAGES.check(n, "--n")
    extractor = get_evaluator(data, size=size, held_out=held_out, log=log)
    train = load_data(DataConfig(source=data, split="train", size=size, held_out=held_out))
    test = load_data(DataConfig(source=data, split="test", size=size, held_out=held_out))
    n = min(n, len(train))
    real = to_float(test.images)
    result = {"data": data, "protocol": {"generated": n, "real": len(test), "real_split": "test", "data": data,
                                         **({"data_held_out": held_out} if held_out else {}),
                                         "evaluator": extractor.name,
                                         "evaluator_sha256": getattr(extractor, "info", {}).get("sha256"),
                                         "anchor_images": "drawn from the train split (seed 0); shift 1 px right, wrapped; "
                                                          f"grain: noise sigma {GRAIN_SIGMA} added, clipped; blur sigma "
                                                          "1.5 px, blur1 1 px; noise N(0, 1) clipped to [-1, 1]; "
                                                          "memorisation against the whole train split"},
              "anchors": {}}
    train_images = to_float(train.images)
    held = held_out_nearest(train_images, real)   # the same for every anchor: measured once
    for name in ANCHORS:
        if log:
            log(f"anchor {name}")
        images = anchor_images(name, train, n)
        result["anchors"][name] = compare(extractor, real, images) | memorisation(images, train_images, real, held)
    out = Path(out_dir) / f"anchors-{slug(data)}{f'-heldout{held_out:g}' if held_out else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    result["path"] = str(out)
    return result


# --- the leaderboard -------------------------------------------------------------------------------


def collect(paths: list[str | Path]) -> list[dict]:
    """Rows from run folders (metrics.json), anchor files, or folders holding either."""
    rows: list[dict] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p}: no such file or folder")
        files = [p] if p.is_file() else ([p / "metrics.json"] if (p / "metrics.json").exists()
                                         else sorted(p.glob("*/metrics.json")) + sorted(p.glob("anchors-*.json")))
        for f in files:
            try:
                doc = json.loads(f.read_text())
            except (ValueError, RecursionError) as e:
                raise ConfigError(f"{f}: unreadable ({str(e)[:200] or type(e).__name__})") from None
            if not isinstance(doc, dict):
                raise ConfigError(f"{f}: not a metrics or anchors file (it holds a {type(doc).__name__}, not an object)")
            if "anchors" in doc:
                for name, m in doc["anchors"].items():
                    rows.append({"name": f"anchor: {name}", "kind": "anchor", "step": "", "metrics": m,
                                 "protocol": doc["protocol"]})
            elif "metrics" in doc:
                rows.append({"name": Path(doc.get("run", f.parent)).name, "kind": doc.get("family", "?"),
                             "step": doc.get("step", ""), "metrics": doc["metrics"], "protocol": doc["protocol"]})
    if not rows:
        raise ConfigError("no metrics.json or anchors-*.json found; run `imagegen evaluate` first")
    return rows


COLUMNS = [("FD", "FD-"), ("KID", "KID-"), ("precision", "precision"), ("recall", "recall"),
           ("density", "density"), ("coverage", "coverage"), ("IS", "IS-"), ("near-copies", "near_copy_share")]


def _value(metrics: dict, key: str) -> float | None:
    if key.endswith("-"):
        hits = [v for k, v in metrics.items() if k.startswith(key) and not k.endswith("-std")]
        return hits[0] if hits else None
    return metrics.get(key)


def leaderboard(rows: list[dict]) -> tuple[str, str]:
    """(Markdown, HTML) tables sorted by FD, each row with the protocol it was measured under."""
    evaluators = {r["protocol"]["evaluator"] for r in rows}
    rows = sorted(rows, key=lambda r: _value(r["metrics"], "FD-") if _value(r["metrics"], "FD-") is not None else math.inf)
    head = ["entry", "family", "step"] + [c for c, _ in COLUMNS] + ["classes", "protocol"]
    table = []
    for r in rows:
        m, p = r["metrics"], r["protocol"]
        cc = m.get("class_coverage", {})
        table.append([r["name"], r["kind"], str(r["step"])]
                     + [f"{v:.4g}" if (v := _value(m, key)) is not None else "" for _, key in COLUMNS]
                     + [f"{cc.get('classes_present', '')}/{cc.get('classes', '')}",
                        f"{p['generated']} vs {p['real']} {p['data']} {p['real_split']}"])
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    note = f"Evaluator: {', '.join(sorted(evaluators))}" + (
        " (WARNING: different evaluators; numbers across them are not comparable)" if len(evaluators) > 1 else "")
    markdown = "\n".join(md) + "\n\n" + note + "\n"
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>imagegen leaderboard</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body><h1>Leaderboard</h1><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + cells + "</table><p>"
            + html.escape(note) + "</p></body></html>\n")
    return markdown, page
