"""benchmarks/gpu_check.py in its dry mode (the CPU at toy sizes), so that the one command prepared for a
lent GPU runs every step it will run there and writes the JSON the docs' GPU table is filled from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.rounding
def test_the_gpu_check_runs_dry_on_the_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["dry"] and report["machine"]["device"] == "cpu" and report["commit"]
    tests = report["cuda_tests"]
    collected = re.search(r"(\d+)/\d+ tests collected", tests["summary"])
    assert tests["exit"] == 0 and not tests["ran"] and collected and int(collected.group(1)) >= 3   # they collect
    rows = {(row["case"], row["precision"]): row for row in report["training"]}
    assert set(rows) == {(case, p) for case in ("flow-dit", "dcgan") for p in ("fp32", "bf16")}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["train_gflops_per_image"] > 0 and row["tflops"] > 0
        assert row["peak_tflops"] is None and row["peak_memory_gib"] is None                  # a CPU: no peak known
    assert report["seed_check"]["identical"] and report["seed_check"]["max_abs_diff"] == 0  # the CPU's guarantee
