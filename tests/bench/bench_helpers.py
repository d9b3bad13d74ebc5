"""Running a ``bench/`` script as the benchmark docs do, for the smoke tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ROOT", "run_script"]

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str, env: Mapping[str, str] | None = None) -> str:
    """``python <args>`` in ``bench/`` with the repository importable (and ``env`` added
    to the environment); its stdout, after asserting it exited 0."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **(env or {})}
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT / "bench",
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
