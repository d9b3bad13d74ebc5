"""bench/bank_quality.py still runs end to end on a real pretrained network (tiny sizes).

The PaddleOCR text-line classifier ships in ``rapidocr-onnxruntime``, a dev dependency (its
own dependencies bring cv2, which realsuite's preprocessing uses); the rendered data goes
to a temporary cache. Numbers are not checked: only that every table has its rows (the
per-bank route limit tables too).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from bench_helpers import run_script

pytestmark = pytest.mark.slow


def test_bank_quality_prints_every_table_for_both_plans(tmp_path: Path) -> None:
    if importlib.util.find_spec("rapidocr_onnxruntime") is None:
        pytest.fail("rapidocr-onnxruntime (a dev dependency) is not installed")
    out = run_script(
        "bank_quality.py",
        *("--model", "textline", "--n-calib", "8", "--n-test", "4", "--domains", "clean,dark"),
        *("--bankless", "texture", "--plans", "auto,full", "--route-layers", "1,2"),
        env={"RECALIB_REALSUITE_CACHE": str(tmp_path)},
    )
    lines = out.splitlines()
    assert any(li.startswith("  route_layers=1: ok") for li in lines)
    assert any(li.startswith("  route_layers=2: refused") for li in lines)  # one stem BN
    for plan in ("auto", "full"):
        start = lines.index(
            next(li for li in lines if li.startswith(f"== textline_cls, plan={plan}: accuracy"))
        )
        table = [li.split() for li in lines[start + 2 : start + 9]]
        names = [row[0] for row in table]
        assert names == ["clean", "dark*", "texture*", "tuning", "held-out*", "ALL", "bankless"]
        assert all(len(row) >= 9 for row in table)
        verdicts = [li for li in lines if li.startswith("  [") and "] " in li]
        assert len(verdicts) == 8  # four targets per plan, met or not
    assert sum("explicit vs separate model:" in li for li in lines) == 2
    assert sum(li.startswith("  wrong-routed banked rows:") for li in lines) == 2
    assert sum("threshold sweep" in li for li in lines) == 2
    # per-bank route limits: each plan's group table, then one summary line per plan
    for plan in ("auto", "full"):
        start = lines.index(
            next(li for li in lines if li.startswith(f"== textline_cls, plan={plan}: per-bank"))
        )
        groups = [li.split()[0] for li in lines[start + 3 : start + 12] if li.startswith("  ")]
        assert "bankless" in groups and "ALL" in groups, lines[start : start + 12]
    start = lines.index(next(li for li in lines if "per-bank route limits, summary" in li))
    assert [li.split()[0] for li in lines[start + 2 : start + 4]] == ["auto", "full"]
