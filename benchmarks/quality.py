"""Quality under one fixed CPU budget: train every family for the same wall-clock time on one dataset,
evaluate each with the same protocol, measure the anchors, and print the leaderboard.

Also prints, for the GAN families, what `analyse --keep 0.5` does to FD and precision, and for the
conditional GAN its train-on-synthetic / test-on-real accuracy next to the real-data accuracy.

    python benchmarks/quality.py [--minutes 3] [--n 2000] [--data fashion-mnist] [--families dcgan,ddpm]
        [--out /tmp/imagegen-quality]

The evaluator of the dataset is trained first if it is not cached (about 2.5 minutes for Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import imagegen
from imagegen.evaluate.analyse import analyse_run
from imagegen.evaluate.anchors import collect, evaluate_anchors, leaderboard
from imagegen.evaluate.evaluator import get_evaluator
from imagegen.evaluate.run_eval import evaluate_run
from imagegen.evaluate.synth import train_on_synthetic
from imagegen.models import REGISTRY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per family (wall clock)")
    ap.add_argument("--n", type=int, default=2000, help="generated images per evaluation")
    ap.add_argument("--families", default=",".join(REGISTRY))
    ap.add_argument("--out", default="/tmp/imagegen-quality")
    args = ap.parse_args()
    out = Path(args.out)
    evaluator = get_evaluator(args.data)
    print(f"# evaluator {evaluator.name}: test accuracy {evaluator.info['test_accuracy']:.4f}")

    times, extras = {}, []
    for family in args.families.split(","):
        cfg = imagegen.resolve_config({"family": family, "data": {"source": args.data},
                                       "train": {"steps": 10**7, "time_limit": args.minutes * 60,
                                                 "checkpoint_every": 10**7, "sample_every": 0}})
        if family == "random":
            cfg = imagegen.resolve_config({"family": family, "data": {"source": args.data}})
        t0 = time.perf_counter()
        run_dir = imagegen.train(cfg, out=out, progress=False)
        times[run_dir.name] = time.perf_counter() - t0
        evaluate_run(run_dir, n=args.n, log=None)
        print(f"# {family}: trained {times[run_dir.name]:.0f} s -> {run_dir}", flush=True)
        if family in ("dcgan", "cgan"):
            a = analyse_run(run_dir, run_dir / "analysis", n=args.n, keep=0.5, log=None)["filter"]
            extras.append(f"{family} analyse --keep 0.5 (n={args.n}, before = an unfiltered set of the same size): "
                          + ", ".join(f"{k} {a['before'][k]:.4g} -> {a['after'][k]:.4g}" for k in a["before"]))
        if family == "cgan":
            t = train_on_synthetic(run_dir, per_class=1000, log=None)
            extras.append(f"cgan train-on-synthetic, test-on-real: accuracy {t['tstr_accuracy']:.4f} "
                          f"({t['synthetic_images']} generated images) vs {t['real_accuracy']:.4f} trained on real data")
    evaluate_anchors(args.data, n=args.n, out_dir=out, log=None)
    markdown, page = leaderboard(collect([out]))
    (out / "leaderboard.html").write_text(page)
    print()
    print(markdown)
    print("| run | training wall-clock (s) |\n|---|---|")
    for name, secs in times.items():
        print(f"| {name} | {secs:.0f} |")
    print()
    for line in extras:
        print(line)
    print(json.dumps({"budget_minutes": args.minutes, "n": args.n, "evaluator": evaluator.name}))


if __name__ == "__main__":
    main()
