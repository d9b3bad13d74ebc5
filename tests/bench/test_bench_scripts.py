"""The benchmark scripts still run (tiny sizes, CPU): the GPU runs of docs/benchmarks.md
use the same scripts with bigger arguments, on machines where there is no time to debug
them. Numbers are not checked here: benchmarks print ratios, tests never time anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT / "bench",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_recalib_speed_prints_its_table_and_the_cpu_comparison() -> None:
    out = _run(
        "recalib_speed.py",
        *("--batches", "2", "--batch-size", "4", "--size", "16", "--repeats", "1"),
        *("--threads", "1", "--verify", "1"),
    )
    for case in ("eval forward", "update_bn", "exact/train", "exact/eval"):
        assert case in out
    # The same weights and data on the same device: identical statistics.
    line = next(li for li in out.splitlines() if li.startswith("default"))
    assert [float(v) for v in line.split()[1:]] == [0.0, 0.0]


def test_serve_batches_compares_in_process_and_http() -> None:
    out = _run(
        "serve_batches.py",
        *("--model", "resnet", "--size", "16", "--batch-sizes", "1,4"),
        *("--concurrency", "1", "--seconds", "0.2", "--rounds", "1", "--threads", "1"),
    )
    rows = [li.split() for li in out.splitlines() if li[:5].strip() in ("1", "4")]
    assert [(r[0], r[2]) for r in rows] == [
        ("1", "in-process"),
        ("1", "HTTP"),
        ("4", "in-process"),
        ("4", "HTTP"),
    ]
    assert all(float(r[3]) > 0 for r in rows)  # images/s measured in every cell
