"""Quality under one fixed CPU budget: train every family for the same wall-clock time on one dataset,
evaluate each with the same protocol, measure the anchors (among them the small damages `shift` and
`grain`, the scale to read an FD against), and print the leaderboard.

A family may be named with its backbone: `flow-dit` is the flow family on the DiT (its default size),
`flow-dit-s` on the DiT of size "s" (nets/dit.py SIZES); the plain name uses the family's default.
`+latent` after a flow or ddpm entry (`flow+latent`, `flow-dit+latent`) trains it on the latents of an
`ae` run trained first for --ae-minutes; that time counts in its budget: it trains for the rest of
--minutes. Its DiT takes patch 2 by default (64 tokens on the 16 x 16 latents of 64 px images).
For every diffusion and flow entry it also prints the FD against training FLOPs per image (the forward
and backward of one training step, counted by torch.utils.flop_counter, divided by the batch) and
against the FLOPs seen in the whole budget: the DiT paper's scaling view, at our scale.

Also prints, for the GAN families, what `analyse --keep 0.5` does to FD and precision, and for the
conditional GAN its train-on-synthetic / test-on-real accuracy next to the real-data accuracy.

    python benchmarks/quality.py [--minutes 3] [--n 2000] [--data fashion-mnist] [--families dcgan,flow-dit]
        [--out /tmp/imagegen-quality] [--size 64] [--ae-minutes 10]

    python benchmarks/quality.py --data emoji --size 64 --minutes 30 --ae-minutes 10 --n 1000 \
        --families flow,flow+latent,flow-dit+latent,dcgan,cgan --tstr-per-class 100

The evaluator of the dataset is trained first if it is not cached (about 2.5 minutes for Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import imagegen
from imagegen.evaluate.analyse import analyse_run
from imagegen.evaluate.anchors import collect, evaluate_anchors, leaderboard
from imagegen.evaluate.evaluator import get_evaluator
from imagegen.evaluate.run_eval import evaluate_run
from imagegen.evaluate.synth import train_on_synthetic
from imagegen.models import REGISTRY
from imagegen.nets.dit import SIZES
from imagegen.train import GuardedOptimizer, fit_model_to_data, step_generator


def variant_config(variant: str) -> tuple[str, dict]:
    """"flow-dit-s" -> ("flow", {"backbone": "dit", "dit_size": "s"}); "ddpm" -> ("ddpm", {}); the
    `+latent` of a latent entry is the caller's."""
    variant = variant.removesuffix("+latent")
    family, _, rest = variant.partition("-dit")
    if family not in REGISTRY or (rest and rest.lstrip("-") not in SIZES):
        raise SystemExit(f"unknown family or variant {variant!r} (families: {', '.join(REGISTRY)}; "
                         f"add -dit or -dit-SIZE, SIZE one of {', '.join(SIZES)})")
    if not variant.startswith(f"{family}-dit"):
        return family, {}
    return family, {"backbone": "dit", **({"dit_size": rest.lstrip("-")} if rest else {})}


