"""Evaluate a run: generate n images, compare them with the real test split in the evaluator's feature
space, and write metrics.json with every number stamped by the protocol that produced it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import load_run, write_json_atomic
from ..config import Range
from ..data import load_data
from ..sample import default_labels, generate, grid, to_float
from . import metrics as M
from .evaluator import FeatureExtractor, run_data, run_evaluator
from .geneval import SceneJudge, geneval
from .likelihood import measure, require_likelihood
from .memorisation import memorisation, nearest_two
from .prompts import class_prompt_accuracy, name_prompt_accuracy, test_prompts
from .translation import evaluate_translation

MAX_N = 100_000
N_IMAGES = Range(2, MAX_N)   # images generated for a measurement (--n)
N_PROMPTS = Range(1, MAX_N)  # GenEval prompts (--prompts); the scenes test split has 2,000
NEAREST_SHOWN = 16           # samples in nearest.png, each above its nearest training image


def write_nearest(path: Path, samples: torch.Tensor, train: torch.Tensor) -> None:
    """nearest.png: the samples in a row, each above the training image nearest to it in pixels."""
    _, index = nearest_two(samples, train)
    grid(torch.cat([samples, train[index]]), nrow=samples.shape[0]).save(path)


def compare(extractor: FeatureExtractor, real: torch.Tensor, fake: torch.Tensor) -> dict:
    """Every distribution metric between two image sets (N x C x H x W in [-1, 1]), named by the extractor."""
    fr, ff = extractor.features(real), extractor.features(fake)
    kid_mean, kid_std = M.kid(fr, ff)
    precision, recall = M.precision_recall(fr, ff)
    density, coverage = M.density_coverage(fr, ff)
    name = extractor.name
    out = {f"FD-{name}": M.frechet_distance(fr, ff), f"KID-{name}": kid_mean, f"KID-{name}-std": kid_std,
           "precision": precision, "recall": recall, "density": density, "coverage": coverage}
    if extractor.probs is not None:   # a classifier (the scenes judge is not: it has no image classes)
        pf = extractor.probs(fake)
        out |= {f"IS-{name}": M.inception_score(pf), "class_coverage": M.class_coverage(pf)}
    return out


def evaluate_run(run_dir: str | Path, *, n: int = 10_000, data: str | None = None, batch_size: int = 256,
                 extractor: FeatureExtractor | None = None, likelihood: int = 0, prompts: int = 0, log=print) -> dict:
    """metrics.json for a run: n generated images (seeds 0..n-1, default sampling options) against the
    real test split of the run's data, in the feature space of that data's evaluator; with `likelihood`
    > 0, also the bits/dim of that many test images (evaluate/likelihood.py; flow, vae and cvae). A text
    run on `scenes` is also scored GenEval-style (evaluate/geneval.py) on the first `prompts` test
    captions (0 = all 2,000), one image each."""
    N_IMAGES.check(n, "--n")
    if prompts:
        N_PROMPTS.check(prompts, "--prompts")
    run = load_run(run_dir)
    if likelihood:
        require_likelihood(run)
    if run.model.translates:   # translation runs have their own measures
        return evaluate_translation(run, n=n, data=data, log=log)
    real_cfg = run_data(run, data)
    data = real_cfg.source
    extractor = extractor or run_evaluator(run, data, log=log)
    real = load_data(real_cfg)
    if run.model.autoencodes:   # an autoencoder draws nothing: its reconstructions of the test split are measured
        return evaluate_reconstructions(run, real, extractor, data)
    t0 = time.perf_counter()
    seeds = list(range(n))
    captions = test_prompts(run, n)   # a text run: seed i draws the test split's caption i
    fake = generate(run.model, seeds, labels=default_labels(run.model, seeds), batch_size=batch_size, prompts=captions)
    sample_seconds = time.perf_counter() - t0
    real_images = to_float(real.images)
    result = compare(extractor, real_images, fake)
    # Copies of the training set: the samples' nearest training images against the held-out images' own.
    train_images = to_float(load_data(replace(real_cfg, split="train")).images)
    result |= memorisation(fake, train_images, real_images)
    write_nearest(Path(run.path) / "nearest.png", fake[:NEAREST_SHOWN], train_images)
    if run.model.encodes:   # VAEs: how well the test images come back through the latent
        labels = real.labels if run.model.conditional else None
        recon = run.model.reconstruct(real_images, labels).cpu()
        result["reconstruction_mse"] = float((recon - real_images).square().mean())
    following = class_prompt_accuracy(run, extractor, batch_size=batch_size)
    if following is not None:
        result["prompt_accuracy_training_prompts"] = following["training_prompts"]
        result["prompt_accuracy_held_out_prompts"] = following.get("held_out_prompts")
    following = following or name_prompt_accuracy(run, extractor, batch_size=batch_size)
    if following is not None and "category_accuracy" in following:   # held-out names (emoji)
        result |= {f"names_{k}": v for k, v in following.items() if "accuracy" in k or k == "majority_share"}
    if isinstance(extractor, SceneJudge) and run.model.reads_text:   # GenEval-style, per task
        following = geneval(run, extractor, prompts=prompts, batch_size=batch_size)
        result |= {f"geneval_{task.replace(' ', '_')}": v for task, v in following["generated"].items() if task != "images"}
        result["geneval_real_overall"] = following["real"]["overall"]
        if "layouts" in following:   # a grounded model's drawn layouts, scored alone
            result |= {f"geneval_layout_{task.replace(' ', '_')}": v for task, v in following["layouts"].items()
                       if task != "images"}
    bpd = None
    if likelihood:
        t1 = time.perf_counter()
        bpd = measure(run.model, real, likelihood)
        result["bits_per_dim"], result["bits_per_dim_se"] = bpd.pop("bits_per_dim"), bpd.pop("bits_per_dim_se")
        bpd["seconds"] = round(time.perf_counter() - t1, 2)
        log(f"# bits/dim of {bpd['images']} test images: {result['bits_per_dim']:.4f} "
            f"(standard error {result['bits_per_dim_se'] or 0:.4f}) in {bpd['seconds']} s")
    sampler = run.model.sampling_settings()
    out = {
        "run": str(run.path), "family": run.family, "step": run.step,
        "protocol": {"generated": n, "seeds": f"0-{n - 1}", "labels": "seed mod classes" if run.model.conditional else None,
                     "real": len(real), "real_split": "test", "data": data,
                     **({"data_held_out": real_cfg.held_out} if real_cfg.held_out else {}), "evaluator": extractor.name,
                     "evaluator_sha256": getattr(extractor, "info", {}).get("sha256"), "weights": "ema",
                     **({"prompts": "the test split's captions, caption i for seed i"} if captions else {}),
                     **({"prompt_following": following} if following else {}),
                     "sampler": sampler or "default", "kid": "50 subsets of 1000, cubic kernel on unit-length features",
                     "precision_recall_k": 3, "density_coverage_k": 5,
                     "memorisation": f"RMS pixel distance to the nearest of the {len(train_images)} training images; a "
                                     "near-copy is nearer than 1/3 of the distance to the second nearest; held_out_*: "
                                     "the same for the test images; nearest.png shows the first samples above theirs",
                     **({"likelihood": bpd} if bpd else {})},
        "metrics": result,
        "sampling_seconds": round(sample_seconds, 2),
    }
    write_json_atomic(Path(run.path) / "metrics.json", out)
    if run.config.get("train", {}).get("logger") == "tensorboard":
        from ..tboard import log_metrics
        log_metrics(run.path, run.step, result)
    return out


def evaluate_reconstructions(run, real, extractor: FeatureExtractor, data: str) -> dict:
    """metrics.json for an autoencoder: its reconstructions of every test image (posterior mean, decoded)
    against the test images themselves, by PSNR and by every distribution metric: the FD here is the floor
    of any latent model built on it, which can do no better than the decoder lets it."""
    t0 = time.perf_counter()
    images = to_float(real.images)
    recon = run.model.round_trip(images).cpu()
    result = compare(extractor, images, recon)
    psnr = M.psnr(recon, images)
    result |= {"psnr": float(psnr.mean()), "psnr_min": float(psnr.min()),
               "reconstruction_mse": float((recon - images).square().mean())}
    out = {"run": str(run.path), "family": run.family, "step": run.step,
           "protocol": {"generated": f"reconstructions of the {len(real)} test images (posterior mean, decoded)",
                        "real": len(real), "real_split": "test", "data": data, "evaluator": extractor.name,
                        "evaluator_sha256": getattr(extractor, "info", {}).get("sha256"), "weights": "ema",
                        "psnr": "per image, peak 2 on [-1, 1] pixels (= 255 on 8-bit), mean over the images",
                        "kid": "50 subsets of 1000, cubic kernel on unit-length features",
                        "precision_recall_k": 3, "density_coverage_k": 5},
           "metrics": result, "sampling_seconds": round(time.perf_counter() - t0, 2)}
    write_json_atomic(Path(run.path) / "metrics.json", out)
    return out
