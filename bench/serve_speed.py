"""Serving overhead: in-process ONNX Runtime vs the service over HTTP, same model and load.

One run measures, for batch-1 requests:

* in-process ORT (``session.run`` in 1 or 16 threads, default session options);
* the service (uvicorn in a subprocess, the real v2 router and ``ServingRuntime``, a
  one-model registry) over HTTP with JSON and with the binary tensor extension, at
  concurrency 1 and 16, dynamic batching off and on.

The client is a minimal asyncio HTTP/1.1 load generator (keep-alive connections,
pre-encoded requests, closed loop), so it costs the shared CPU as little as possible. Each
cell runs for ``--seconds`` after a warm-up, in ``--rounds`` rounds (order rotated); the
table gives medians over rounds of throughput, p50/p99 latency, throughput relative to
in-process ORT at the same concurrency in the same round, and the p50 latency added over
in-process ORT at concurrency 1 in the same round (pairing runs measured moments apart
keeps the ratios steady when other work shares the machine).

Models: ``resnet`` (ResNet-ish CNN, 9 BN layers, 3x32x32, a few ms per batch-1 run on a
CPU core) and ``demo`` (the bundled demo CNN, 3x16x16, ~0.05 ms: pure HTTP overhead).
Drift monitoring runs as the settings say (default: every batch tapped); ``--drift``
changes the fraction.

Run: ``python bench/serve_speed.py [--model resnet|demo] [--seconds 3] [--drift 1.0]``.
Targets on CPU: binary + dynamic batching >= 0.6x in-process throughput at concurrency
16; p50 latency added at concurrency 1 <= 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_NAME = "bench"


# -- models ----------------------------------------------------------------------------


def _export(kind: str, path: Path) -> tuple[int, ...]:
    """Write the benchmark model to ``path``; returns its per-row input shape."""
    import torch

    from recalib.onnx.export import export_onnx

    if kind == "demo":
        program = torch.export.load(str(ROOT / "recalib/demo_assets/demo_model.pt2"))
        export_onnx(program, torch.zeros(2, 3, 16, 16), path)
        return (3, 16, 16)

    from bench_models import resnet  # the same ResNet-ish network as taps_overhead.py

    torch.manual_seed(0)
    model = resnet([(32, 32, 1), (32, 64, 2), (64, 128, 2)]).eval()
    export_onnx(model, torch.zeros(2, 3, 32, 32), path)
    return (3, 32, 32)


# -- the server (subprocess) -----------------------------------------------------------


def _serve(args: argparse.Namespace) -> None:
    """Subprocess entry: uvicorn with the v2 router, one model, the given settings."""
    import uvicorn
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry

    from service.api import metrics_route, v2
    from service.dataplane import DataPlane
    from service.errors import install_error_handlers
    from service.metrics import ServiceMetrics
    from service.runtime.runtime import ServingRuntime
    from service.settings import Settings

    path = Path(args.serve)
    settings = Settings(
        home=Path(tempfile.mkdtemp()),
        execution_provider=args.provider,
        provider_fallback="fail",  # a benchmark must not measure a silent CPU fallback
        dynamic_batching=args.batching == "on",
        drift_sample_fraction=args.drift,
        max_queue_delay_ms=args.delay_ms,
        intra_op_threads=args.threads,
        max_batch_size=args.max_batch,
        warmup_batch_sizes=sorted({1, 8, 32, args.max_batch}),
        max_request_bytes=1 << 30,
    )

    class OneModel:
        def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
            from service.errors import NotFound

            if name != MODEL_NAME or ref not in (None, "1"):
                raise NotFound(f"model {name!r} version {ref} not found")
            return 1, path

        def model_names(self) -> list[str]:
            return [MODEL_NAME]

    metrics = ServiceMetrics(CollectorRegistry())
    runtime = ServingRuntime(settings, metrics)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        await runtime.start()
        await runtime.serve(MODEL_NAME, 1, path)
        yield
        await runtime.close()

    app = FastAPI(lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = OneModel()
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.dataplane = DataPlane(settings, app.state.registry, runtime, metrics)
    install_error_handlers(app)
    app.include_router(v2.router)
    app.include_router(metrics_route.router)
    try:  # the control plane's body-size middleware, as in the real app
        from service.app import BodyLimit

        app.add_middleware(
            BodyLimit,
            upload_bytes=settings.max_upload_bytes,
            request_bytes=settings.max_request_bytes,
        )
    except ImportError:
        pass
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Settings of the service process that other benchmarks change too."""
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-batch", type=int, default=32, help="max_batch_size")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """The service in a subprocess, ready when ``/v2/health/ready`` says so."""

    def __init__(
        self, model: Path, *, batching: bool, args: argparse.Namespace, startup: float = 60.0
    ) -> None:
        self.port = _free_port()
        cmd = [
            sys.executable,
            __file__,
            "--serve",
            str(model),
            "--port",
            str(self.port),
            "--batching",
            "on" if batching else "off",
            "--drift",
            str(args.drift),
            "--delay-ms",
            str(args.delay_ms),
            "--threads",
            str(args.threads),
            "--provider",
            args.provider,
            "--max-batch",
            str(args.max_batch),
        ]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": path})
        deadline = time.monotonic() + startup
        url = f"http://127.0.0.1:{self.port}/v2/models/{MODEL_NAME}/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200 and json.loads(r.read()).get("ready") is True:
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("the service did not start")
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- load generators -------------------------------------------------------------------


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3


def run_threads(call: Callable[[], object], concurrency: int, seconds: float) -> Result:
    """``call()`` in a closed loop from ``concurrency`` threads for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    def worker(out: list[float]) -> None:
        while (t0 := time.perf_counter()) <= stop:
            call()
            out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(lat,)) for lat in latencies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = [v for lat in latencies for v in lat]
    return Result(len(flat), elapsed, flat)


