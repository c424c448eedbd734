"""AI analysis of generated images: a score per image, a ranked gallery, filtering, memorisation checks.

Per image:
- `confidence`: the evaluator's top class probability (does it look like *some* class?);
- `realism`: the realism score of Kynkäänniemi et al. (2019): max over real images i of r_i / ||f - f_i||,
  with r_i the distance from real i to its k-th nearest real neighbour in evaluator features. Above 1
  means inside some real image's neighbourhood. It is the ranking and filtering score;
- `discriminator`: the GAN discriminator's logit, for GAN families;
- `nearest_train_l2`: pixel distance (RMS, [-1, 1] units) to the closest training image, and its index:
  very small values flag possible copies of the training set (memorisation);
- `bits_per_dim` (`likelihood=True`, for families with a density: flow, vae, cvae): the image's own
  likelihood under the model (evaluate/likelihood.py), how typical it is of the training data.

`analyse_folder` scores a folder of the user's own images by the same likelihood, each placed among the
bits/dim of real test images.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch

from ..checkpoint import load_run, write_json_atomic
from ..config import Range
from ..data import load_data
from ..data.folder import decode_files, list_images
from ..errors import ConfigError
from ..sample import default_labels, generate, quantize, save_images, to_float, to_pil, to_uint8
from .evaluator import cache_dir, load_evaluator, run_data, run_evaluator
from .likelihood import N_LIKELIHOOD, image_bits_per_dim, require_likelihood
from .metrics import CHUNK
from .run_eval import N_IMAGES, compare

KEEP = Range(0.0, 1.0, float, lo_open=True, hi_open=True)   # --keep: the share of samples kept
REAL_REFERENCE = 10_000   # real training images that define the manifold for the realism score
GALLERY = 48              # images per gallery section


def realism_scores(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> torch.Tensor:
    """N realism scores of fake features against real features (both N x D)."""
    real, fake = real.float(), fake.float()
    radii = torch.cat([torch.cdist(real[i:i + CHUNK], real).kthvalue(k + 1, dim=1).values
                       for i in range(0, real.shape[0], CHUNK)])
    # Kynkäänniemi et al. drop the real points with the largest radii (outliers) from the reference.
    keep = radii <= radii.quantile(0.9)
    real, radii = real[keep], radii[keep]
    return torch.cat([(radii[None] / torch.cdist(fake[i:i + CHUNK], real).clamp(min=1e-12)).max(dim=1).values
                      for i in range(0, fake.shape[0], CHUNK)])


def nearest_train(fake: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS pixel distance, index) of each fake image's nearest training image."""
    f, t = fake.flatten(1).float(), train.flatten(1).float()
    best_d = torch.full((f.shape[0],), float("inf"))
    best_i = torch.zeros(f.shape[0], dtype=torch.long)
    for j in range(0, t.shape[0], CHUNK):
        d, i = torch.cdist(f, t[j:j + CHUNK]).min(dim=1)
        better = d < best_d
        best_d[better], best_i[better] = d[better], i[better] + j
    return best_d / f.shape[1] ** 0.5, best_i


def keep_best(realism: torch.Tensor, groups: torch.Tensor, keep: float) -> torch.Tensor:
    """Sorted indices of the best `keep` share by realism within each group (at least one per group), so
    filtering raises quality without trading away the class balance."""
    kept = torch.cat([idx_c[torch.argsort(realism[idx_c], descending=True)][:max(1, int(round(keep * len(idx_c))))]
                      for c in groups.unique() for idx_c in [(groups == c).nonzero().flatten()]])
    return kept.sort().values


def filter_images(extractor, real: torch.Tensor, images: torch.Tensor, realism: torch.Tensor, keep: float,
                  groups: torch.Tensor) -> dict:
    """Keep the best `keep` share of `images` (N x C x H x W) by their `realism` scores (N), within each
    of `groups` (N class indices), and measure FD, precision and recall against `real` before and after.
    "before" is the first len(kept) images, an unfiltered set of the same size: FD is biased by sample count."""
    kept = keep_best(realism, groups, keep)
    before, after = compare(extractor, real, images[:len(kept)]), compare(extractor, real, images[kept])
    fd = f"FD-{extractor.name}"
    return {"kept": kept, "before": {k: before[k] for k in (fd, "precision", "recall")},
            "after": {k: after[k] for k in (fd, "precision", "recall")}}


