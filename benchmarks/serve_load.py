"""Bounded load on `imagegen serve` over 127.0.0.1: latency percentiles and answers by status.

Starts the server (uvicorn, as `imagegen serve` runs it) in a child process over RUNS_DIR, then for each
concurrency level runs that many clients for --seconds, each sending POST /api/generate for one image
with a fresh seed over its own keep-alive connection, back to back. Prints p50 / p99 latency of the 200
answers, the count of each status, connection errors, and how long /health takes once the load stops.

    python benchmarks/serve_load.py RUNS_DIR [--model NAME] [--levels 8,400] [--seconds 10] [--engine onnxruntime]
    python benchmarks/serve_load.py RUNS_DIR --busy --levels 8 --seconds 60

One request is answered before the levels start (an onnxruntime engine exports the network then).

--busy: the load a studio sees. RUNS_DIR is copied to a scratch folder (the job writes its run there). A
training job trains `dcgan` on an uploaded zip for the whole level. Meanwhile, a second upload of
`--trickle-mib` MiB (a valid zip) trickles in at 1 MiB/s on a connection of its own. The server's temp
folder (TMPDIR) is its own. After the level, the script prints the answers by status (a 5xx other than a
deadline or busy 503 is a failure), the generate p99, the trickled upload's answer, the job's state,
and what is left in the temp folder once the server has stopped (nothing, or it is a failure).

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
from pathlib import Path


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


TOKEN = "serve-load-token"


def zip_of_noise(mib: int) -> bytes:
    """A valid zip of `mib` MiB: stored (uncompressed) members of random bytes named as images, 8 MiB each
    (under the 16 MiB a member may have); unpacking checks names and sizes, not pixels."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(0, mib, 8):
            z.writestr(f"noise/{i:03d}.png", os.urandom(min(8, mib - i) << 20))
    return buf.getvalue()


def zip_of_images(n: int = 64) -> bytes:
    """A small class-folder zip of real PNGs for the training job."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
            z.writestr(f"{'ab'[i % 2]}/{i}.png", png.getvalue())
    return buf.getvalue()


def multipart(data: bytes, boundary: str = "imagegen-load") -> tuple[bytes, bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def post_upload(port: int, data: bytes, mib_per_s: float | None = None) -> tuple[int, dict, float]:
    """POST /api/upload of a zip over a raw connection, at mib_per_s (None: at once): (status, answer, s)."""
    head, tail, kind = multipart(data)
    body_len = len(head) + len(data) + len(tail)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Imagegen-Token: {TOKEN}\r\n"
                 f"Content-Type: {kind}\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n".encode() + head)
    step = 64 << 10
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
        if mib_per_s:
            await asyncio.sleep(step / (mib_per_s * (1 << 20)))
    writer.write(tail)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    body = answer.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(body), time.perf_counter() - t0
    except ValueError:
        return status, {"raw": body[:200].decode(errors="replace")}, time.perf_counter() - t0


async def busy_level(port: int, model: str, clients: int, seconds: float, trickle_mib: int) -> dict:
    """One level with a training job running and a slow upload trickling in."""
    import urllib.request
    status, up, _ = await post_upload(port, zip_of_images())
    if status != 200:
        raise SystemExit(f"the training upload was refused: {status} {up}")
    ask = urllib.request.Request(f"http://127.0.0.1:{port}/api/train", method="POST",
                                 data=json.dumps({"upload": up["upload"], "family": "dcgan",
                                                  "minutes": round(seconds / 60 + 0.5, 2)}).encode(),
                                 headers={"Content-Type": "application/json", "X-Imagegen-Token": TOKEN})
    with urllib.request.urlopen(ask, timeout=30) as r:
        job = json.loads(r.read())
    trickle = asyncio.create_task(post_upload(port, zip_of_noise(trickle_mib), mib_per_s=1.0))
    result = await level(port, model, clients, seconds)
    result["trickle"] = await trickle
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/train", timeout=30) as r:
        result["job"] = {**job, **json.loads(r.read())}
    return result


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
    ap.add_argument("--busy", action="store_true", help="a training job and a 1 MiB/s upload during each level")
    ap.add_argument("--trickle-mib", type=int, default=48, help="--busy: the slow upload's size in MiB")
    args = ap.parse_args()
    import shutil
    import tempfile
    scratch = Path(tempfile.mkdtemp(prefix="imagegen-load-"))
    runs_dir, tmp = args.runs_dir, scratch / "tmp"
    tmp.mkdir()
    if args.busy:                                    # the job writes its run and uploads here, not into RUNS_DIR
        runs_dir = str(shutil.copytree(args.runs_dir, scratch / "runs"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "imagegen", "serve", runs_dir, "--port", str(port),
                               "--engine", args.engine, "--token", TOKEN],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "TMPDIR": str(tmp),      # torch's compile cache elsewhere:
                                   "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")})   # tmp holds the server's own
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
        busy = []
        for clients in [int(c) for c in args.levels.split(",")]:
            r = asyncio.run(busy_level(port, model, clients, args.seconds, args.trickle_mib) if args.busy
                            else level(port, model, clients, args.seconds))
            print(f"| {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput']:.0f} | "
                  f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} | {sum(r['errors'].values())} "
                  f"{r['errors'] or ''} | {r['health_after_s'] * 1000:.0f} ({r['health_status']}) |", flush=True)
            busy += [r] if args.busy else []
    finally:
        server.terminate()
        server.wait(30)
    for r in busy:
        status, answer, took = r["trickle"]
        bad = {k: v for k, v in r["statuses"].items() if k >= 500 and k != 503}
        print(f"\n{r['clients']} clients, busy: 5xx other than 503: {bad or 'none'}; the {args.trickle_mib} MiB upload at "
              f"1 MiB/s: {status} after {took:.0f} s ({answer}); the job: {r['job']['state']} at step {r['job']['step']}")
    left = sorted(p.name for p in tmp.iterdir())
    print(f"left in the server's temp folder after it stopped: {left or 'nothing'}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
