"""Stat banks through the service: 1,000 banks on one model against one, over REST, one run.

One recalib server (the production app, ``create_app(Settings())`` from ``RECALIB_*``,
uvicorn, control role, dynamic batching on, drift sampling at its default) holds the same
ONNX model twice: ``one`` with a single bank and ``many`` with ``--banks`` banks, each
``PUT /v1/models/{name}/banks/{bank}`` as a user would. Batch-1 REST binary requests,
closed loop at concurrency 1 and 16, in ``--rounds`` rounds in rotated order, of:

* ``no bank``: the version's own statistics (the plain, fused session);
* ``one`` bank, explicit (``parameters.bank``: the reference of the 1,000-bank target);
* ``many``: a random explicit bank per request (64 pre-encoded requests cycled), the same
  bank every request (what switching costs), and ``"auto"`` (routing in the same run).

Columns: req/s, p50/p99 ms, server CPU ms per request (utime + stime of the server over
the cell) and the ratios the issue names, from medians over rounds. RSS: the server's
``VmRSS`` before the banks of ``many`` are put and after every cell has run, against the
banks' own bytes (the files' tables: float32 mean + var per channel per layer).

Run: ``python bench/bank_serving.py [--model resnet] [--banks 1000] [--seconds 2]
[--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import data_plane as dp
import numpy as np

MODELS = ("one", "many")


def _send(server: dp.Server, method: str, path: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(
        server.url(path), data=body, headers={"Content-Type": content_type}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:300]!r}") from None


def _multipart(fields: dict[str, str], file_name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _wait_live(server: dp.Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dp._get(server.url("/v2/health/live")) != 200:
        if server.proc is None or server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not live after {timeout:.0f} s: {server.tail()}")
        time.sleep(0.1)


def _bank_files(model: Path, count: int, workdir: Path) -> tuple[list[Path], int]:
    """``count`` bank files of ``model`` (seeded random statistics around the model's own)
    and the bytes of one bank's statistics."""
    import onnx
    import stat_banks

    from recalib.onnx.bank_files import save_onnx_bank
    from recalib.onnx.names import bn_node_stats

    proto = onnx.load(str(model))
    source = {
        k: (m.astype(np.float64), v.astype(np.float64))
        for k, (m, v) in bn_node_stats(proto).items()
    }
    folder = workdir / "banks"
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"b{i}.safetensors"
        save_onnx_bank(proto, stat_banks.random_bank(source, i), path)
        paths.append(path)
    per_bank = sum(2 * 4 * m.size for m, _ in source.values())
    return paths, per_bank


def _put_bank(server: dp.Server, model: str, bank: str, path: Path) -> None:
    body, kind = _multipart({}, "bank.safetensors", path.read_bytes())
    _send(server, "PUT", f"/v1/models/{model}/banks/{bank}", body, kind)


def _request(port: int, model: str, x: np.ndarray, bank: str | None) -> bytes:
    import orjson

    obj: dict[str, Any] = {
        "inputs": [
            {
                "name": dp.INPUT_NAME,
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "parameters": {"binary_data_output": True} | ({} if bank is None else {"bank": bank}),
    }
    header = orjson.dumps(obj)
    body = header + np.ascontiguousarray(x, dtype="<f4").tobytes()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {len(header)}\r\n\r\n"
    )
    return head.encode() + body


def _check(server: dp.Server, model: str, x: np.ndarray, bank: str) -> dict[str, Any]:
    """One JSON request with ``bank``: the response's parameters (it must name a bank)."""
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": dp.INPUT_NAME,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ],
            "parameters": {"bank": bank},
        }
    ).encode()
    request = urllib.request.Request(
        server.url(f"/v2/models/{model}/infer"),
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{model}: bank {bank!r}: {exc.code} {exc.read()[:300]!r}") from None
    params: dict[str, Any] = answer.get("parameters") or {}
    if "bank" not in params:
        raise RuntimeError(f"{model}: a request with bank {bank!r} got no bank back: {answer}")
    return params


def _cell(
    server: dp.Server, requests: Sequence[bytes], concurrency: int, seconds: float
) -> dp.Cell:
    async def worker(stop: float, out: list[float], i: int) -> None:
        # each connection cycles through the requests from its own offset
        await dp._http_worker(server.port, requests, stop, out, offset=i)

    async def loop(s: float) -> tuple[int, float, list[float]]:
        lat: list[list[float]] = [[] for _ in range(concurrency)]
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + s, lat[i], i * 7) for i in range(concurrency)))
        flat = [v for part in lat for v in part]
        return len(flat), time.perf_counter() - start, flat

    return dp._measure(lambda s: asyncio.run(loop(s)), server.pid, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="resnet", help="resnet or demo (serve_speed's), or a FILE.onnx"
    )
    parser.add_argument("--banks", type=int, default=1000, help="banks of the 'many' model")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per cell")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, rotated order")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--drift", type=float, default=0.1, help="RECALIB_DRIFT_SAMPLE_FRACTION")
    args = parser.parse_args()
    if args.banks < 2:
        parser.error(f"expected --banks >= 2 (got {args.banks})")
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bank-serving-") as tmp:
        workdir = Path(tmp)
        if args.model.endswith(".onnx"):  # a given model: one FP32 input "input", batch first
            model = Path(args.model).resolve()
            shape = tuple(int(d) for d in dp.ort_session(str(model), 1).get_inputs()[0].shape[1:])
        else:
            model = workdir / "model.onnx"
            shape = dp._export(args.model, model)
        x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
        paths, per_bank = _bank_files(model, args.banks, workdir)
        path = os.pathsep.join(p for p in (str(dp.ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        server = dp.Server(
            "recalib", [sys.executable, dp.__file__, "--recalib-server"], env, workdir
        )
        server.env.update(
            {
                "RECALIB_HOME": str(workdir / "home"),
                "RECALIB_HOST": "127.0.0.1",
                "RECALIB_PORT": str(server.port),
                "RECALIB_GRPC": "false",
                "RECALIB_EXECUTION_PROVIDER": "cpu",
                "RECALIB_DYNAMIC_BATCHING": "true",
                "RECALIB_DRIFT_SAMPLE_FRACTION": str(args.drift),
            }
        )
        server.start()
        try:
            _wait_live(server, 120)
            for name in MODELS:
                body, kind = _multipart({"name": name}, "model.onnx", model.read_bytes())
                _send(server, "POST", "/v1/models", body, kind)
            _put_bank(server, "one", "b0", paths[0])
            _put_bank(server, "many", "b0", paths[0])
            for name in MODELS:  # load both, and the bank sessions
                _check(server, name, x, "b0")
            rss_before = dp.rss_mb(server.pid)
            started = time.perf_counter()
            for i, bank_path in enumerate(paths[1:], start=1):
                _put_bank(server, "many", f"b{i}", bank_path)
            put_seconds = time.perf_counter() - started
            auto = _check(server, "many", x, "auto")
            port = server.port
            rng = np.random.default_rng(1)
            random_banks = [f"b{int(i)}" for i in rng.integers(0, args.banks, 64)]
            cases: dict[str, list[bytes]] = {
                "many: no bank (version statistics)": [_request(port, "many", x, None)],
                "one: explicit bank (K=1)": [_request(port, "one", x, "b0")],
                f"many: random explicit bank (K={args.banks})": [
                    _request(port, "many", x, b) for b in random_banks
                ],
                f"many: the same bank every request (K={args.banks})": [
                    _request(port, "many", x, f"b{min(7, args.banks - 1)}")
                ],
                f"many: auto routing (K={args.banks})": [_request(port, "many", x, "auto")],
            }
            cells: dict[tuple[str, int], list[dp.Cell]] = {}
            names = list(cases)
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for c in levels:
                    for case in order:
                        cells.setdefault((case, c), []).append(
                            _cell(server, cases[case], c, args.seconds)
                        )
            rss_after = dp.rss_mb(server.pid)
        except Exception:
            print(f"--- the server's log:\n{server.tail(4000)}", file=sys.stderr)
            raise
        finally:
            server.close()
    _print(args, names, levels, cells, rss_before, rss_after, per_bank, put_seconds, auto)


def _med(values: Sequence[float]) -> float:
    return float(np.median(values))


def _print(
    args: argparse.Namespace,
    names: list[str],
    levels: list[int],
    cells: dict[tuple[str, int], list[dp.Cell]],
    rss_before: float,
    rss_after: float,
    per_bank: int,
    put_seconds: float,
    auto: dict[str, Any],
) -> None:
    print(
        f"model {args.model}, batch-1 REST binary requests, {args.seconds} s per cell, "
        f"median of {args.rounds} rounds, {os.cpu_count()} CPUs, drift {args.drift}"
    )
    print(f"{'case':52} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'srv ms/req':>10}")
    rate: dict[tuple[str, int], float] = {}
    cpu: dict[tuple[str, int], float] = {}
    for c in levels:
        for case in names:
            got = cells[(case, c)]
            rate[(case, c)] = _med([g.throughput for g in got])
            cpu[(case, c)] = _med([g.server_cpu / max(g.requests, 1) * 1e3 for g in got])
            p50 = _med([g.pct(50) for g in got])
            p99 = _med([g.pct(99) for g in got])
            print(
                f"{case:52} {c:>4} {rate[(case, c)]:>7.0f} {p50:>7.2f} {p99:>7.2f} "
                f"{cpu[(case, c)]:>10.3f}"
            )
    k = args.banks
    one, rand = "one: explicit bank (K=1)", f"many: random explicit bank (K={k})"
    same, auto_case = f"many: the same bank every request (K={k})", f"many: auto routing (K={k})"
    plain = "many: no bank (version statistics)"
    print("\nratios (throughput; CPU per request in brackets, lower/higher = better):")
    for c in levels:
        print(
            f"  c={c}: K={k} random / K=1 {rate[(rand, c)] / rate[(one, c)]:.2f}x "
            f"({cpu[(one, c)] / cpu[(rand, c)]:.2f}x)   auto / explicit "
            f"{rate[(auto_case, c)] / rate[(rand, c)]:.2f}x "
            f"({cpu[(rand, c)] / cpu[(auto_case, c)]:.2f}x)"
            f"   random / same bank {rate[(rand, c)] / rate[(same, c)]:.2f}x   "
            f"bank / no bank {rate[(rand, c)] / rate[(plain, c)]:.2f}x"
        )
    bank_mb = per_bank * (k - 1) / 2**20
    growth = rss_after - rss_before
    print(
        f"RSS: {rss_before:.0f} MB -> {rss_after:.0f} MB after {k - 1} banks put and served "
        f"(+{growth:.1f} MB for {bank_mb:.2f} MB of bank statistics: {growth / bank_mb:.2f}x); "
        f"{k - 1} PUTs took {put_seconds:.1f} s ({put_seconds / (k - 1) * 1e3:.1f} ms each)"
    )
    print(f"an auto request's answer: {auto}")


if __name__ == "__main__":
    main()
