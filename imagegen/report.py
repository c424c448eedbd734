"""Run folder -> report.html: config, loss curves, the newest sample grid, throughput.

Reads files only (config.json, log.jsonl, samples/); the page is self-contained (images inlined), so
it can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path

from .checkpoint import read_config, write_bytes_atomic
from .models import family_class


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash: the rest of the log is still worth showing
    return records


def loss_plot_png(records: list[dict]) -> bytes | None:
    keys = sorted({k for r in records for k in r if k.startswith("loss")})
    if not keys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _img_tag(png: bytes, alt: str, style: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" style="{style}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    records = read_log(run_dir)
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    parts = [f"<h1>{html.escape(run_dir.name)}</h1>"]
    last = records[-1] if records else {}
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    facts = [
        ("family", cfg["family"]),
        ("data", f"{cfg.get('data', {}).get('source', '?')} ({cfg.get('data_source', '')})"),
        ("steps", last.get("step", 0)),
        ("throughput", f"{statistics.median(speeds):.0f} {'pairs' if family_class(cfg['family']).translates else 'images'}/s (median over {len(speeds)} log windows)" if speeds else "n/a"),
        ("non-finite steps skipped", last.get("bad_steps", 0)),
    ]
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts) + "</table>")
    if grids:
        newest = grids[-1]
        what = ("rows: input, translated, translated back; domain A, then B" if family_class(cfg["family"]).translates
                else "seeds 0..")
        parts.append(f"<h2>Samples at {html.escape(newest.stem)} (EMA weights; {what})</h2>")
        parts.append(_img_tag(newest.read_bytes(), f"sample grid {newest.stem}", "image-rendering: pixelated; max-width: 100%"))
    plot = loss_plot_png(records)
    if plot:
        parts.append("<h2>Losses</h2>" + _img_tag(plot, "loss curves"))
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        try:
            ev = json.loads(metrics_file.read_text())
            rows = [(k, v) for k, v in ev["metrics"].items()]
            parts.append(f"<h2>Evaluation (step {ev.get('step', '?')})</h2>")
            parts.append("<table>" + "".join(
                f"<tr><th>{html.escape(k)}</th><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else json.dumps(v))}</td></tr>"
                for k, v in rows) + "</table>")
            parts.append("<p>Protocol:</p><pre>" + html.escape(json.dumps(ev["protocol"], indent=2)) + "</pre>")
        except (ValueError, KeyError) as e:
            parts.append(f"<p>metrics.json is unreadable: {html.escape(str(e))}</p>")
    parts.append("<h2>Config</h2><pre>" + html.escape(json.dumps(cfg, indent=2)) + "</pre>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + html.escape(run_dir.name)
        + "</title><style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
        "th{text-align:left;padding-right:1em}pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    out = run_dir / "report.html"
    write_bytes_atomic(out, page.encode())
    return out