def analyse_run(run_dir: str | Path, out_dir: str | Path, *, n: int = 2000, keep: float | None = None,
                likelihood: bool = False, log=print) -> dict:
    """Score n samples (seeds 0..n-1), write analysis.json and gallery.html to out_dir; with `keep`,
    also write the best `keep` share to out_dir/kept/ and report metrics before and after filtering;
    with `likelihood`, also each sample's bits/dim (as its 8-bit PNG, dequantised with its seed)."""
    N_IMAGES.check(n, "--n")
    if keep is not None:
        KEEP.check(keep, "--keep (a share)")
    run = load_run(run_dir)
    if likelihood:
        require_likelihood(run)
    extractor = run_evaluator(run, log=log)
    if extractor.probs is None:
        raise ConfigError(f"{run.path}: analyse ranks images with a classifier, and {run.data_source} has no classes "
                          "(its judge scores prompts instead: imagegen evaluate)")
    train = load_data(run_data(run, split="train"))
    train_images = to_float(train.images)
    seeds = list(range(n))
    labels = default_labels(run.model, seeds)
    fake = generate(run.model, seeds, labels=labels)
    ref = train_images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:REAL_REFERENCE]]
    realism = realism_scores(extractor.features(ref), extractor.features(fake))
    probs = extractor.probs(fake)
    confidence, predicted = probs.max(dim=1)
    dist, idx = nearest_train(fake, train_images)
    scores = {"realism": realism, "confidence": confidence, "nearest_train_l2": dist}
    if run.model.has_critic:
        with torch.no_grad():
            scores["discriminator"] = torch.cat([run.model.critic(fake[i:i + 256], None if labels is None else labels[i:i + 256])
                                                 for i in range(0, n, 256)]).float()
    if likelihood:
        scores["bits_per_dim"] = image_bits_per_dim(run.model, quantize(fake), seeds, labels=labels).float()
    per_image = [{"seed": s, **{k: float(v[j]) for k, v in scores.items()}, "nearest_train_index": int(idx[j]),
                  "predicted_class": train.classes[int(predicted[j])] if train.classes else int(predicted[j]),
                  **({"label": train.classes[int(labels[j])]} if labels is not None else {})}
                 for j, s in enumerate(seeds)]
    order = torch.argsort(realism, descending=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run.path), "family": run.family, "step": run.step, "n": n, "evaluator": extractor.name,
              "score": "realism (Kynkäänniemi et al. 2019, k=3, 10k real training images)",
              "summary": {k: {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())} for k, v in scores.items()},
              "possible_copies": int((dist < 0.05).sum())}
    if keep is not None:
        # Within each class: the label asked for, or else the evaluator's prediction.
        real = to_float(load_data(run_data(run)).images)
        f = filter_images(extractor, real, fake, realism, keep, labels if labels is not None else predicted)
        kept = f["kept"]
        result["filter"] = {"keep": keep, "kept": len(kept), "before": f["before"], "after": f["after"]}
        save_images(fake[kept], out_dir / "kept", [seeds[int(j)] for j in kept])
    write_json_atomic(out_dir / "analysis.json", {**result, "images": per_image})
    _gallery(out_dir / "gallery.html", fake, per_image, order, torch.argsort(dist), result)
    return result


def analyse_folder(run_dir: str | Path, folder: str | Path, out_dir: str | Path, *, reference: int = 200,
                   log=print) -> dict:
    """Score every image of a folder by its bits/dim under the run's model (resized to the model's size
    and channels as `folder:` data is), each placed among the bits/dim of the first `reference` real test
    images: `test_share_below` is the share of those that the model finds more likely (near 0: more
    typical than the test images, near 1: unlike them). Writes analysis.json and gallery.html to out_dir.
    Unreadable files are reported and skipped, as in training."""
    N_LIKELIHOOD.check(reference, "--reference")
    run = load_run(run_dir)
    require_likelihood(run)
    if run.model.conditional and run.model.conditional_likelihood:
        raise ConfigError("a cvae's likelihood is log p(x | class); score a folder with a vae or flow run")
    cfg = run.model.cfg
    files, skipped, _ = list_images(Path(folder), classes=False)
    images, kept, bad = decode_files([path for path, _ in files], cfg.image_size, cfg.channels)
    skipped += bad
    for name, why in skipped:
        log(f"skipped {name}: {why}")
    if images is None:
        raise ConfigError(f"{folder}: no readable images to score ({len(skipped)} skipped)")
    names = [str(files[i][0]) for i in kept]
    bpd = image_bits_per_dim(run.model, images, list(range(len(names))))
    test = load_data(run_data(run))
    ref = image_bits_per_dim(run.model, test.images[:reference], list(range(min(reference, len(test)))),
                             labels=test.labels[:reference] if test.labelled else None)
    per_image = [{"file": f, "bits_per_dim": float(b), "test_share_below": float((ref < b).double().mean())}
                 for f, b in zip(names, bpd)]
    result = {"run": str(run.path), "family": run.family, "step": run.step, "folder": str(folder),
              "images": len(names), "skipped": [{"file": f, "reason": r} for f, r in skipped],
              "score": "bits_per_dim (evaluate/likelihood.py); lower = more typical of the training data",
              "test_reference": {"images": len(ref), "mean": float(ref.mean()), "min": float(ref.min()),
                                 "max": float(ref.max())}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "analysis.json", {**result, "scores": per_image})
    order = torch.argsort(bpd)
    _page(out_dir / "gallery.html", f"Likelihood of {Path(folder).name} under {Path(run.path).name}", result,
          to_float(images), per_image,
          [("Most typical (lowest bits/dim)", order), ("Least typical (highest bits/dim)", order.flip(0))],
          lambda r: f"{Path(r['file']).name}<br>{r['bits_per_dim']:.3f}")
    return {**result, "scores": per_image}


