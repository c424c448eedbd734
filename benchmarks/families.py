"""Speed of every model family with its default config, on the data it is tuned for.

Prints one Markdown table row per family:
  - training images/s: imagegen's own loop (batching, guard, EMA included) at the family's default batch
    size, median of the logged windows after warm-up;
  - sampling latency of one image (median of repeated `generate` calls, one seed, default options:
    DDIM 20 steps with guidance 1.5 for ddpm);
  - sampling throughput at batch 256 (images/s);
  - the time for 16 samples (for ddpm with the default DDIM settings: the issue's 2 s target);
  - one image's latency over the per-image time at batch 16 (issue 15: at most 3x);
  - the same ratio for the sampling network alone (the function `generate` hands run_fixed_batch, timed
    on 1 row and on 16): the floor that no saving around the network can go below;
  - the same ratio for that network's operators alone (their own time in torch's profiler, without the
    Python that calls them): the floor that no saving in Python can go below.
With --engine torch,onnxruntime each family gets a row per engine, sampling from the same trained model
(the floors are of torch's operators, so only its rows have them; an onnxruntime network is exported
once, in the warm-up call, not timed). For cyclegan (a translation family) the data is two classes of
the dataset (sneaker -> ankle boot on Fashion-MNIST), training speed is in image pairs (one A and one B
image) per second, and the sampling columns time `translate` on real test images instead of `generate`.

    python benchmarks/families.py [--data fashion-mnist] [--steps 60] [--families dcgan,ddpm] [--engine torch,onnxruntime]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from unittest import mock

import torch

import imagegen
from imagegen.models import REGISTRY


PAIRS = {"fashion-mnist": "pair:fashion-mnist:sneaker,ankle-boot", "mnist": "pair:mnist:3,8"}


def train_speed(family: str, ds, steps: int) -> tuple[float, int, imagegen.models.Family]:
    cfg = imagegen.resolve_config({"family": family, "data": {"source": ds.name},
                                   "train": {"steps": steps, "log_every": 10, "sample_every": 0,
                                             "checkpoint_every": 10**6, "grid_size": 16}})
    with tempfile.TemporaryDirectory() as out:
        run_dir = imagegen.train(cfg, out=out, progress=False, dataset=ds)
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        model = imagegen.load_run(run_dir).model
    speeds = [r["images_per_s"] for r in records[1:]] or [records[-1]["images_per_s"]]
    return statistics.median(speeds), cfg.train.batch_size, model


def distilled_speed(ds, steps: int, teacher_run: str | None) -> tuple[float, int, imagegen.models.Family]:
    """The distilled student's training speed on couplings of a flow teacher: `teacher_run` when given,
    else a flow trained for `steps` steps here (its quality does not matter for timing)."""
    from imagegen.distill import distill
    with tempfile.TemporaryDirectory() as out:
        if teacher_run is None:
            cfg = imagegen.resolve_config({"family": "flow", "data": {"source": ds.name},
                                           "train": {"steps": steps, "sample_every": 0, "checkpoint_every": 10**6}})
            teacher_run = imagegen.train(cfg, out=out, progress=False, dataset=ds)
        run_dir = distill(teacher_run, steps=1, out=out, pairs=256, train_steps=steps, progress=False,
                          overrides=["train.log_every=10", "train.sample_every=0", "train.checkpoint_every=1000000"])
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        model = imagegen.load_run(run_dir).model
    speeds = [r["images_per_s"] for r in records[1:]] or [records[-1]["images_per_s"]]
    return statistics.median(speeds), REGISTRY["distilled"].train_defaults["batch_size"], model


def timed(fn, reps: int, budget_s: float = 1.0) -> float:
    """Median seconds of fn() over at least `reps` calls, more (up to 200) while under `budget_s`: a
    1 ms call is then timed a few hundred times, not five."""
    fn()                                             # warm-up
    times, start = [], time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _first_network_call(draw16):
    """(fn, inputs) of the first network call that `draw16()` (16 images) makes through
    runtime.batching.run_fixed_batch."""
    import imagegen.runtime.batching as batching
    real, seen = batching.run_fixed_batch, []

    def spy(fn, *xs, **kw):
        seen.append((fn, xs))
        return real(fn, *xs, **kw)

    with ExitStack() as stack:   # every family module that imported run_fixed_batch by name
        for name, module in list(sys.modules.items()):
            if name.startswith("imagegen.models.") and getattr(module, "run_fixed_batch", None) is real:
                stack.enter_context(mock.patch.object(module, "run_fixed_batch", spy))
        draw16()
    return seen[0]


def network_floor(draw16) -> tuple[float, float]:
    """16 t(1 row) / t(16 rows) of the first network call that `draw16()` makes, with that call's own
    inputs: what one image would cost against the per-image time at batch 16 if nothing but the network
    ran; and the same ratio of the time its operators spend in themselves (torch.profiler's self CPU
    time, summed), which leaves out the Python around them."""
    fn, xs = _first_network_call(draw16)
    rows = {k: [None if x is None else x[:k] for x in xs] for k in (1, 16)}
    with torch.no_grad():
        one = timed(lambda: fn(*rows[1]), reps=20)
        full = timed(lambda: fn(*rows[16]), reps=10)
        ops = {}
        for k, reps in ((1, 50), (16, 20)):
            fn(*rows[k])
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    fn(*rows[k])
            ops[k] = sum(e.self_cpu_time_total for e in prof.key_averages()) / reps
    return one / (full / 16), ops[1] / (ops[16] / 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--steps", type=int, default=60, help="training steps to time per family")
    ap.add_argument("--families", default=",".join(REGISTRY))
    ap.add_argument("--engine", default="torch",
                    help="what runs the networks (imagegen.runtime.engine): torch, onnxruntime, or both as torch,onnxruntime "
                         "(a row each, on the same trained model)")
    ap.add_argument("--teacher", help="for distilled: the flow or ddpm run to distil (default: a flow trained --steps here)")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        ds = imagegen.load_data(args.data)
    except imagegen.errors.DataError as e:
        print(f"# {args.data} unavailable ({e}); using shapes")
        ds = imagegen.load_data("shapes")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"data {ds.name} {ds.size}x{ds.size}x{ds.channels}")
    print("| family | engine | train batch | train images/s | sample 1 image (ms) | sample batch 256 (images/s) "
          "| 16 samples (s) | 1 image / per-image at 16 | network alone: 1 row / per-row at 16 | its operators alone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        steps = 1 if family == "random" else args.steps
        if REGISTRY[family].translates:
            pair = imagegen.load_data(PAIRS.get(ds.name, "pair:shapes:circle,square"))
            ips, bs, model = train_speed(family, pair, steps)
            x = imagegen.load_data(imagegen.DataConfig(source=pair.name, split="test")).a.batch(torch.arange(256))["image"]
            name, train_txt, draw = f"{family} ({pair.name}, translate)", f"{bs} pairs | {ips:.0f} pairs", \
                lambda n: model.translate(x[:n])
        else:
            if REGISTRY[family].made_by == "distill":
                ips, bs, model = distilled_speed(ds, steps, args.teacher)
            else:
                ips, bs, model = train_speed(family, ds, steps)
            k = model.num_classes
            name, train_txt = family, f"{bs} | " + ("one pass" if family == "random" else f"{ips:.0f}")

            def draw(n, model=model, k=k):
                return imagegen.generate(model, list(range(n)), labels=torch.arange(n) % k if k else None, batch_size=n)
        for engine in args.engine.split(","):
            if family == "random" and engine != "torch":
                continue   # no network to run
            imagegen.use_engine(model, engine)
            one = timed(lambda: draw(1), reps=5)
            big = timed(lambda: draw(256), reps=1)
            sixteen = timed(lambda: draw(16), reps=3)
            floor = "no network | no network" if family == "random" else "- | -" if engine != "torch" else \
                "{:.1f}x | {:.1f}x".format(*network_floor(lambda: draw(16)))
            print(f"| {name} | {engine} | {train_txt} | {one * 1000:.1f} | {256 / big:.0f} | {sixteen:.2f} "
                  f"| {one / (sixteen / 16):.1f}x | {floor} |", flush=True)


if __name__ == "__main__":
    main()
