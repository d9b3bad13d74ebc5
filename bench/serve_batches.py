"""Serving at request batch sizes 1/8/32/64: in-process ONNX Runtime vs the service.

    python bench/serve_batches.py --provider cuda                  # the GPU run (ResNet-50)
    python bench/serve_batches.py --model resnet --size 32 --batch-sizes 1,8 --seconds 1

For each request batch size and concurrency, one run measures:

* in-process: the service's own :class:`~service.runtime.sessions.ModelSession` on the
  same provider (IOBinding on CUDA), called from ``concurrency`` threads - the best a
  caller linking ONNX Runtime directly gets;
* the service over HTTP with the binary tensor extension (uvicorn subprocess, the real v2
  router and ``ServingRuntime``, dynamic batching on, ``max_batch_size`` = the largest
  request batch, drift taps on ``--drift`` of the batches).

Cells run in rotated order over ``--rounds`` rounds; the table gives medians of images per
second, request p50/p99 latency, and throughput relative to in-process at the same batch
size and concurrency in the same round. Device, driver and library versions are printed
with it (docs/benchmarks.md records them with every GPU number).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_speed import (  # noqa: E402
    Result,
    Server,
    add_server_arguments,
    over_http,
    run_threads,
)


def export_model(kind: str, size: int, path: Path) -> None:
    """ResNet-50 (``resnet50``) or the small ResNet-ish CNN (``resnet``), random weights,
    exported with BN kept and a dynamic batch axis."""
    import torch
    from bench_models import resnet, resnet50

    from recalib.onnx.export import export_onnx

    torch.manual_seed(0)
    model = resnet50() if kind == "resnet50" else resnet([(32, 32, 1), (32, 64, 2), (64, 128, 2)])
    export_onnx(model.eval(), torch.zeros(2, 3, size, size), path)


def in_process(session: Any, x: np.ndarray, concurrency: int, seconds: float) -> Result:
    """``session.run`` from ``concurrency`` threads for ``seconds`` (after 5 warm-up runs)."""
    feed = {session.inputs[0].name: x}
    for _ in range(5):
        session.run(feed)
    return run_threads(lambda: session.run(feed), concurrency, seconds)


def describe(provider: str) -> str:
    """Device, driver and library versions of this run."""
    import onnxruntime as ort

    parts = [f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if provider == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            parts.append(f"{props.name}, CUDA {torch.version.cuda}")
            parts.append(f"cuDNN {torch.backends.cudnn.version()}")  # type: ignore[no-untyped-call]
    except ImportError:
        pass
    if provider == "cuda":
        try:
            import subprocess

            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            parts.append(f"nvidia-smi: {smi.stdout.strip()}")
        except OSError:
            parts.append("nvidia-smi: not found")
    parts.append(f"{platform.machine()}, {os.cpu_count()} CPUs")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet50", "resnet"), default="resnet50")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drift", type=float, default=0.1, help="drift_sample_fraction")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms")
    parser.add_argument("--threads", type=int, default=0, help="intra_op_threads (0: ORT's)")
    add_server_arguments(parser)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    args.max_batch = max(sizes)

    import warnings

    warnings.filterwarnings("ignore")
    from service.runtime.sessions import create_session
    from service.settings import Settings

    model = Path(tempfile.mkdtemp(prefix="serve_batches_")) / f"{args.model}.onnx"
    export_model(args.model, args.size, model)
    settings = Settings(
        execution_provider=args.provider,
        provider_fallback="fail",
        intra_op_threads=args.threads,
    )
    session = create_session(model, settings, label=args.model)
    print(f"in-process session on {session.provider} (IOBinding: {session.uses_binding})")
    rng = np.random.default_rng(0)
    inputs = {
        b: rng.standard_normal((b, 3, args.size, args.size)).astype(np.float32) for b in sizes
    }
    server = Server(model, batching=True, args=args, startup=300.0)
    cells = [(b, c, where) for b in sizes for c in concurrency for where in ("in-process", "HTTP")]
    runs: dict[tuple[int, int, str], list[Result]] = {cell: [] for cell in cells}
    try:
        for k in range(args.rounds):
            order = cells[k % len(cells) :] + cells[: k % len(cells)]
            for b, c, where in order:
                if where == "in-process":
                    result = in_process(session, inputs[b], c, args.seconds)
                else:
                    result = over_http(server.port, inputs[b], True, c, args.seconds)
                runs[(b, c, where)].append(result)
    finally:
        server.close()

    print(
        f"\nmodel {args.model} 3x{args.size}x{args.size}, provider {args.provider}, "
        f"{args.seconds:g} s per cell, median of {args.rounds} rounds, HTTP binary with "
        f"dynamic batching (max_batch_size {args.max_batch}, max_queue_delay_ms "
        f"{args.delay_ms:g}), drift_sample_fraction={args.drift}\n{describe(args.provider)}"
    )
    header = (
        f"{'batch':>5} {'conc':>4} {'setup':<11} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x in-proc':>9}"
    )
    print(header)
    print("-" * len(header))
    for b, c, where in cells:
        rs, base = runs[(b, c, where)], runs[(b, c, "in-process")]
        ratio = np.median([r.throughput / q.throughput for r, q in zip(rs, base, strict=True)])
        images = np.median([r.throughput for r in rs]) * b
        p50, p99 = (np.median([r.pct(q) for r in rs]) for q in (50, 99))
        print(f"{b:>5} {c:>4} {where:<11} {images:>9.0f} {p50:>8.2f} {p99:>8.2f} {ratio:>9.2f}")


if __name__ == "__main__":
    main()
