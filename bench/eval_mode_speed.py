"""``mode="eval"`` (lockstep pass + checking pass) against ``mode="train"``, per batch size.

    python bench/eval_mode_speed.py                       # ResNet-50 shape, 112x112, 64 items
    python bench/eval_mode_speed.py --size 224 --items 64 --batch-sizes 1 4 64
    python bench/eval_mode_speed.py --model tv:efficientnet_b0 --plain   # + the old passes

For each batch size: the seconds of ``recalibrate(mode="train")`` and of
``recalibrate(mode="eval")`` to ``tol`` on the same data and weights (random), their
ratio, the eval passes, whether it converged, and the largest difference of its
statistics from the eval result at the largest batch size (means in standard deviations,
variances relative). ``--plain`` adds eval mode without the lockstep pass (``anchor=0``,
ordinary passes only, ``allow_unconverged=True``) to show what it replaces. Each case runs
``--repeats`` times and the median is reported.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import platform
import statistics
import sys
import time
import types
from typing import Any

import torch
from bench_models import resnet50
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from recalib import DivergedError, recalibrate

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def build(name: str) -> nn.Module:
    """``resnet50`` (bench_models) or ``tv:NAME`` (torchvision, random weights)."""
    if name == "resnet50":
        return resnet50()
    source, _, arch = name.partition(":")
    if source != "tv":
        raise SystemExit(f"expected --model resnet50 or tv:NAME (got {name!r})")
    try:
        models = importlib.import_module("torchvision.models")
    except RuntimeError:  # a torchvision built for another torch: skip its C++ op kernels
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        models = importlib.import_module("torchvision.models")
    model: nn.Module = getattr(models, arch)(weights=None)
    return model


def stats_of(model: nn.Module) -> Stats:
    return {
        n: (m.running_mean.double().clone(), m.running_var.double().clone())
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def difference(got: Stats, want: Stats) -> float:
    worst = 0.0
    for name, (wm, wv) in want.items():
        gm, gv = got[name]
        sd = wv.clamp_min(1e-12).sqrt()
        worst = max(worst, float(((gm - wm).abs() / sd).max()))
        worst = max(worst, float(((gv - wv).abs() / wv.clamp_min(1e-12)).max()))
    return worst


def timed(
    model: nn.Module, data: torch.Tensor, repeats: int, **kwargs: Any
) -> tuple[float, Any, Stats]:
    times, report, result = [], None, None
    for _ in range(repeats):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = recalibrate(m, data, **kwargs)
        times.append(time.perf_counter() - t0)
        result = stats_of(m)
    if result is None:
        raise SystemExit("expected --repeats >= 1")
    return statistics.median(times), report, result


def plain(model: nn.Module, data: torch.Tensor, bs: int, tol: float, train_s: float) -> list[Any]:
    """Eval mode by ordinary passes only (what the lockstep pass replaced)."""
    t0 = time.perf_counter()
    try:
        rep = recalibrate(
            copy.deepcopy(model),
            data,
            mode="eval",
            batch_size=bs,
            tol=tol,
            anchor=0,
            allow_unconverged=True,
        )
    except DivergedError as exc:
        return [(time.perf_counter() - t0) / train_s, exc.passes, "diverged", float("nan")]
    return [(time.perf_counter() - t0) / train_s, rep.passes, rep.converged, rep.residual]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 64])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--plain", action="store_true", help="also eval mode without the lockstep")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.model).eval()
    data = torch.randn(args.items, 3, args.size, args.size) * 1.5 + 0.3
    layers = sum(isinstance(m, _BatchNorm) for m in model.modules())
    print(
        f"# {args.model}, {layers} BN layers, {args.items} items of {args.size}x{args.size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    rows = []
    evals: dict[int, Stats] = {}
    for bs in args.batch_sizes:
        train_s, _, _ = timed(model, data, args.repeats, mode="train", batch_size=bs)
        eval_s, rep, evals[bs] = timed(
            model, data, args.repeats, mode="eval", batch_size=bs, tol=args.tol
        )
        row = [bs, train_s, eval_s, eval_s / train_s, rep.passes, rep.converged, rep.residual]
        if args.plain:
            row += plain(model, data, bs, args.tol, train_s)
        rows.append(row)
    ref = evals[max(args.batch_sizes)]
    head = (
        "| batch | train s | eval s | eval/train | passes | converged | residual "
        "| diff vs largest batch |"
    )
    if args.plain:
        head += " plain/train | plain passes | plain converged | plain residual |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        bs, tr, ev, ratio, passes, conv, res = row[:7]
        line = (
            f"| {bs} | {tr:.2f} | {ev:.2f} | {ratio:.2f} | {passes} | {conv} | {res:.1e} | "
            f"{difference(evals[bs], ref):.1e} |"
        )
        if args.plain:
            pr, pp, pc, pres = row[7:]
            line += f" {pr:.2f} | {pp} | {pc} | {pres:.1e} |"
        print(line)


if __name__ == "__main__":
    main()
