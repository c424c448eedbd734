"""Latency of exported ONNX graphs in onnxruntime against the same computation in torch (eager, the
graph's own module), on this machine's CPU cores, for each family's default network at Fashion-MNIST's
28 x 28 (one training step: the weights' values do not change the cost), plus any run folders given.

    python benchmarks/export_speed.py [RUN ...] [--batches 1,64] [--repeats 50]

Both run with the same thread count (torch.get_num_threads(); onnxruntime's intra-op threads). Prints
the median milliseconds per call and the ratio, and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import imagegen
from imagegen.export import graph_for, export_onnx

FAMILIES = ["dcgan", "cgan", "vae", "flow", "ddpm"]


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def inputs_at(graph, n: int) -> dict[str, torch.Tensor]:
    """The graph's check inputs tiled to batch n."""
    return {k: v.repeat_interleave(-(-n // v.shape[0]), 0)[:n] for k, v in graph.inputs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    runs = list(a.runs)
    for family in FAMILIES:
        cfg = imagegen.resolve_config({"family": family, "data": {"source": "fashion-mnist", "limit": 256},
                                       "train": {"steps": 1, "batch_size": 8, "sample_every": 0}})
        runs.append(str(imagegen.train(cfg, out=tmp / family, progress=False)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads; median of {a.repeats} calls\n")
    print("| run | graph | batch | torch ms | onnxruntime ms | ratio | max diff |\n|---|---|---|---|---|---|---|")
    for path in runs:
        run = imagegen.load_run(path)
        out = tmp / f"{Path(path).name}.onnx"
        done = export_onnx(run, out)
        graph = graph_for(run)   # over the run's own model: channels-last, as imagegen runs it
        session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
        for n in map(int, a.batches.split(",")):
            xs = inputs_at(graph, n)
            feeds = {k: v.numpy() for k, v in xs.items()}
            with torch.no_grad():
                t_torch = median_ms(lambda: graph.module(*xs.values()), a.repeats)
                want = graph.module(*xs.values()).numpy()
            t_ort = median_ms(lambda: session.run(None, feeds), a.repeats)
            diff = float(np.abs(session.run(None, feeds)[0] - want).max())
            name = f"{run.family} ({Path(path).name})" if path in a.runs else f"{run.family} (default, 28 px)"
            print(f"| {name} | {', '.join(done.inputs)} -> {', '.join(done.outputs)} | {n} | {t_torch:.2f} | "
                  f"{t_ort:.2f} | {t_torch / t_ort:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