def train_flops_per_image(run_dir: Path) -> float:
    """Matmul and convolution FLOPs of one training step of the run's model, per image of its batch."""
    run = imagegen.load_run(run_dir)
    cfg = imagegen.resolve_config({k: run.config.get(k, {}) for k in ("family", "model", "data", "train")})
    data = imagegen.load_data(cfg.data)
    cfg = fit_model_to_data(cfg, data)
    model = imagegen.build_model(run.family, imagegen.config.to_dict(cfg.model))
    model.ready(data, log=lambda *_: None)   # as training does: a text model's batches carry caption embeddings
    opts = {k: GuardedOptimizer(o) for k, o in model.configure_optimizers(cfg.train).items()}
    batch = data.batch_at(0, cfg.train.batch_size, 0)
    with FlopCounterMode(display=False) as counter:
        model.train_step(batch, opts, step_generator(0, 0, torch.device("cpu")))
    return counter.get_total_flops() / cfg.train.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per family (wall clock)")
    ap.add_argument("--n", type=int, default=2000, help="generated images per evaluation")
    ap.add_argument("--families", default=",".join(REGISTRY))
    ap.add_argument("--out", default="/tmp/imagegen-quality")
    ap.add_argument("--size", type=int, default=0, help="image side (0: the data's own)")
    ap.add_argument("--tstr-per-class", type=int, default=1000,
                    help="generated images per class for cgan's train-on-synthetic line (0: skip it; at 64 px on "
                         "2 cores the default took over 15 minutes)")
    ap.add_argument("--ae-minutes", type=float, default=0.0,
                    help="the autoencoder's share of a +latent entry's budget (default: a third of --minutes)")
    args = ap.parse_args()
    out = Path(args.out)
    data = {"source": args.data, "size": args.size}
    evaluator = get_evaluator(args.data, size=args.size)
    print(f"# evaluator {evaluator.name}: {evaluator.info.get('test_accuracy', evaluator.info.get('test_retrieval')):.4f}")

    times, extras, scaling = {}, [], []
    autoencoder, ae_seconds = None, 0.0
    for variant in args.families.split(","):
        family, model = variant_config(variant)
        budget = args.minutes * 60
        if variant.endswith("+latent"):
            if autoencoder is None:   # one autoencoder for every latent entry, its time charged to each
                t0 = time.perf_counter()
                autoencoder = imagegen.train(imagegen.resolve_config(
                    {"family": "ae", "data": data, "train": {"steps": 10**7, "checkpoint_every": 10**7, "sample_every": 0,
                                                               "time_limit": (args.ae_minutes or args.minutes / 3) * 60}}),
                    out=out, progress=False)
                ae_seconds = time.perf_counter() - t0
                times[autoencoder.name] = ae_seconds
                print(f"# ae: trained {ae_seconds:.0f} s -> {autoencoder}", flush=True)
                evaluate_run(autoencoder, log=None)
            model = {**model, "autoencoder": str(autoencoder)}
            budget -= ae_seconds
        cfg = imagegen.resolve_config({"family": family, "model": model, "data": data,
                                       "train": {"steps": 10**7, "time_limit": budget,
                                                 "checkpoint_every": 10**7, "sample_every": 0}})
        if family == "random":
            cfg = imagegen.resolve_config({"family": family, "data": data})
        t0 = time.perf_counter()
        run_dir = imagegen.train(cfg, out=out, progress=False)
        times[run_dir.name] = time.perf_counter() - t0
        metrics = evaluate_run(run_dir, n=args.n, log=None)["metrics"]
        print(f"# {variant}: trained {times[run_dir.name]:.0f} s"
              + (f" after the autoencoder's {ae_seconds:.0f} s" if variant.endswith("+latent") else "")
              + f" -> {run_dir}", flush=True)
        if family in ("ddpm", "flow") and not variant.endswith("+latent"):
            steps = imagegen.load_run(run_dir).step
            per_image = train_flops_per_image(run_dir)
            fd = next(v for k, v in metrics.items() if k.startswith("FD-"))
            scaling.append((variant, per_image, steps * cfg.train.batch_size * per_image, fd))
        if family in ("dcgan", "cgan"):
            a = analyse_run(run_dir, run_dir / "analysis", n=args.n, keep=0.5, log=None)["filter"]
            extras.append(f"{family} analyse --keep 0.5 (n={args.n}, before = an unfiltered set of the same size): "
                          + ", ".join(f"{k} {a['before'][k]:.4g} -> {a['after'][k]:.4g}" for k in a["before"]))
        if family == "cgan" and args.tstr_per_class > 0:
            t = train_on_synthetic(run_dir, per_class=args.tstr_per_class, log=None)
            extras.append(f"cgan train-on-synthetic, test-on-real: accuracy {t['tstr_accuracy']:.4f} "
                          f"({t['synthetic_images']} generated images) vs {t['real_accuracy']:.4f} trained on real data")
    evaluate_anchors(args.data, n=args.n, out_dir=out, log=None, size=args.size)
    markdown, page = leaderboard(collect([out]))
    (out / "leaderboard.html").write_text(page)
    print()
    print(markdown)
    print("| run | training wall-clock (s) |\n|---|---|")
    for name, secs in times.items():
        print(f"| {name} | {secs:.0f} |")
    if scaling:
        print("\n| model | training GFLOP per image | images seen | total training PFLOP | FD |\n|---|---|---|---|---|")
        for variant, per_image, total, fd in scaling:
            print(f"| {variant} | {per_image / 1e9:.3f} | {total / per_image:,.0f} | {total / 1e15:.2f} | {fd:.3g} |")
    print()
    for line in extras:
        print(line)
    print(json.dumps({"budget_minutes": args.minutes, "n": args.n, "evaluator": evaluator.name}))


if __name__ == "__main__":
    main()
