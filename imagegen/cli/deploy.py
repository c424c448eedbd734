"""`imagegen export` (ONNX) and `imagegen serve` (the studio and the HTTP API)."""

from __future__ import annotations

from ..checkpoint import load_run
from ..config import Range
from .options import add_engine, add_number


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="the run's sampling network as an ONNX file, checked in onnxruntime")
    p.add_argument("run_dir")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (the only format so far)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="ema (default) or the raw model weights")
    p.add_argument("--direction", default="a2b", choices=["a2b", "b2a"], help="cyclegan: which generator (default a2b)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("serve", help="the web page and HTTP API over every run folder under RUNS_DIR")
    p.add_argument("runs_dir")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    add_number(p, "--port", Range(1, 65535), "TCP port", default=8000)
    add_number(p, "--threads", Range(1, 1024, zero="all cores but one"), "torch threads for the models", default=0)
    p.add_argument("--token", help="the token that uploads and training need (default: a new one, printed at start)")
    p.add_argument("--no-token", action="store_true", help="no token (allowed with a loopback --host only)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="off loopback: another name the Host header may carry (repeatable; '*' for any, behind "
                        "a proxy that checks it)")
    add_engine(p)
    p.set_defaults(handler=cmd_serve)


def cmd_export(a) -> int:
    from ..export import export_onnx
    run = load_run(a.run_dir, weights=a.weights)
    done = export_onnx(run, a.out, direction=a.direction)
    print(f"wrote {done.path} ({done.path.stat().st_size / 2**20:.1f} MiB): the {run.family} network of {run.path}")
    for kind, table in (("input", done.inputs), ("output", done.outputs)):
        for name, (dtype, shape) in table.items():
            print(f"  {kind:6s} {name:12s} {dtype:16s} {' x '.join(map(str, shape))}")
    print(f"  usage: {done.usage}")
    print(f"checked: onnxruntime matches torch within {done.max_abs_diff:.2g} (tolerance 1e-4) on random inputs")
    return 0


def cmd_serve(a) -> int:
    from ..serve import serve
    serve(a.runs_dir, host=a.host, port=a.port, threads=a.threads, token=a.token, no_token=a.no_token, engine=a.engine,
          allow_hosts=tuple(a.allow_host))
    return 0
