"""Shared fixtures: tiny real components (no mocks) so the suite runs in a few minutes on 2 CPU cores.

Shared (session-scoped) fixtures are read-only: each is fingerprinted when made and checked again at the
end of the session, so a test that writes into one fails the run (copy it first: `private_copy`)."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import torch

import imagegen
from imagegen.evaluate.evaluator import EvaluatorConfig, train_evaluator


def pytest_configure(config):
    # Under pytest-xdist (`make test` runs `-n auto`) the workers share the machine's cores: each gets its
    # share of torch threads, and so do the commands its tests start (OMP_NUM_THREADS is inherited).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


# The modules that take longest (in seconds of one worker in `make test` on machine A, 2026-12-06: 170,
# 108, 90, about 100, 55, 60, 32, 31, 26 and 26), which run first: xdist hands each worker the next
# module (--dist loadscope) as it finishes one, so a long module started last leaves the other worker
# idle while it runs. Its own ordering (most tests first;
# the Makefile turns it off) put the 170-second text_follows, one test, last. The rest keep their order.
SLOWEST_FIRST = ("test_text_follows.py", "test_conditional.py", "test_studio_train.py", "test_engine.py",
                 "test_likelihood.py", "test_text.py", "test_distributed.py", "test_serve.py", "test_ddpm.py",
                 "test_export.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order within a module kept
    # The tests marked `cuda` need a GPU: without one they are deselected (and counted in the summary as
    # such), not skipped, unless the run asks for them by name (`-m cuda`, as benchmarks/gpu_check.py does).
    if not torch.cuda.is_available() and "cuda" not in (config.option.markexpr or ""):
        gpu = [item for item in items if item.get_closest_marker("cuda")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("cuda")]


TINY = {
    "family": "dcgan",
    "model": {"width": 8, "z_dim": 16},
    "data": {"source": "shapes", "limit": 256},
    "train": {"batch_size": 16, "log_every": 5, "sample_every": 0, "grid_size": 16, "checkpoint_every": 10},
}


def tiny_config(steps: int = 20, **sections) -> imagegen.RunConfig:
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    tree["train"]["steps"] = steps
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return imagegen.resolve_config(tree)


def fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder: relative path -> (size, modification time in ns)."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_only(request, folder: Path) -> Path:
    """Check at the end of the session that nothing under folder was written, added or removed."""
    before = fingerprint(folder)

    def check():
        assert fingerprint(folder) == before, f"a test wrote into the shared fixture {folder}; copy it first"
    request.addfinalizer(check)
    return folder


def run_maker(request, tmp_path_factory, variants: dict[str, tuple[str, dict]], steps: int):
    """variant -> a read-only run folder of variants[variant] = (family, model config), trained for `steps`
    steps on shapes (tiny_config) when first asked for: the body of a module's `runs` fixture."""
    made = {}

    def get(variant: str) -> Path:
        if variant not in made:
            tree = tiny_config(steps).to_json()
            tree["family"], tree["model"] = variants[variant]
            made[variant] = read_only(request, imagegen.train(imagegen.resolve_config(tree),
                                                              out=tmp_path_factory.mktemp(variant), progress=False))
        return made[variant]
    return get


LOCAL = "http://127.0.0.1"   # TestClient's base address: the server answers to loopback names only (guard.py)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """IMAGEGEN_CACHE set to a fresh folder for a whole module (caption embeddings, evaluators, the judge),
    so its tests neither read nor fill the user's cache. Use with pytest.mark.usefixtures."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@contextlib.contextmanager
def chromium(**options):
    """A browser context of Debian's Chromium driven by Playwright (never a browser Playwright downloads);
    `options` go to new_context (accept_downloads=True...). The page's Content-Security-Policy is bypassed:
    Playwright's wait_for_function evaluates its predicate with eval(), which that policy forbids
    (test_serve.py checks the page under its policy)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            yield browser.new_context(**{"bypass_csp": True, **options})
        finally:
            browser.close()


def fetched(page, url_expression: str) -> bytes:
    """The bytes behind a URL the page holds, given as a JS expression (an <img>'s src, a blob: link)."""
    return bytes(page.evaluate(f"async () => Array.from(new Uint8Array(await (await fetch({url_expression})).arrayBuffer()))"))


@contextlib.contextmanager
def live_server(runs_dir: Path, token: str | None = None):
    """`imagegen serve` over runs_dir on a free port in a thread, for as long as the block runs: the port.
    `token`: what uploads and training need (None: no token, as `--no-token` on loopback)."""
    import threading
    import time

    import uvicorn

    from imagegen.serve import create_app
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runs_dir, log=None, token=token), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def serve_process(runs_dir: Path, *args) -> tuple[subprocess.Popen, int]:
    """`imagegen serve RUNS_DIR ARGS` as a user starts it, a process of its own on a free port (one torch
    thread), once its /health answers: (the process, its port). Its output is in proc.stdout; the caller
    stops it."""
    import sys
    import time
    import urllib.request
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imagegen", "serve", str(runs_dir), "--port", str(port), "--threads", "1",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                assert r.status == 200
                return proc, port
        except OSError:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)


def private_copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of a shared fixture folder that a test may write into."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory):
    """One tiny trained DCGAN run folder shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs")
    return read_only(request, imagegen.train(tiny_config(steps=20), out=out, progress=False))


# The tiny evaluators of `shapes` (32 px, its own size, and 16 px): a few seconds to train, > 0.9 accurate.
TINY_EVAL = EvaluatorConfig(data="shapes", epochs=3, width=8, limit=2048, batch_size=64, lr=5e-3)
TINY_EVAL_16 = dataclasses.replace(TINY_EVAL, size=16)


@pytest.fixture(scope="session")
def shared_evaluators(request, tmp_path_factory):
    """(the 32 px evaluator, the IMAGEGEN_CACHE folder holding it and the 16 px one), trained once."""
    cache = tmp_path_factory.mktemp("evaluators")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEGEN_CACHE", str(cache))
        ev = train_evaluator(TINY_EVAL, log=None)
        train_evaluator(TINY_EVAL_16, log=None)
    return ev, read_only(request, cache)


@pytest.fixture
def evaluators(shared_evaluators, tmp_path, monkeypatch):
    """The tiny evaluators in a private copy of their cache, set as IMAGEGEN_CACHE for this test (which
    may then train and cache others)."""
    ev, cache = shared_evaluators
    mine = private_copy(cache, tmp_path)
    monkeypatch.setenv("IMAGEGEN_CACHE", str(mine))
    return ev, mine


def idx_bytes(dtype_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, dtype_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_idx_set(folder, n: int = 20, *, gz: bool = True, labels: bytes | None = None, images: bytes | None = None):
    """A valid MNIST-style train split in `folder` (28x28 images, labels 0..9), optionally overridden."""
    folder.mkdir(parents=True, exist_ok=True)
    img = images if images is not None else idx_bytes(0x08, (n, 28, 28), bytes(range(256)) * (n * 784 // 256) + bytes(n * 784 % 256))
    lbl = labels if labels is not None else idx_bytes(0x08, (n,), bytes(i % 10 for i in range(n)))
    for name, data in (("train-images-idx3-ubyte", img), ("train-labels-idx1-ubyte", lbl)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def run_main(*args) -> subprocess.CompletedProcess:
    """`imagegen ARGS` run in this process (the same parser and commands as the installed script, without
    an interpreter start per call), with what it printed: the result a subprocess.run would give."""
    from imagegen.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["imagegen", *map(str, args)], code, out.getvalue(), err.getvalue())
