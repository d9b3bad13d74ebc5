"""Recalibration speed on CPU, measured side by side in one run.

    python bench/recalib_speed.py [--batches 20] [--batch-size 32] [--repeats 3]

Compares, on the same model and the same data: a plain eval forward pass over the data,
``torch.optim.swa_utils.update_bn``, ``recalibrate(method="exact", mode="train")`` and
``recalibrate(mode="eval")`` to convergence. Each is repeated, interleaved, and the median
is reported with its ratio to update_bn and to the plain forward.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from bench_models import resnet
from torch import nn
from torch.optim.swa_utils import update_bn

from recalib import recalibrate


def resnet_small() -> nn.Module:
    """A ResNet-18-shaped network at width 32 for 64x64 inputs (20 BN layers)."""
    return resnet(
        [
            (32, 32, 1),
            (32, 32, 1),
            (32, 64, 2),
            (64, 64, 1),
            (64, 128, 2),
            (128, 128, 1),
            (128, 256, 2),
            (256, 256, 1),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet_small()
    data = [torch.randn(args.batch_size, 3, args.size, args.size) for _ in range(args.batches)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    passes: dict[str, int] = {}

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            for x in data:
                model(x)

    def swa_update_bn() -> None:
        update_bn(data, model)

    def exact_train() -> None:
        recalibrate(model, data, method="exact", mode="train")

    def eval_fixed_point() -> None:
        r = recalibrate(model, data, method="exact", mode="eval", tol=1e-3)
        passes["eval"] = r.passes

    cases: dict[str, Callable[[], None]] = {
        "eval forward": forward,
        "update_bn": swa_update_bn,
        "exact/train": exact_train,
        "exact/eval (to tol 1e-3)": eval_fixed_point,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    forward()  # warm-up (allocator, oneDNN primitives)
    for _ in range(args.repeats):
        for name, fn in cases.items():
            model.load_state_dict(state)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"model: ResNet-18-shaped width 32, {n_bn} BN layers; data: {args.batches} batches "
        f"x {args.batch_size} x 3x{args.size}x{args.size}; median of {args.repeats}\n"
    )
    print(f"{'case':28}{'seconds':>10}{'vs update_bn':>14}{'vs forward':>12}")
    for name, t in med.items():
        print(f"{name:28}{t:>10.3f}{t / med['update_bn']:>14.2f}{t / med['eval forward']:>12.2f}")
    print(
        f"\nexact/eval used {passes.get('eval')} passes "
        f"({med['exact/eval (to tol 1e-3)'] / passes.get('eval', 1) / med['eval forward']:.2f}x "
        "forward per pass)"
    )


if __name__ == "__main__":
    main()
