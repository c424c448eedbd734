"""A dataset larger than a laptop's comfort: a generated folder of N 64 x 64 RGB PNGs (410,000 = 5.04 GB as
uint8), prepared once into a store, then trained on (the default DCGAN) lazily from the store, against
the in-memory path on a subset of the same images. Prints the prepare throughput, each training run's
images/s (median of the logged windows after the first) and peak resident memory (VmHWM).

    python benchmarks/big_store.py --n 410000 --work /tmp/bigstore --seconds 120 --repeats 2

The in-memory path is `--data folder:SUBSET`, a folder of hard links to the first --subset images of the
big folder (decoded into RAM at start); the lazy path is `--data store:STORE` (all N images) and, on the
same subset as the in-memory path, `--data store:STORE --set data.limit=SUBSET`. Runs alternate, so
drift on a noisy machine hits every path alike. Needs ~12 GB of disk for N = 410,000. Images already in the folder are not written again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

CLASSES = 10


def _make_chunk(job: tuple[str, int, int, int]) -> int:
    """Write images start..stop-1: smooth random colour fields (8 x 8 noise, bilinear to the side) with a
    bright square whose place follows the class, as class_{i mod 10}/{i:07d}.png."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    root, start, stop, side = job
    rng = np.random.default_rng(start)
    n = stop - start
    low = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8)).astype(np.float32))
    images = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()
    for k in range(n):
        i = start + k
        c = i % CLASSES
        y, x = (c // 4) * side // 4, (c % 4) * side // 4
        images[k, y:y + side // 4, x:x + side // 4] = 255
        Image.fromarray(images[k]).save(Path(root) / f"class_{c}" / f"{i:07d}.png", compress_level=1)
    return n


def make_folder(root: Path, n: int, side: int) -> float:
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(str(root), s, min(n, s + 2000), side) for s in range(0, n, 2000)
            if not (root / f"class_{(min(n, s + 2000) - 1) % CLASSES}" / f"{min(n, s + 2000) - 1:07d}.png").exists()]
    with Pool(os.cpu_count() or 1) as pool:
        done = 0
        for k in pool.imap_unordered(_make_chunk, jobs):
            done += k
            if done % 50_000 < 2000:
                print(f"  generated {done} / {n}", flush=True)
    return time.perf_counter() - t0


def watch(cmd: list[str], env=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd; (its result, its peak resident memory in KiB from /proc/PID/status VmHWM)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def poll():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.2)
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak[0]


def train(data: str, out: Path, seconds: float, extra: list[str]) -> tuple[float, int, int]:
    """(median images/s after the first logged window, peak RSS in MiB, steps) of a DCGAN run."""
    exe = str(Path(sys.executable).with_name("imagegen"))
    cmd = [exe, "train", "--data", data, "--model", "dcgan", "--out", str(out), "--no-progress",
           "--set", f"train.time_limit={seconds}", "--set", "train.sample_every=0", "--set", "train.steps=100000",
           *extra]
    r, peak = watch(cmd)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    run = Path(r.stdout.split("run folder:")[1].split()[0])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [rec["images_per_s"] for rec in log[1:-1]] or [rec["images_per_s"] for rec in log]
    return statistics.median(rates), peak // 1024, log[-1]["step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=410_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--subset", type=int, default=20_000)
    ap.add_argument("--work", default="/tmp/bigstore")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.work)
    folder, store, subset = work / "images", work / "store", work / "subset"
    if not (folder / "class_0").is_dir() or sum(len(os.listdir(folder / f"class_{c}")) for c in range(CLASSES)) < a.n:
        print(f"generating {a.n} images of {a.size} x {a.size} into {folder}", flush=True)
        print(f"  {a.n / make_folder(folder, a.n, a.size):.0f} images/s written")
    if not store.exists():
        exe = str(Path(sys.executable).with_name("imagegen"))
        r, peak = watch([exe, "data", "prepare", f"folder:{folder}", "--out", str(store), "--size", str(a.size),
                         "--no-progress"])
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        print(r.stdout.strip().splitlines()[-1] + f"; peak RSS {peak // 1024} MiB")
    size = sum(p.stat().st_size for p in store.iterdir())
    print(f"store: {store}, {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)")
    if not subset.exists():   # hard links to the images the store holds first (class_0's, in name order)
        (subset / "class_0").mkdir(parents=True)
        for name in sorted(os.listdir(folder / "class_0"))[: a.subset]:
            os.link(folder / "class_0" / name, subset / "class_0" / name)
    runs = work / "runs"
    results: dict[str, list[tuple[float, int, int]]] = {}
    paths = {
        f"in memory: folder of {a.subset}": (f"folder:{subset}", ["--set", f"data.size={a.size}"]),
        f"store, same {a.subset}": (f"store:{store}", ["--set", f"data.limit={a.subset}"]),
        f"store, all {a.n}": (f"store:{store}", []),
    }
    for r in range(a.repeats):
        for name, (data, extra) in paths.items():
            res = train(data, runs, a.seconds, extra)
            results.setdefault(name, []).append(res)
            print(f"  [{r + 1}/{a.repeats}] {name}: {res[0]:.1f} images/s, peak RSS {res[1]} MiB, {res[2]} steps", flush=True)
    print(f"\nDCGAN (defaults, batch 32), {a.seconds:.0f} s a run, medians of {a.repeats} runs:")
    print("| data | images/s | peak RSS |\n|---|---|---|")
    base = statistics.median(x[0] for x in results[next(iter(paths))])
    for name, rs in results.items():
        rate = statistics.median(x[0] for x in rs)
        print(f"| {name} | {rate:.1f} ({rate / base:.3f}x) | {max(x[1] for x in rs)} MiB |")


if __name__ == "__main__":
    main()