def in_process(model: Path, x: np.ndarray, concurrency: int, seconds: float) -> Result:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, {"input": x})
    return run_threads(lambda: session.run(None, {"input": x}), concurrency, seconds)


def _http_request(port: int, x: np.ndarray, binary: bool) -> bytes:
    from service.api.v2_codec import HEADER_LENGTH, encode_request

    body, header = encode_request({"input": x}, binary=binary, binary_output=binary)
    lines = [
        f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: {'application/octet-stream' if binary else 'application/json'}",
        f"Content-Length: {len(body)}",
    ]
    if header is not None:
        lines.append(f"{HEADER_LENGTH}: {header}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _http_worker(port: int, request: bytes, stop: float, out: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            t0 = time.perf_counter()
            if t0 > stop:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")
            out.append(time.perf_counter() - t0)
    finally:
        writer.close()


def over_http(port: int, x: np.ndarray, binary: bool, concurrency: int, seconds: float) -> Result:
    request = _http_request(port, x, binary)

    async def run(duration: float) -> Result:
        latencies: list[list[float]] = [[] for _ in range(concurrency)]
        start = time.perf_counter()
        stop = start + duration
        await asyncio.gather(*(_http_worker(port, request, stop, lat) for lat in latencies))
        elapsed = time.perf_counter() - start
        flat = [v for lat in latencies for v in lat]
        return Result(len(flat), elapsed, flat)

    asyncio.run(run(min(0.5, seconds / 4)))  # warm-up: connections, batch shapes
    return asyncio.run(run(seconds))


# -- main ------------------------------------------------------------------------------


def _backends() -> str:
    """The optional speed-ups the service process will find (uvicorn picks httptools and
    uvloop on its own when they are installed; the codec uses orjson)."""
    import importlib.util

    found = {
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "json": "orjson" if importlib.util.find_spec("orjson") else "json",
    }
    return ", ".join(f"{k} {v}" for k, v in found.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet", "demo"), default="resnet")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    parser.add_argument("--drift", type=float, default=1.0, help="drift_sample_fraction")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms")
    parser.add_argument("--threads", type=int, default=0, help="intra_op_threads (0: ORT's)")
    add_server_arguments(parser)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batching", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.serve:
        _serve(args)
        return

    import warnings

    warnings.filterwarnings("ignore")
    workdir = Path(tempfile.mkdtemp(prefix="serve_speed_"))
    model = workdir / f"{args.model}.onnx"
    shape = _export(args.model, model)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    servers = {batching: Server(model, batching=batching, args=args) for batching in (False, True)}
    cells: list[tuple[str, bool | None, bool, int]] = [
        ("in-process ORT", None, True, c) for c in (1, 16)
    ]
    for batching in (False, True):
        for binary in (False, True):
            label = (
                f"HTTP {'binary' if binary else 'JSON  '} batching {'on ' if batching else 'off'}"
            )
            cells += [(label, batching, binary, c) for c in (1, 16)]
    runs: dict[int, list[Result]] = {i: [] for i in range(len(cells))}
    try:
        for k in range(args.rounds):  # rounds in rotated order: noise spreads over cells
            order = list(range(len(cells)))
            order = order[k % len(order) :] + order[: k % len(order)]
            for i in order:
                _, gather, binary, c = cells[i]
                if gather is None:
                    runs[i].append(in_process(model, x, c, args.seconds))
                else:
                    runs[i].append(over_http(servers[gather].port, x, binary, c, args.seconds))
    finally:
        for server in servers.values():
            server.close()
    # Ratios pair each run with the in-process run of the same round (measured moments
    # apart), so slow changes in background load cancel; medians over rounds.
    base_cell = {1: 0, 16: 1}
    rows: list[dict[str, Any]] = []
    for i, (setup, _, _, conc) in enumerate(cells):
        rs, bs, b1 = runs[i], runs[base_cell[conc]], runs[base_cell[1]]
        ratios = [r.throughput / b.throughput for r, b in zip(rs, bs, strict=True)]
        added = [r.pct(50) - b.pct(50) for r, b in zip(rs, b1, strict=True)]
        rows.append(
            {
                "setup": setup,
                "concurrency": conc,
                "throughput": float(np.median([r.throughput for r in rs])),
                "p50_ms": float(np.median([r.pct(50) for r in rs])),
                "p99_ms": float(np.median([r.pct(99) for r in rs])),
                "ratio": float(np.median(ratios)),
                "added_p50_ms": float(np.median(added)),
            }
        )

    print(
        f"\nmodel {args.model} (input {list(shape)}), batch-1 requests, {args.seconds:g} s per "
        f"cell, median of {args.rounds} rounds, drift_sample_fraction={args.drift}, "
        f"max_queue_delay_ms={args.delay_ms}, intra_op_threads={args.threads}, "
        f"{os.cpu_count()} CPUs; {_backends()}"
    )
    header = (
        f"{'setup':<28} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x in-proc':>9} {'+p50 ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['setup']:<28} {row['concurrency']:>4} {row['throughput']:>8.0f} "
            f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['ratio']:>9.2f} "
            f"{row['added_p50_ms']:>8.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
