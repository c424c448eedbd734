"""Few-step sampling under one CPU budget: train `flow` and `consistency` for the same wall-clock time on
one dataset (or take runs already trained), then score each at the sampling settings given, with the same
protocol as `imagegen evaluate` (seeds 0..n-1, classes seed mod 10, against the test split in the
evaluator's features), and time one image (median of repeated single-image calls, torch engine).

    python benchmarks/few_steps.py [--minutes 10] [--n 10000] [--data fashion-mnist] [--out /tmp/imagegen-few-steps]
        [--runs RUN,RUN ...]   # instead of training: evaluate these run folders
        [--distill]            # also distil each flow run into a 1-step student (default couplings), trained
                               # for the same --minutes after its teacher's couplings are drawn
        [--set flow=steps:6,guidance:1.5] [--set consistency=steps:1;steps:2]

Each --set gives a family's settings, `;` between settings, `,` between the options of one; a run whose
family has no --set is scored with its defaults. Prints one table row per (run, setting).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import imagegen
from imagegen.data import load_data
from imagegen.evaluate.evaluator import get_evaluator
from imagegen.evaluate.run_eval import compare, run_data
from imagegen.sample import default_labels, generate, to_float

DEFAULT_SETTINGS = {"flow": "steps:6,guidance:1.5", "consistency": "steps:1;steps:2", "distilled": ""}


def parse_settings(text: str) -> list[dict]:
    out = []
    for setting in text.split(";"):
        opts = {}
        for item in filter(None, setting.split(",")):
            key, _, value = item.partition(":")
            opts[key] = float(value) if "." in value else int(value) if value.isdigit() else value
        out.append(opts)
    return out


def one_image_ms(model, opts: dict, repeats: int = 30) -> float:
    labels = default_labels(model, [0])
    generate(model, [0], labels=labels, **opts)   # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        generate(model, [i], labels=default_labels(model, [i]), **opts)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per family (wall clock)")
    ap.add_argument("--families", default="flow,consistency")
    ap.add_argument("--n", type=int, default=10_000, help="generated images per evaluation")
    ap.add_argument("--runs", default="", help="comma list of run folders to evaluate instead of training")
    ap.add_argument("--set", action="append", default=[], metavar="FAMILY=SETTINGS")
    ap.add_argument("--model", action="append", default=[], metavar="FAMILY.KEY=VALUE",
                    help="a model config override for a family's training run")
    ap.add_argument("--out", default="/tmp/imagegen-few-steps")
    ap.add_argument("--distill", action="store_true", help="also a 1-step student of each flow run, --minutes of training")
    args = ap.parse_args()
    settings = {f: parse_settings(s) for f, s in DEFAULT_SETTINGS.items()}
    settings |= {f: parse_settings(s) for f, _, s in (x.partition("=") for x in args.set)}
    overrides: dict[str, dict] = {}
    for item in args.model:
        key, _, value = item.partition("=")
        family, _, field = key.partition(".")
        overrides.setdefault(family, {})[field] = float(value) if "." in value else int(value) if value.isdigit() else value

    runs = [Path(r) for r in args.runs.split(",") if r]
    if not runs:
        for family in args.families.split(","):
            cfg = imagegen.resolve_config({"family": family, "model": overrides.get(family, {}), "data": {"source": args.data},
                                           "train": {"steps": 10**7, "time_limit": args.minutes * 60,
                                                     "checkpoint_every": 10**7, "sample_every": 0}})
            t0 = time.perf_counter()
            runs.append(imagegen.train(cfg, out=Path(args.out), progress=False))
            print(f"# {family}: trained {time.perf_counter() - t0:.0f} s -> {runs[-1]}", flush=True)
    if args.distill:
        from imagegen.distill import distill
        for teacher in [r for r in runs if imagegen.load_run(r).family == "flow"]:
            t0 = time.perf_counter()
            runs.append(distill(teacher, steps=1, out=Path(args.out), progress=False, train_steps=10**7,
                                overrides=[f"train.time_limit={args.minutes * 60:g}", "train.checkpoint_every=10000000",
                                           "train.sample_every=0"]))
            print(f"# distilled {teacher.name}: couplings and {args.minutes:g} minutes of training took "
                  f"{time.perf_counter() - t0:.0f} s -> {runs[-1]}", flush=True)

    evaluator = get_evaluator(args.data)
    real_images = None
    print(f"# evaluator {evaluator.name}, n = {args.n}, machine: see `imagegen info`")
    print("| run | family | steps x batch | sampling | FD | precision | recall | one image (ms) | sampling s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in runs:
        run = imagegen.load_run(path)
        if real_images is None:
            real_images = to_float(load_data(run_data(run, args.data)).images)
        batch = run.config["train"]["batch_size"]
        for opts in settings.get(run.family, [{}]):
            seeds = list(range(args.n))
            t0 = time.perf_counter()
            fake = generate(run.model, seeds, labels=default_labels(run.model, seeds), batch_size=256, **opts)
            seconds = time.perf_counter() - t0
            m = compare(evaluator, real_images, fake)
            fd = next(v for k, v in m.items() if k.startswith("FD"))
            shown = ", ".join(f"{k} {v}" for k, v in opts.items()) or "defaults"
            print(f"| {path.name} | {run.family} | {run.step:,} x {batch} | {shown} | {fd:.3g} | {m['precision']:.3f} | "
                  f"{m['recall']:.3f} | {one_image_ms(run.model, opts):.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
