"""One prepared command that measures a GPU in a few minutes, for the short time a GPU is lent:

1. the tests marked `cuda` (pytest -m cuda: what runs only on a GPU);
2. training `flow` on the DiT and `dcgan` on `shapes` (procedural: no download) under bf16 and fp16 for
   --steps steps each: images/s (the median of the logged windows after the first), the peak memory, and
   the TFLOP/s achieved (the FLOPs of one training step, counted by torch.utils.flop_counter, x images/s)
   beside the GPU's dense peak for that precision when the GPU is one the table below knows;
3. the same seeds drawn at batch 1 and at batch 16 on the GPU: the largest pixel difference (0 on the
   CPU, where imagegen guarantees it; on a GPU kernels may pick other algorithms by batch size).

Everything goes to one JSON file (--out), from which the GPU table of the docs is filled.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--steps 60] [--batch-size 256]
    python benchmarks/gpu_check.py --dry --out /tmp/gpu.json     # the CPU at toy sizes: seconds

--dry runs the same steps on the CPU at toy sizes (fp32 and bf16; fp16 needs CUDA) and only collects the
`cuda` tests, so that the test suite runs this script and it cannot rot while no GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import imagegen  # noqa: E402
from imagegen.sample import generate  # noqa: E402
from prompt_speed import cpu_model  # noqa: E402

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's data sheets: what "x% of peak" is of.
PEAK_TFLOPS = {"H100 PCIe": {"bf16": 756, "fp16": 756}, "H100": {"bf16": 989, "fp16": 989},
               "H200": {"bf16": 989, "fp16": 989}, "A100": {"bf16": 312, "fp16": 312},
               "L40S": {"bf16": 362, "fp16": 362}, "L4": {"bf16": 121, "fp16": 121}}

# (name, family, model overrides): the two families of the check, and their toy shapes for --dry.
CASES = [("flow-dit", "flow", {"backbone": "dit"}, {"backbone": "dit", "dit_size": "xxs"}),
         ("dcgan", "dcgan", {}, {"width": 8, "z_dim": 16})]


def machine(device: torch.device) -> dict:
    out = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()}
    else:
        out |= {"name": cpu_model(), "threads": torch.get_num_threads()}
    return out


def peak_of(name: str, precision: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):      # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key].get(precision)
    return None


def cuda_tests(dry: bool) -> dict:
    """pytest -m cuda on a GPU; on --dry only their collection (they need CUDA to run)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    cmd += ["--collect-only"] if dry else []
    t = time.perf_counter()
    r = subprocess.run(cmd + ["tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stdout.strip().splitlines() if line.strip()]
    return {"ran": not dry, "exit": r.returncode, "summary": lines[-1] if lines else r.stderr.strip()[-300:],
            "seconds": round(time.perf_counter() - t, 1)}


def train_case(name: str, family: str, model: dict, precision: str, device: torch.device, steps: int,
               batch: int, out: Path) -> dict:
    from quality import train_flops_per_image
    log_every = max(1, steps // 6)
    cfg = imagegen.resolve_config({"family": family, "model": model,
                                   "data": {"source": "shapes", **({"limit": 64} if device.type == "cpu" else {})},
                                   "train": {"steps": steps, "batch_size": batch, "precision": precision,
                                             "device": str(device), "sample_every": 0, "checkpoint_every": steps,
                                             "log_every": log_every, "val_every": 0}})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    run_dir = imagegen.train(cfg, out=out, progress=False)
    seconds = time.perf_counter() - t
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in logged if "images_per_s" in r][1:] or \
            [r["images_per_s"] for r in logged if "images_per_s" in r]     # the first window holds the warm-up
    rate = statistics.median(rates) if rates else steps * batch / seconds
    flops = train_flops_per_image(run_dir)
    achieved = flops * rate / 1e12
    return {"case": name, "precision": precision, "steps": steps, "batch_size": batch, "images_per_s": round(rate, 1),
            "seconds": round(seconds, 1), "train_gflops_per_image": round(flops / 1e9, 3),
            "tflops": round(achieved, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "run_dir": str(run_dir)}


def seed_check(run_dir: str, device: torch.device, n: int = 16) -> dict:
    """The same seeds at batch 1 and batch n on the device: the largest difference in [-1, 1] units."""
    run = imagegen.load_run(run_dir, device=device)
    seeds = list(range(n))
    together = generate(run.model, seeds, batch_size=n)
    alone = torch.cat([generate(run.model, [s], batch_size=1) for s in seeds])
    diff = (together.float() - alone.float()).abs().max().item()
    return {"run": Path(run_dir).name, "seeds": n, "max_abs_diff": diff, "identical": diff == 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dry", action="store_true", help="the CPU at toy sizes (seconds): what the test suite runs")
    a = ap.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry to check the script on the CPU")
    device = torch.device("cpu" if a.dry else "cuda")
    steps, batch = (6, 8) if a.dry else (a.steps, a.batch_size)
    precisions = ("fp32", "bf16") if a.dry else ("bf16", "fp16")
    started = time.perf_counter()
    report = {"machine": machine(device), "dry": a.dry, "commit": commit()}
    print(f"# {report['machine']['name']} ({device}), torch {torch.__version__}, commit {report['commit']}", flush=True)
    report["cuda_tests"] = cuda_tests(a.dry)
    print(f"cuda tests ({'collected' if a.dry else 'ran'}): {report['cuda_tests']['summary']}", flush=True)
    report["training"] = []
    with tempfile.TemporaryDirectory() as tmp:
        print("| case | precision | images/s | TFLOP/s | of peak | peak memory (GiB) |\n|---|---|---|---|---|---|")
        for name, family, model, toy in CASES:
            for precision in precisions:
                row = train_case(name, family, toy if a.dry else model, precision, device, steps, batch, Path(tmp) / name)
                peak = peak_of(report["machine"]["name"], precision)
                row["peak_tflops"], row["share_of_peak"] = peak, round(row["tflops"] / peak, 4) if peak else None
                report["training"].append(row)
                share = "-" if peak is None else f"{100 * row['share_of_peak']:.1f}%"
                memory = "-" if row["peak_memory_gib"] is None else row["peak_memory_gib"]
                print(f"| {name} | {precision} | {row['images_per_s']:.0f} | {row['tflops']:.3g} | {share} | {memory} |",
                      flush=True)
        first_flow = next(r for r in report["training"] if r["case"] == "flow-dit")
        report["seed_check"] = seed_check(first_flow["run_dir"], device)
    for row in report["training"]:
        row.pop("run_dir")
    print(f"same seeds at batch 1 and 16: largest difference {report['seed_check']['max_abs_diff']:.3g}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out} ({report['seconds']:.0f} s)")
    return 0


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
