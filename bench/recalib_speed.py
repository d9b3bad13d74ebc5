"""Recalibration speed, measured side by side in one run (CPU or CUDA).

    python bench/recalib_speed.py [--batches 20] [--batch-size 32] [--repeats 3]
    python bench/recalib_speed.py --model resnet50 --device cuda --size 224 \
        --batch-size 64 --batches 20 --verify 4          # the GPU run of docs/benchmarks.md
    python bench/recalib_speed.py --model tv:densenet121 --size 112 --batches 4
    python bench/recalib_speed.py --model timm:resnet18d --size 112 --batches 4

``--model`` is ``small`` (a ResNet-18-shaped network at width 32), ``resnet50`` (its
shape, no dependency), ``tv:NAME`` (a torchvision model: ``resnet50``,
``mobilenet_v3_large``, ``densenet121``, ``googlenet`` ...) or ``timm:NAME`` (a timm model,
e.g. ``efficientnet_b0`` with its ``BatchNormAct2d`` layers); all with random weights.

Compares, on the same model and the same data: a plain eval forward pass over the data,
``torch.optim.swa_utils.update_bn``, ``recalibrate(method="exact", mode="train")`` and
``recalibrate(mode="eval")`` to convergence. Each is repeated, interleaved, and the median
is reported with its ratio to update_bn and to the plain forward. On CUDA the data is
placed on the GPU first and each case ends with ``torch.cuda.synchronize()``.

``--verify N`` also recalibrates (exact/train) on the first N batches on the device and on
the CPU from the same weights, and prints the largest difference between the two sets of
statistics: mean differences in units of the CPU standard deviation, variances relative.
On CUDA it does so twice: with cuDNN's default TF32 convolutions and with TF32 off.
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
from collections.abc import Callable
from typing import Any

import torch
from bench_models import resnet, resnet50
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
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


def _torchvision_models() -> Any:
    try:
        return importlib.import_module("torchvision.models")
    except RuntimeError as exc:
        # A torchvision wheel for another torch variant cannot register its C++ operators'
        # fake kernels; the model definitions themselves are pure Python.
        if "torchvision::" not in str(exc):
            raise
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
    return importlib.import_module("torchvision.models")


def build_model(name: str) -> nn.Module:
    """``small``, ``resnet50``, ``tv:NAME`` (torchvision) or ``timm:NAME``, random weights."""
    if name == "small":
        return resnet_small()
    if name == "resnet50":
        return resnet50()
    source, _, arch = name.partition(":")
    if source == "tv":
        kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
        model: nn.Module = getattr(_torchvision_models(), arch)(weights=None, **kwargs)
        return model
    if source == "timm":
        _torchvision_models()  # timm imports torchvision
        timm = importlib.import_module("timm")
        model = timm.create_model(arch, pretrained=False)
        return model
    raise SystemExit(f"expected --model small, resnet50, tv:NAME or timm:NAME (got {name!r})")


def _stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.running_mean.double().cpu(), m.running_var.double().cpu())
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def _largest_difference(
    got: dict[str, tuple[torch.Tensor, torch.Tensor]],
    want: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[float, float]:
    """Largest |mean difference| / CPU std and |variance difference| / CPU variance."""
    dm = dv = 0.0
    for name, (wm, wv) in want.items():
        gm, gv = got[name]
        std = wv.clamp_min(1e-12).sqrt()
        dm = max(dm, float(((gm - wm).abs() / std).max()))
        dv = max(dv, float(((gv - wv).abs() / wv.clamp_min(1e-12)).max()))
    return dm, dv


def verify(
    model: nn.Module, data: list[torch.Tensor], device: torch.device, n: int
) -> list[tuple[str, float, float]]:
    """exact/train statistics on ``device`` vs on the CPU, from the same weights."""
    state = copy.deepcopy(model.state_dict())
    cpu_model = copy.deepcopy(model).cpu()
    cpu_model.load_state_dict(state)
    recalibrate(cpu_model, [x.cpu() for x in data[:n]], method="exact", mode="train")
    want = _stats(cpu_model)
    rows: list[tuple[str, float, float]] = []
    settings: list[tuple[str, bool | None]] = [("default", None)]
    if device.type == "cuda":
        settings = [("TF32 (cuDNN default)", True), ("TF32 off", False)]
    for label, tf32 in settings:
        model.load_state_dict(state)
        if tf32 is None:
            recalibrate(model, data[:n], method="exact", mode="train")
        else:
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
                recalibrate(model, data[:n], method="exact", mode="train")
        rows.append((label, *_largest_difference(_stats(model), want)))
    model.load_state_dict(state)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", help="small, resnet50, tv:NAME or timm:NAME")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--verify", type=int, default=0, metavar="N", help="compare stats vs CPU")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-passes", type=int, default=10, help="of mode='eval'")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time (steadier on a shared machine; CPU only)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model).to(device)
    data = [
        torch.randn(args.batch_size, 3, args.size, args.size, device=device)
        for _ in range(args.batches)
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    passes: dict[str, int] = {}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

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
        r = recalibrate(
            model, data, method="exact", mode="eval", tol=1e-3, max_passes=args.max_passes
        )
        passes["eval"] = r.passes

    cases: dict[str, Callable[[], None]] = {
        "eval forward": forward,
        "update_bn": swa_update_bn,
        "exact/train": exact_train,
        "exact/eval (to tol 1e-3)": eval_fixed_point,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    forward()  # warm-up (allocator, oneDNN primitives / cuDNN algorithm choice)
    swa_update_bn()
    model.load_state_dict(state)
    sync()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            model.load_state_dict(state)
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_bn = len(_stats(model))
    where = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory >> 30} GiB), CUDA {torch.version.cuda}"
        where += f", cuDNN {torch.backends.cudnn.version()}"  # type: ignore[no-untyped-call]
    print(f"machine: {where}, torch {torch.__version__}, {args.clock} clock")
    shapes = {"resnet50": "ResNet-50", "small": "ResNet-18-shaped width 32"}
    shape = shapes.get(args.model, args.model)
    print(
        f"model: {shape}, {n_bn} BN layers; data: {args.batches} batches "
        f"x {args.batch_size} x 3x{args.size}x{args.size} on {device}; median of "
        f"{args.repeats}\n"
    )
    print(f"{'case':28}{'seconds':>10}{'vs update_bn':>14}{'vs forward':>12}")
    for name, t in med.items():
        print(f"{name:28}{t:>10.3f}{t / med['update_bn']:>14.2f}{t / med['eval forward']:>12.2f}")
    per_pass = med["exact/eval (to tol 1e-3)"] / passes.get("eval", 1)
    print(
        f"\nexact/eval used {passes.get('eval')} passes (max {args.max_passes}): "
        f"{per_pass / med['eval forward']:.2f}x forward and "
        f"{per_pass / med['exact/train']:.2f}x exact/train per pass"
    )
    if args.verify:
        print(f"\nstatistics on {device} vs CPU (exact/train, first {args.verify} batches)")
        print(f"{'convolutions':24}{'max |dmean|/std':>18}{'max |dvar|/var':>16}")
        for label, dm, dv in verify(model, data, device, args.verify):
            print(f"{label:24}{dm:>18.2e}{dv:>16.2e}")


if __name__ == "__main__":
    main()
