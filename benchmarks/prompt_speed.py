"""How long the page waits for the images of a prompt: POST /api/generate with a new prompt and n images.

Issue 16's target: 4 images for a prompt in at most 1 s on 2 cores with the model's default sampler.
Each request carries a prompt not asked before, so the time includes encoding it (all-MiniLM-L6-v2),
the sampler (a flow's default: Heun, 10 intervals, guidance 1.5, so 2 network calls of 2n rows per
interval), and the PNG: the whole of what the page waits for, through the FastAPI app in this process
(no sockets, no browser). Also prints the library call alone (`imagegen.generate`) for the same prompts.

    python benchmarks/prompt_speed.py [RUN_DIR] [--n 4] [--requests 10]

Without RUN_DIR it trains a 1-step flow on 64 `scenes` images with the default config (the time does not
depend on the weights, only on the network's shape, which is the default one).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import imagegen  # noqa: E402
from imagegen.data import scenes as S  # noqa: E402


def default_run(out: Path) -> Path:
    cfg = imagegen.resolve_config({"family": "flow", "data": {"source": "scenes", "limit": 64},
                                   "train": {"steps": 1, "batch_size": 8, "sample_every": 0, "grid_size": 4}})
    return imagegen.train(cfg, out=out, progress=False)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine()


def prompts(k: int) -> list[str]:
    """k prompts none of which was asked before in this process (so each is encoded)."""
    return [f"a {c} {s} left of a {d} {t}" for c in S.COLOUR_NAMES for s in S.SHAPES
            for d in S.COLOUR_NAMES for t in S.SHAPES if s != t][:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--requests", type=int, default=10)
    a = ap.parse_args()
    import torch
    from fastapi.testclient import TestClient

    from imagegen.serve import create_app

    tmp = Path(tempfile.mkdtemp())
    try:
        run_dir = Path(a.run_dir) if a.run_dir else default_run(tmp / "runs")
        runs = tmp / "served"
        runs.mkdir()
        (runs / "text").symlink_to(run_dir.resolve())
        client = TestClient(create_app(runs, log=None))
        run = imagegen.load_run(run_dir)
        cfg = run.model.cfg
        asked = prompts(2 * a.requests + 2)
        # warm-up: load the model and the encoder, first calls of each kernel
        assert client.post("/api/generate", json={"model": "text", "seed": 0, "n": a.n, "prompt": asked.pop()}).status_code == 200
        imagegen.generate(run.model, range(a.n), prompts=asked.pop())
        api, lib = [], []
        for k in range(a.requests):
            t0 = time.perf_counter()
            r = client.post("/api/generate", json={"model": "text", "seed": 4 * k, "n": a.n, "prompt": asked.pop()})
            api.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            t0 = time.perf_counter()
            imagegen.generate(run.model, range(a.n), prompts=asked.pop())
            lib.append(time.perf_counter() - t0)
        print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
        print(f"model: {run_dir} ({cfg.backbone}, width {cfg.width}, {cfg.image_size} px; "
              f"{cfg.solver} {cfg.sample_steps} intervals, guidance {cfg.guidance})")
        for name, times in (("POST /api/generate", api), ("imagegen.generate", lib)):
            print(f"{name}: {a.n} images for a new prompt, median {statistics.median(times) * 1000:.0f} ms "
                  f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}) over {len(times)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
