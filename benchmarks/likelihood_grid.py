"""How far the flow's bits/dim is from converged on each time grid of the likelihood ODE.

Scores the first N test images of a `flow` run (EMA weights, as `imagegen evaluate --likelihood` does)
with Heun on `steps` intervals of the grid s_i = (i / steps)^rho in s = 1 - t, for each grid asked for,
and with the adaptive dopri5 (torchdiffeq, rtol = atol = 1e-5) as the reference. Every grid sees the same
dequantisation draws and the same Hutchinson probes (both from each image's seed), so the differences
are paired: they measure the solver, not the estimator's noise. Prints one Markdown row per grid.

    python benchmarks/likelihood_grid.py RUN [--n 16] [--grids 32:1,128:1,32:3,64:3,128:3] [--no-dopri5]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from imagegen.checkpoint import load_run
from imagegen.data import load_data
from imagegen.evaluate.evaluator import run_data
from imagegen.evaluate.likelihood import image_bits_per_dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=16, help="test images scored (the first n)")
    ap.add_argument("--grids", default="32:1,128:1,32:3,64:3,128:3", help="steps:rho pairs, comma-separated")
    ap.add_argument("--no-dopri5", action="store_true", help="skip the adaptive reference (slow: one image at a time)")
    a = ap.parse_args()
    run = load_run(a.run)
    if run.family != "flow":
        raise SystemExit(f"{a.run}: a {run.family!r} run; this benchmark is for flow runs")
    test = load_data(run_data(run))
    images, seeds = test.images[:a.n], list(range(min(a.n, len(test))))
    print(f"# {a.run}, first {len(seeds)} test images; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    rows = []
    for spec in a.grids.split(","):
        steps, rho = spec.split(":")
        t0 = time.perf_counter()
        bpd = image_bits_per_dim(run.model, images, seeds, steps=int(steps), rho=float(rho))
        rows.append((f"Heun, {steps} intervals, rho = {rho}", bpd, time.perf_counter() - t0))
    if not a.no_dopri5:
        t0 = time.perf_counter()
        rows.append(("dopri5 (reference)", image_bits_per_dim(run.model, images, seeds, solver="dopri5"),
                     time.perf_counter() - t0))
    ref = rows[-1][1]
    print(f"| grid | bits/dim | minus {'dopri5' if not a.no_dopri5 else 'the last row'} (paired) | seconds |")
    print("|---|---|---|---|")
    se = lambda v: float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")   # noqa: E731
    for name, bpd, secs in rows:
        d = bpd - ref
        print(f"| {name} | {bpd.mean():.3f} ± {se(bpd):.3f} | {d.mean():+.3f} ± {se(d):.3f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
