"""Bounded load on `imagegen serve` over 127.0.0.1: latency percentiles and answers by status.

Starts the server (uvicorn, as `imagegen serve` runs it) in a child process over RUNS_DIR, then for each
concurrency level runs that many clients for --seconds, each sending POST /api/generate for one image
with a fresh seed over its own keep-alive connection, back to back. Prints p50 / p99 latency of the 200
answers, the count of each status, connection errors, and how long /health takes once the load stops.

    python benchmarks/serve_load.py RUNS_DIR [--model NAME] [--levels 8,400] [--seconds 10] [--engine onnxruntime]

One request is answered before the levels start (an onnxruntime engine exports the network then).

The clients are raw asyncio HTTP/1.1 (no client library in the measured path), in one process that
shares the 2 cores with the server: the figures include that contention, as a real local client would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter


async def one_request(reader, writer, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection" and value.strip().lower() == "close":
            close = True
    await reader.readexactly(length)
    if close:
        raise ConnectionResetError("server closed the connection")
    return status, time.perf_counter() - t0


async def client(port: int, model: str, seed0: int, until: float, results: list, statuses: Counter, errors: Counter) -> None:
    seed = seed0
    reader = writer = None
    while time.perf_counter() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, dt = await one_request(reader, writer, json.dumps({"model": model, "seed": seed, "n": 1}).encode())
            statuses[status] += 1
            if status == 200:
                results.append(dt)
            elif status == 503:
                await asyncio.sleep(0.05)           # a polite client backs off briefly (Retry-After says 1 s)
            seed += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            errors[type(e).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def level(port: int, model: str, clients: int, seconds: float) -> dict:
    results: list[float] = []
    statuses: Counter = Counter()
    errors: Counter = Counter()
    until = time.perf_counter() + seconds
    await asyncio.gather(*[client(port, model, 10_000_000 * i, until, results, statuses, errors) for i in range(clients)])
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    health_line = await reader.readline()
    health = time.perf_counter() - t0
    writer.close()
    q = statistics.quantiles(results, n=100) if len(results) >= 2 else [float("nan")] * 99
    return {"clients": clients, "ok": len(results), "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "statuses": dict(sorted(statuses.items())), "errors": dict(errors),
            "throughput": len(results) / seconds, "health_after_s": health, "health_status": health_line.split()[1].decode()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir")
    ap.add_argument("--model", help="run name to load (default: the first dcgan run)")
    ap.add_argument("--levels", default="8,400", help="comma list of concurrent clients")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--engine", default="torch", help="the server's --engine: torch or onnxruntime")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "imagegen", "serve", args.runs_dir, "--port", str(port),
                               "--engine", args.engine],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})
    try:
        import urllib.request
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=2) as r:
                    models = json.loads(r.read())
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start: {server.stdout.read() if server.poll() is not None else ''}")
                time.sleep(0.2)
        model = args.model or next((m["name"] for m in models if m["family"] == "dcgan"), models[0]["name"])
        warm = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", method="POST",
                                      data=json.dumps({"model": model, "seed": 0}).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(warm, timeout=120) as r:
            r.read()
        print(f"# server pid {server.pid} on 127.0.0.1:{port}; model {model}; engine {args.engine}; "
              f"{args.seconds:g} s per level; "
              f"{os.cpu_count()} cores shared by server and clients")
        print("| clients | p50 (ms) | p99 (ms) | images/s | answers by status | connection errors | /health after (ms) |")
        print("|---|---|---|---|---|---|---|")
        for clients in [int(c) for c in args.levels.split(",")]:
            r = asyncio.run(level(port, model, clients, args.seconds))
            print(f"| {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput']:.0f} | "
                  f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} | {sum(r['errors'].values())} "
                  f"{r['errors'] or ''} | {r['health_after_s'] * 1000:.0f} ({r['health_status']}) |", flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
