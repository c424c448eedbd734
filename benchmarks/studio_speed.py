"""How long the studio's grids take: a 16-image explore grid from a DCGAN, and a 16-image vary grid from a
flow model (issue 17's targets on 2 cores: at most 150 ms and at most 2 s).

    python benchmarks/studio_speed.py [--gan RUN_DIR] [--flow RUN_DIR] [--strength 0.5] [--repeats 10]

explore: `imagegen.generate(model, 16 new seeds)`, and through the app as the page asks for it (16
concurrent POST /api/generate requests of one image each, over ASGI in this process, which the server
micro-batches; PNG encoding included); vary: `imagegen.vary(model, seed, 16 seeds, strength)`
with the flow's default sampler (Heun, 10 intervals, of which SDEdit runs the last strength x 10, two
network calls each). Without run folders it trains 1-step runs of the default configs on Fashion-MNIST
(28 x 28): the time depends on the network's shape, not on its weights. Prints medians and ranges.
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
from prompt_speed import cpu_model  # noqa: E402


def default_run(family: str, out: Path) -> Path:
    cfg = imagegen.resolve_config({"family": family, "data": {"source": "fashion-mnist"},
                                   "train": {"steps": 1, "batch_size": 8, "sample_every": 0, "grid_size": 4}})
    return imagegen.train(cfg, out=out / family, progress=False)


def timed(fn, repeats: int) -> list[float]:
    fn()                                                     # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def line(what: str, times: list[float]) -> str:
    ms = sorted(1000 * t for t in times)
    return f"{what}: median {statistics.median(ms):.0f} ms ({ms[0]:.0f}-{ms[-1]:.0f}) over {len(ms)}"


def explore_via_app(run_dir: Path, seeds):
    """A callable that sends the page's 16 explore requests at once and waits for all the PNGs."""
    import asyncio

    import httpx

    from imagegen.serve import create_app
    app = create_app(run_dir, log=None)
    name = next(iter(app.state.runs))
    loop = asyncio.new_event_loop()

    async def grid():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            first = next(seeds)
            answers = await asyncio.gather(*(client.post("/api/generate", json={"model": name, "seed": first + i})
                                             for i in range(16)))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
            for _ in range(15):
                next(seeds)
    return lambda: loop.run_until_complete(grid())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gan", help="a dcgan run folder (default: a 1-step default DCGAN)")
    ap.add_argument("--flow", help="a flow (or ddpm) run folder (default: a 1-step default flow)")
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--prompt", help="for a text model: the prompt of every variation")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp())
    try:
        gan_dir = Path(a.gan) if a.gan else default_run("dcgan", tmp)
        gan = imagegen.load_run(gan_dir).model
        flow = imagegen.load_run(a.flow or default_run("flow", tmp)).model
        print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        seeds = iter(range(10**6))
        print(line("explore: 16 DCGAN images", timed(lambda: imagegen.generate(gan, [next(seeds) for _ in range(16)]),
                                                   a.repeats)))
        cfg = flow.cfg
        what = f"vary: 16 {flow.name} images at strength {a.strength:g} ({cfg.solver if hasattr(cfg, 'solver') else 'ddim'}, " \
               f"{cfg.sample_steps} steps, {cfg.image_size} px, width {cfg.width})"
        print(line(what, timed(lambda: imagegen.vary(flow, next(seeds), range(16), strength=a.strength, prompt=a.prompt),
                               a.repeats)))
        # Last: the app runs the model in a thread of its own, and once a second thread has used torch's
        # thread pool, the main thread's calls in this process were seen to slow down (vary: 768 -> 1,235 ms).
        print(line("explore through the app: 16 concurrent requests", timed(explore_via_app(gan_dir, seeds),
                                                                            a.repeats)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
