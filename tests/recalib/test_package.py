"""The package's import surface: every public name resolves to what ``__all__`` promises,
however submodules were imported before, and the torch-free parts load without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_functions_named_like_their_submodules_stay_functions() -> None:
    out = _run(
        """
        import recalib.recalibrate, recalib.adapt  # the submodules first
        import recalib
        from recalib import adapt, recalibrate
        assert callable(recalib.recalibrate) and recalibrate is recalib.recalibrate
        assert callable(recalib.adapt) and adapt is recalib.adapt
        missing = [n for n in recalib.__all__ if not hasattr(recalib, n)]
        assert not missing, missing
        print("ok")
        """
    )
    assert out == "ok"


def test_serving_parts_import_without_torch() -> None:
    out = _run(
        """
        import sys
        import recalib.drift, recalib.errors, recalib.onnx.names, recalib.onnx.taps
        import recalib.options
        print("torch" in sys.modules)
        """
    )
    assert out == "False"