def _png_uri(image: torch.Tensor) -> str:
    buf = io.BytesIO()
    to_pil(to_uint8(image[None])[0]).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gallery(path: Path, fake: torch.Tensor, per_image: list[dict], order: torch.Tensor,
             by_distance: torch.Tensor, result: dict) -> None:
    _page(path, f"Analysis of {Path(result['run']).name}", result, fake, per_image,
          [("Best (highest realism score)", order), ("Worst (lowest realism score)", order.flip(0)),
           ("Nearest to a training image (copy suspects)", by_distance)],
          lambda r: f"seed {r['seed']}<br>{r['realism']:.2f}")


def _page(path: Path, title: str, result: dict, images: torch.Tensor, per_image: list[dict],
          sections: list[tuple[str, torch.Tensor]], caption) -> None:
    """An HTML page: the result as JSON, then a strip of images per section (indices into images)."""
    def section(heading: str, idx: torch.Tensor) -> str:
        cells = []
        for j in idx[:GALLERY].tolist():
            r = per_image[j]
            tip = html.escape(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
            cells.append(f'<figure><img src="{_png_uri(images[j])}" title="{tip}"><figcaption>{caption(r)}'
                         '</figcaption></figure>')
        return f"<h2>{html.escape(heading)}</h2><div class='g'>{''.join(cells)}</div>"

    parts = [f"<h1>{html.escape(title)}</h1>", "<pre>" + html.escape(json.dumps(result, indent=2)) + "</pre>",
             *(section(h, idx) for h, idx in sections)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>imagegen analysis</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}.g{display:flex;flex-wrap:wrap;gap:6px}"
            "figure{margin:0;text-align:center;font-size:11px}img{width:56px;image-rendering:pixelated}"
            "</style></head><body>" + "".join(parts) + "</body></html>\n")
    path.write_text(page)


_EVALUATORS: dict[Path, object] = {}


def score_images(run, seeds: list[int], labels: torch.Tensor | None = None) -> dict:
    """Per-image scores of a run's images for `seeds`, cheap enough for the web API: the discriminator's
    logit (GAN families), and where the run's dataset has a cached evaluator, its predicted class and
    confidence. (`analyse_run` adds the realism and nearest-training-image scores, which need the data.)"""
    images = generate(run.model, seeds, labels=labels)
    per = [{"seed": s} for s in seeds]
    notes = []
    if run.model.has_critic:
        with torch.no_grad():
            d = run.model.critic(images.to(run.model.device), None if labels is None else labels.to(run.model.device))
        for p, v in zip(per, d.float().cpu().tolist()):
            p["discriminator"] = v
    data = run_data(run)
    folder = cache_dir(data.source, data.size, data.channels, held_out=data.held_out)
    evaluator = None
    if (folder / "evaluator.json").exists():
        if folder not in _EVALUATORS:
            _EVALUATORS[folder] = load_evaluator(data.source, size=data.size, channels=data.channels,
                                                 held_out=data.held_out)
        evaluator = _EVALUATORS[folder]
        confidence, predicted = evaluator.probs(images).max(dim=1)
        for p, c, k in zip(per, confidence.tolist(), predicted.tolist()):
            p["confidence"], p["predicted_class"] = c, evaluator.info["classes"][k]
    else:
        notes.append(f"no cached evaluator for {data.source}: `imagegen evaluator train --data {data.source}` "
                     "adds the predicted class and confidence")
    return {"evaluator": evaluator.name if evaluator else None, "images": per, "notes": notes}
