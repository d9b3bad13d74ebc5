"""Data plane side by side: in-process ONNX Runtime, recalib, KServe and MLServer, one run.

The same ONNX model (``demo`` or ``resnet``, as ``serve_speed.py`` exports them), batch-1
requests, concurrency 1 and 16, served by:

* in-process ORT: ``session.run`` from 1 or 16 threads (the reference of every ratio);
* recalib: the production app (``create_app`` from ``RECALIB_*`` settings, uvicorn) as an
  inference replica (``RECALIB_ROLE=inference``) that is pushed the model over
  ``POST /v1/models`` at start, over REST JSON, REST binary (dynamic batching off and on)
  and gRPC (batching on): unary ``ModelInfer`` calls, and one ``ModelStreamInfer`` stream
  carrying as many requests in flight as the concurrency (``tritonclient``'s
  ``async_stream_infer`` use);
* KServe 0.21's Python ``ModelServer`` with an ORT ``kserve.Model`` (REST JSON, REST binary,
  gRPC) and MLServer 1.7 with an ORT custom runtime (REST JSON, gRPC), each started from its own
  virtualenv (``--kserve-python`` / ``--mlserver-python``, made by
  ``scripts/make_peer_venvs.sh``); a row whose interpreter is not given says so.
* the floor of any Python server on uvicorn (REST binary): a bare ASGI callable (no
  framework, batching, metrics, drift or auth) that decodes the binary request, runs the
  session in the coroutine and writes the reply, on uvicorn as recalib runs it. Its CPU
  over in-process ORT is what uvicorn, the event loop and the socket take alone; the
  server CPU targets' lines print it beside recalib's.

Every server's ORT session has recalib's options (graph optimisation ``ORT_ENABLE_ALL``,
sequential, ``intra_op_threads`` threads, spinning off), and so has the in-process session.
No server writes a log line per request (recalib: uvicorn's access log off; KServe: latency
logging and access log off; MLServer: ``debug`` off). The peers' model classes run the
session in the request's coroutine, as their own examples do.

Each server's answer is checked against in-process ORT before it is loaded. The load
generators are minimal asyncio clients (HTTP/1.1 keep-alive connections with pre-encoded
requests from ``serve_speed.py``; ``grpc.aio`` on one channel with pre-built
``ModelInferRequest`` messages carrying ``raw_input_contents``), closed loop, bounded by
``--seconds``. Each cell runs after a warm-up, in ``--rounds`` rounds in rotated order; the
table gives medians over rounds of:

* req/s, p50 / p99 latency, and throughput relative to in-process ORT at the same
  concurrency in the same round;
* server CPU ms per request: utime + stime of the server's process tree (``/proc/PID/stat``,
  the process and its descendants, e.g. MLServer's inference worker) over the cell, divided
  by the requests; for in-process ORT, the benchmark process's own CPU;
* client CPU ms per request: the load generator's own CPU (it shares the cores);
* RSS MB after the load: ``VmRSS`` of the server's process tree after all rounds (one value
  per server process: rows served by the same process show the same); in-process ORT: a
  fresh subprocess holding just a session, after the same load (concurrency 16). The RSS
  target's line also gives the same subprocess after it imported every third-party module
  the inference role imports (FastAPI, grpc, ..., listed by a fresh interpreter that
  imports the service): what the libraries alone hold, before any server code runs.

Then the targets of issue 12 item 5, pass/fail from this run's numbers.

Run: ``python bench/data_plane.py [--model resnet,demo] [--seconds 3] [--rounds 3]
[--kserve-python /tmp/recalib-peers/kserve/bin/python]
[--mlserver-python /tmp/recalib-peers/mlserver/bin/python]``.
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
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Only the standard library and numpy at the top: the peers' virtualenvs import this file
# to run their servers (``--peer``) and have neither recalib nor the service's packages.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL_NAME = "bench"
INPUT_NAME = "input"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_ENV = "DATA_PLANE_PEER"  # a peer server's configuration (JSON), see _peer_main
FLOOR_ROW = "floor: bare ASGI, uvicorn, binary"  # see _floor_main


# -- the ORT session every server and the in-process reference use -------------------------


def ort_session(path: str, threads: int) -> Any:
    """recalib's CPU session options (``service.runtime.sessions.session_options``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


# -- /proc -----------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ..., utime (11), stime (12)]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``'s process tree."""
    ticks = 0
    for p in process_tree(pid):
        fields = _stat(p)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid``'s process tree, MB."""
    kb = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
        except OSError:
            pass
    return kb / 1024


def maps_torch(pid: int) -> bool:
    """Whether any process of the tree has torch's libraries mapped."""
    for p in process_tree(pid):
        try:
            if "/torch/" in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            pass
    return False


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the peers' servers (run inside their own virtualenvs) ---------------------------------


def _kserve_main(cfg: dict[str, Any]) -> None:
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when it is imported
    import logging

    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    session = ort_session(cfg["model"], cfg["threads"])
    out_name = session.get_outputs()[0].name

    class OrtModel(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(MODEL_NAME)
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:  # noqa: ARG002
            x = payload.inputs[0].as_numpy()
            y = session.run(None, {INPUT_NAME: x})[0]
            out = InferOutput(name=out_name, shape=list(y.shape), datatype="FP32")
            # set_data_from_numpy, not data=y: KServe 0.21's to_grpc tests an ndarray's
            # truth value ("ambiguous") when the outputs go back raw.
            out.set_data_from_numpy(y, binary_data=payload.use_binary_outputs)
            return InferResponse(
                response_id=payload.id or "",
                model_name=MODEL_NAME,
                infer_outputs=[out],
                use_binary_outputs=payload.use_binary_outputs,
            )

    _loopback_only()
    server = kserve.ModelServer(
        http_port=cfg["port"], grpc_port=cfg["grpc_port"], enable_latency_logging=False
    )
    for name in ("uvicorn.access", "kserve.trace"):  # the per-request log lines
        logging.getLogger(name).disabled = True
    server.start([OrtModel()])


def _loopback_only() -> None:
    """KServe binds REST to 0.0.0.0 and gRPC to [::] (hard-coded): 127.0.0.1 here."""
    import uvicorn
    from grpc.aio import _server

    base = uvicorn.Config

    class LoopbackConfig(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["host"] = "127.0.0.1"
            super().__init__(*args, **kwargs)

    uvicorn.Config = LoopbackConfig  # type: ignore[misc]
    add_port = _server.Server.add_insecure_port

    def loopback_port(self: Any, address: str) -> int:
        port: int = add_port(self, address.replace("[::]", "127.0.0.1"))
        return port

    setattr(_server.Server, "add_insecure_port", loopback_port)  # noqa: B010


def _mlserver_runtime() -> type:
    """The MLServer runtime class, made on first use (this module imports without
    mlserver); MLServer's workers import it as ``data_plane.OrtRuntime``."""
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse

    class OrtRuntime(MLModel):  # type: ignore[misc]
        async def load(self) -> bool:
            params = self.settings.parameters
            self._session = ort_session(params.uri, int(params.extra["threads"]))
            self._out = self._session.get_outputs()[0].name
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            x = NumpyCodec.decode_input(payload.inputs[0])
            y = self._session.run(None, {INPUT_NAME: x})[0]
            return InferenceResponse(
                model_name=self.name, outputs=[NumpyCodec.encode_output(self._out, y)]
            )

    OrtRuntime.__module__ = "data_plane"
    OrtRuntime.__qualname__ = "OrtRuntime"
    return OrtRuntime


def __getattr__(name: str) -> Any:  # PEP 562: ``data_plane.OrtRuntime`` for MLServer
    if name == "OrtRuntime":
        cls = _mlserver_runtime()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _mlserver_main(cfg: dict[str, Any]) -> None:
    from mlserver import MLServer
    from mlserver.settings import ModelParameters, ModelSettings, Settings

    home = Path(cfg["home"])
    settings = Settings(
        debug=False,  # no access log
        host="127.0.0.1",
        http_port=cfg["port"],
        grpc_port=cfg["grpc_port"],
        metrics_port=cfg["metrics_port"],
        parallel_workers=cfg["workers"],
        model_repository_root=str(home),
        load_models_at_startup=False,
        environments_dir=str(home / "envs"),
        metrics_dir=str(home / "metrics"),
    )
    model = ModelSettings(
        name=MODEL_NAME,
        implementation="data_plane.OrtRuntime",
        parameters=ModelParameters(uri=cfg["model"], extra={"threads": cfg["threads"]}),
    )

    async def serve() -> None:  # as ``mlserver start`` does: built inside the loop
        await MLServer(settings).start([model])

    asyncio.run(serve())


def _floor_main(cfg: dict[str, Any]) -> None:
    """The floor of any Python v2 server on uvicorn: a bare ASGI callable (no framework, no
    batching, no metrics, no drift, no auth) that decodes a binary v2 request, runs the
    session in the coroutine and writes the binary reply; uvicorn as recalib runs it
    (uvloop, httptools, access log off). Only ``/ready`` and ``/infer`` of the one model."""
    import uvicorn

    session = ort_session(cfg["model"], cfg["threads"])
    out_name = session.get_outputs()[0].name
    infer_path = f"/v2/models/{MODEL_NAME}/infer"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, headers, body = 404, [], b""
        if scope["path"] == f"/v2/models/{MODEL_NAME}/ready":
            status = 200
        elif scope["path"] == infer_path and scope["method"] == "POST":
            chunks, more = [], True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            raw = b"".join(chunks)
            length = next(
                int(v) for k, v in scope["headers"] if k == b"inference-header-content-length"
            )
            spec = json.loads(raw[:length])["inputs"][0]
            x = np.frombuffer(raw[length:], dtype=np.float32).reshape(spec["shape"])
            y = session.run(None, {INPUT_NAME: x})[0]
            data = np.ascontiguousarray(y).tobytes()
            output = {"name": out_name, "datatype": "FP32", "shape": list(y.shape)}
            output["parameters"] = {"binary_data_size": len(data)}
            head = json.dumps({"model_name": MODEL_NAME, "outputs": [output]}).encode()
            status, body = 200, head + data
            headers = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(len(head)).encode()),
            ]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=cfg["port"],
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def _peer_main(which: str) -> None:
    cfg = json.loads(os.environ[PEER_ENV])
    {"kserve": _kserve_main, "mlserver": _mlserver_main, "floor": _floor_main}[which](cfg)


def _hold_session(
    model: str, threads: int, shape: Sequence[int], seconds: float, imports: Sequence[str]
) -> None:
    """A fresh process with just an ORT session (after importing ``imports``), after the
    in-process load at concurrency 16: prints its VmRSS (MB)."""
    import importlib

    import serve_speed

    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError:  # an alias some package put in sys.modules, not a module file
            continue
    session = ort_session(model, threads)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    serve_speed.run_threads(lambda: session.run(None, {INPUT_NAME: x}), 16, seconds)
    print(f"{rss_mb(os.getpid()):.1f}")


# -- the recalib server (run in this virtualenv) -------------------------------------------


def _recalib_main() -> None:
    """The production app: ``create_app(Settings())`` from the ``RECALIB_*`` environment,
    uvicorn as ``recalib serve`` runs it, without the per-request access log."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


# -- servers seen from the benchmark ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


class Server:
    """A server subprocess: ``start`` it, ``wait_ready``, ``close`` (always, in a finally)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.grpc_port = _free_port()
        self.log = workdir / f"{name}.log"
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss: float | None = None
        self.torch: bool | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=HERE
            )

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _get(self.url(f"/v2/models/{MODEL_NAME}/ready")) != 200:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = process_tree(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for p in pids[1:]:  # workers a killed parent left behind
            try:
                os.kill(p, 9)
            except OSError:
                pass


def _recalib_server(args: argparse.Namespace, workdir: Path, *, batching: bool) -> Server:
    name = f"recalib-batching-{'on' if batching else 'off'}"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    server = Server(name, [sys.executable, __file__, "--recalib-server"], env, workdir)
    server.env.update(
        {
            "RECALIB_HOME": str(workdir / name),
            "RECALIB_ROLE": "inference",
            "RECALIB_HOST": "127.0.0.1",
            "RECALIB_PORT": str(server.port),
            "RECALIB_GRPC": "true",
            "RECALIB_GRPC_PORT": str(server.grpc_port),
            "RECALIB_EXECUTION_PROVIDER": "cpu",
            "RECALIB_PROVIDER_FALLBACK": "fail",
            "RECALIB_DYNAMIC_BATCHING": "true" if batching else "false",
            "RECALIB_DRIFT_SAMPLE_FRACTION": str(args.drift),
            "RECALIB_MAX_QUEUE_DELAY_MS": str(args.delay_ms),
            "RECALIB_INTRA_OP_THREADS": str(args.threads),
            "RECALIB_MAX_BATCH_SIZE": str(args.max_batch),
            "RECALIB_EXPECT_MODELS": json.dumps([MODEL_NAME]),
        }
    )
    return server


def _push_model(server: Server, model: Path, timeout: float) -> None:
    """``POST /v1/models`` (multipart: name, file) once the replica is live."""
    deadline = time.monotonic() + timeout
    while _get(server.url("/v2/health/live")) != 200:
        if server.proc is None or server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited: {server.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not live after {timeout:.0f} s: {server.tail()}")
        time.sleep(0.1)
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'.encode(),
            MODEL_NAME.encode(),
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="model.onnx"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode(),
            model.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(
        server.url("/v1/models"),
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        detail = f"{exc.code} {exc.read()[:300]!r}"
        raise RuntimeError(f"{server.name}: POST /v1/models: {detail}") from None
    if status != 201:
        raise RuntimeError(f"{server.name}: POST /v1/models answered {status}")


def _peer_server(
    which: str, python: str, args: argparse.Namespace, model: Path, workdir: Path
) -> Server:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(HERE)  # this file, as ``data_plane``; nothing of recalib
    server = Server(which, [python, __file__, "--peer", which], env, workdir)
    home = workdir / which
    home.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": str(model),
        "threads": args.threads,
        "port": server.port,
        "grpc_port": server.grpc_port,
        "metrics_port": _free_port(),
        "workers": args.mlserver_workers,
        "home": str(home),
    }
    server.env[PEER_ENV] = json.dumps(cfg)
    return server


def _peer_missing(python: str | None, flag: str, package: str) -> str | None:
    """Why the peer cannot run (``None``: it can)."""
    if python is None:
        return f"skipped: {flag} not given"
    if not Path(python).exists():
        return f"skipped: {python} does not exist"
    check = subprocess.run(
        [python, "-c", f"import {package}, onnxruntime"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if check.returncode != 0:
        return f"skipped: {python} cannot import {package} and onnxruntime"
    return None


# -- load generators -----------------------------------------------------------------------


@dataclass
class Cell:
    """One measured cell: what the load generator saw, and the CPU both sides spent."""

    requests: int
    seconds: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")


def _in_process(session: Any, x: np.ndarray, concurrency: int, seconds: float) -> Cell:
    import serve_speed

    for _ in range(20):
        session.run(None, {INPUT_NAME: x})
    cpu0 = _self_cpu()
    r = serve_speed.run_threads(lambda: session.run(None, {INPUT_NAME: x}), concurrency, seconds)
    cpu = _self_cpu() - cpu0
    return Cell(r.requests, r.seconds, r.latencies, cpu, cpu)


async def _closed_loop(
    worker: Callable[[float, list[float]], Any], concurrency: int, seconds: float
) -> tuple[int, float, list[float]]:
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds, lat) for lat in latencies))
    elapsed = time.perf_counter() - start
    flat = [v for lat in latencies for v in lat]
    return len(flat), elapsed, flat


def _measure(
    run: Callable[[float], tuple[int, float, list[float]]], pid: int, seconds: float
) -> Cell:
    run(min(0.5, seconds / 4))  # warm-up: connections, batch shapes
    server0, client0 = cpu_seconds(pid), _self_cpu()
    n, elapsed, latencies = run(seconds)
    server, client = cpu_seconds(pid) - server0, _self_cpu() - client0
    return Cell(n, elapsed, latencies, server, client)


async def _http_worker(
    port: int, request: bytes | Sequence[bytes], stop: float, out: list[float], offset: int = 0
) -> None:
    """One keep-alive connection, closed loop: ``serve_speed``'s, plus chunked bodies
    (KServe streams its binary responses). Several requests are sent in turn, from the
    ``offset``-th."""
    requests = [request] if isinstance(request, bytes) else list(request)
    n = offset
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (t0 := time.perf_counter()) <= stop:
            writer.write(requests[n % len(requests)])
            n += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length, chunked = 0, False
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    length = int(value)
                elif key == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
            if chunked:
                parts = []
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    parts.append((await reader.readexactly(size + 2))[:-2])
                    if size == 0:  # no trailers: the last chunk's CRLF ends the body
                        break
                body = b"".join(parts)
            else:
                body = await reader.readexactly(length)
            if head[9:12] != b"200":
                raise RuntimeError(f"HTTP {head[9:12].decode()}: {body[:200]!r}")
            out.append(time.perf_counter() - t0)
    finally:
        writer.close()


def _over_http(
    server: Server, x: np.ndarray, binary: bool, concurrency: int, seconds: float
) -> Cell:
    import serve_speed

    request = serve_speed._http_request(server.port, x, binary)

    def worker(stop: float, out: list[float]) -> Any:
        return _http_worker(server.port, request, stop, out)

    return _measure(
        lambda s: asyncio.run(_closed_loop(worker, concurrency, s)), server.pid, seconds
    )


def _grpc_request(x: np.ndarray) -> Any:
    from tritonclient.grpc import service_pb2 as pb

    return pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=INPUT_NAME, datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[np.ascontiguousarray(x, "<f4").tobytes()],
    )


def _over_grpc(server: Server, x: np.ndarray, concurrency: int, seconds: float) -> Cell:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    request = _grpc_request(x)

    async def run(duration: float) -> tuple[int, float, list[float]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(request, timeout=30)  # connected before the clock starts

            async def worker(stop: float, out: list[float]) -> None:
                while (t0 := time.perf_counter()) <= stop:
                    await stub.ModelInfer(request, timeout=30)
                    out.append(time.perf_counter() - t0)

            return await _closed_loop(worker, concurrency, duration)

    return _measure(lambda s: asyncio.run(run(s)), server.pid, seconds)


def _stream_requests(x: np.ndarray, concurrency: int) -> list[Any]:
    requests = []
    for i in range(concurrency):
        request = _grpc_request(x)
        request.id = str(i)  # answers come back in completion order, matched by id
        requests.append(request)
    return requests


def _over_grpc_stream(server: Server, x: np.ndarray, concurrency: int, seconds: float) -> Cell:
    """One ``ModelStreamInfer`` stream with ``concurrency`` requests in flight: each answer
    sends the next request of its slot (``tritonclient``'s ``async_stream_infer`` use)."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    requests = _stream_requests(x, concurrency)

    async def run(duration: float) -> tuple[int, float, list[float]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(requests[0], timeout=30)  # connected before the clock
            call = stub.ModelStreamInfer(timeout=duration + 30)  # a lost answer fails, late
            start = time.perf_counter()
            stop = start + duration
            sent: dict[str, float] = {}
            latencies: list[float] = []
            for request in requests:
                sent[request.id] = time.perf_counter()
                await call.write(request)
            while sent:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise RuntimeError("the stream ended with requests in flight")
                if reply.error_message:
                    raise RuntimeError(f"stream answer: {reply.error_message}")
                slot = reply.infer_response.id
                now = time.perf_counter()
                latencies.append(now - sent.pop(slot))
                if now <= stop:
                    sent[slot] = time.perf_counter()
                    await call.write(requests[int(slot)])
            await call.done_writing()
            return len(latencies), time.perf_counter() - start, latencies

    return _measure(lambda s: asyncio.run(run(s)), server.pid, seconds)


# -- answers checked before the load ---------------------------------------------------------


def _check_http(server: Server, x: np.ndarray, binary: bool, expected: np.ndarray) -> None:
    from service.api.v2_codec import HEADER_LENGTH, decode_response, encode_request

    body, header = encode_request({INPUT_NAME: x}, binary=binary, binary_output=binary)
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if header is not None:
        headers[HEADER_LENGTH] = str(header)
    request = urllib.request.Request(
        server.url(f"/v2/models/{MODEL_NAME}/infer"), data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            got = decode_response(r.read(), r.headers.get(HEADER_LENGTH))
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"HTTP {exc.code}: {exc.read()[:300]!r}") from None
    _same(got, expected)


def _check_grpc(server: Server, x: np.ndarray, expected: np.ndarray) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(_grpc_request(x), timeout=30)
    _same_reply(reply, expected)


def _same_reply(reply: Any, expected: np.ndarray) -> None:
    """A ``ModelInferResponse``'s one output (raw or typed contents) against ``expected``."""
    out = reply.outputs[0]
    if reply.raw_output_contents:
        y = np.frombuffer(reply.raw_output_contents[0], "<f4")
    else:
        y = np.asarray(out.contents.fp32_contents, np.float32)
    _same({out.name: y.reshape(tuple(out.shape))}, expected)


def _check_grpc_stream(server: Server, x: np.ndarray, expected: np.ndarray) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        (reply,) = list(stub.ModelStreamInfer(iter(_stream_requests(x, 1)), timeout=30))
    if reply.error_message:
        raise RuntimeError(f"stream answer: {reply.error_message}")
    _same_reply(reply.infer_response, expected)


def _same(got: dict[str, np.ndarray], expected: np.ndarray) -> None:
    if len(got) != 1:
        raise RuntimeError(f"expected one output (got {sorted(got)})")
    (y,) = got.values()
    if y.shape != expected.shape or not np.allclose(y, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"answer differs from in-process ORT: {y.ravel()[:4]} vs {expected.ravel()[:4]}"
        )


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Row:
    setup: str
    server: str | None  # None: in-process ORT
    protocol: str  # "ort", "json", "binary", "grpc", "grpc-stream"
    skipped: str | None = None
    cells: dict[int, list[Cell]] = field(default_factory=dict)
    ratios: dict[int, list[float]] = field(default_factory=dict)


def _rows(kserve: str | None, mlserver: str | None) -> list[Row]:
    return [
        Row("in-process ORT", None, "ort"),
        Row("recalib REST JSON", "recalib-batching-on", "json"),
        Row("recalib REST binary, batching off", "recalib-batching-off", "binary"),
        Row("recalib REST binary, batching on", "recalib-batching-on", "binary"),
        Row("recalib gRPC, batching on", "recalib-batching-on", "grpc"),
        Row("recalib gRPC stream, batching on", "recalib-batching-on", "grpc-stream"),
        Row(FLOOR_ROW, "floor", "binary"),
        Row("KServe REST JSON", "kserve", "json", kserve),
        Row("KServe REST binary", "kserve", "binary", kserve),
        Row("KServe gRPC", "kserve", "grpc", kserve),
        Row("MLServer REST JSON", "mlserver", "json", mlserver),
        Row("MLServer gRPC", "mlserver", "grpc", mlserver),
    ]


def _export(kind: str, path: Path) -> tuple[int, ...]:
    """The model, exported in a child process (torch stays out of this one)."""
    code = (
        "import json, sys; from pathlib import Path; import serve_speed; "
        "print(json.dumps(serve_speed._export(sys.argv[1], Path(sys.argv[2]))))"
    )
    return tuple(_child(["-c", code, kind, str(path)], f"export of {kind}", 600))


def _child(argv: list[str], what: str, timeout: float) -> Any:
    """Run this interpreter with ``argv`` (from ``bench/``, the repository and ``bench/``
    importable) and return the JSON of its last line of output."""
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_SERVER_PACKAGES = """
import json, os, sys
os.environ["RECALIB_ROLE"] = "inference"
import service.app, service.grpc_api.server, service.runtime.runtime
import uvicorn, uvicorn.main  # and what `recalib serve` runs on, where installed:
for name in ("uvloop", "httptools", "uvicorn.loops.uvloop",
             "uvicorn.protocols.http.httptools_impl"):
    try:
        __import__(name)
    except ImportError:
        pass
ours = {"service", "recalib", "bench", "tests"}
def third_party(name):
    top = name.split(".")[0]
    return top not in sys.stdlib_module_names and top not in ours and not top.startswith("_")
print(json.dumps([m for m in sys.modules if third_party(m)]))
"""


def server_packages() -> list[str]:
    """The third-party modules the inference role's modules import (every submodule, in
    import order), read from a fresh interpreter that imports them."""
    names: list[str] = _child(["-c", _SERVER_PACKAGES], "listing the server's packages", 120)
    return names


def _rss_in_process(
    model: Path, args: argparse.Namespace, shape: tuple[int, ...], imports: Sequence[str] = ()
) -> float:
    argv = [__file__, "--hold-session", str(model), "--shape", json.dumps(shape)]
    argv += ["--threads", str(args.threads), "--seconds", str(args.seconds)]
    argv += ["--imports", ",".join(imports)]
    return float(_child(argv, "the session-only process", 120 + args.seconds))


def bench_model(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if kind.endswith(".onnx"):  # a given model: one FP32 input named "input", batch first
        model = Path(kind).resolve()
        session = ort_session(str(model), args.threads)
        shape = tuple(int(d) for d in session.get_inputs()[0].shape[1:])
    else:
        model = workdir / f"{kind}.onnx"
        shape = _export(kind, model)
        session = ort_session(str(model), args.threads)
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    expected = session.run(None, {INPUT_NAME: x})[0]
    kserve_missing = _peer_missing(args.kserve_python, "--kserve-python", "kserve")
    mlserver_missing = _peer_missing(args.mlserver_python, "--mlserver-python", "mlserver")
    rows = _rows(kserve_missing, mlserver_missing)
    servers: dict[str, Server] = {}
    try:
        for batching in (False, True):
            s = _recalib_server(args, workdir, batching=batching)
            servers[s.name] = s
        if kserve_missing is None:
            servers["kserve"] = _peer_server("kserve", args.kserve_python, args, model, workdir)
        if mlserver_missing is None:
            servers["mlserver"] = _peer_server(
                "mlserver", args.mlserver_python, args, model, workdir
            )
        servers["floor"] = _peer_server("floor", sys.executable, args, model, workdir)
        for s in servers.values():  # all start at once: the start-ups overlap
            s.start()
        for name, s in list(servers.items()):
            try:
                if name.startswith("recalib"):
                    _push_model(s, model, args.startup)
                s.wait_ready(args.startup)
            except RuntimeError as exc:
                if name.startswith("recalib"):
                    raise
                print(f"{name}: {exc}", file=sys.stderr)
                servers.pop(name).close()
                for row in rows:
                    if row.server == name:
                        row.skipped = f"skipped: {name} did not start (log {s.log})"
        for row in rows:  # every answer checked once before the load
            if row.skipped is not None or row.server is None or row.server not in servers:
                continue
            s = servers[row.server]
            try:
                if row.protocol == "grpc":
                    _check_grpc(s, x, expected)
                elif row.protocol == "grpc-stream":
                    _check_grpc_stream(s, x, expected)
                else:
                    _check_http(s, x, row.protocol == "binary", expected)
            except Exception as exc:
                if row.server.startswith("recalib"):
                    raise
                reason = " ".join(str(exc).split())
                row.skipped = f"skipped: wrong answer or error ({reason})"[:300]
        plan = [(r, c) for r in rows if r.skipped is None for c in args.concurrency]
        for k in range(args.rounds):  # rotated order: slow load changes spread over cells
            order = plan[k % len(plan) :] + plan[: k % len(plan)]
            measured: dict[tuple[str, int], Cell] = {}
            for row, c in order:
                if row.server is None:
                    cell = _in_process(session, x, c, args.seconds)
                elif row.protocol == "grpc":
                    cell = _over_grpc(servers[row.server], x, c, args.seconds)
                elif row.protocol == "grpc-stream":
                    cell = _over_grpc_stream(servers[row.server], x, c, args.seconds)
                else:
                    cell = _over_http(
                        servers[row.server], x, row.protocol == "binary", c, args.seconds
                    )
                row.cells.setdefault(c, []).append(cell)
                measured[(row.setup, c)] = cell
            for row, c in plan:  # ratios within the round
                base = measured[("in-process ORT", c)]
                row.ratios.setdefault(c, []).append(
                    measured[(row.setup, c)].throughput / base.throughput
                )
        for s in servers.values():
            s.rss = rss_mb(s.pid)
            s.torch = maps_torch(s.pid)
    finally:
        for s in servers.values():
            s.close()
    ort_rss = _rss_in_process(model, args, shape)
    packages = server_packages()
    result = _summary(kind, shape, rows, servers, ort_rss, args)
    result["with_server_packages"] = {
        "packages": packages,
        "rss_mb": _rss_in_process(model, args, shape, packages),
    }
    return result


def _med(values: Sequence[float]) -> float:
    return float(np.median(values))


def _summary(
    kind: str,
    shape: tuple[int, ...],
    rows: list[Row],
    servers: dict[str, Server],
    ort_rss: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for row in rows:
        if row.skipped is not None:
            out.append({"setup": row.setup, "skipped": row.skipped})
            continue
        rss = ort_rss if row.server is None else servers[row.server].rss
        for c in args.concurrency:
            cells = row.cells[c]
            out.append(
                {
                    "setup": row.setup,
                    "concurrency": c,
                    "throughput": _med([m.throughput for m in cells]),
                    "p50_ms": _med([m.pct(50) for m in cells]),
                    "p99_ms": _med([m.pct(99) for m in cells]),
                    "ratio": _med(row.ratios[c]),
                    "server_cpu_ms": _med([m.server_cpu / m.requests * 1e3 for m in cells]),
                    "client_cpu_ms": None
                    if row.server is None
                    else _med([m.client_cpu / m.requests * 1e3 for m in cells]),
                    "rss_mb": rss,
                    "ratios": row.ratios[c],
                }
            )
    torch = {name: s.torch for name, s in servers.items()}
    return {"model": Path(kind).name, "shape": list(shape), "rows": out, "torch_mapped": torch}


def _cell(result: dict[str, Any], setup: str, c: int) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = result["rows"]
    return next((r for r in rows if r["setup"] == setup and r.get("concurrency") == c), None)


def _paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Median over rounds of a's throughput over b's (each relative to in-process ORT in
    the same round, so the pairing is by round)."""
    if a is None or b is None:
        return None
    return _med([x / y for x, y in zip(a["ratios"], b["ratios"], strict=True)])


def _top_level(modules: Sequence[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules})


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed) of issue 12 item 5; passed None: not measured."""
    c = 16
    ort = _cell(result, "in-process ORT", c)
    ort1 = _cell(result, "in-process ORT", 1)
    if ort is None:
        raise RuntimeError("no in-process ORT cell at concurrency 16")
    lines: list[tuple[str, str, bool | None]] = []
    torch = result["torch_mapped"]
    recalib = {k: v for k, v in torch.items() if k.startswith("recalib")}
    lines.append(
        (
            "inference role imports no torch (no torch library mapped)",
            ", ".join(f"{k}: {'torch mapped' if v else 'none'}" for k, v in recalib.items()),
            not any(recalib.values()),
        )
    )
    on = _cell(result, "recalib REST binary, batching on", c)
    off = _cell(result, "recalib REST binary, batching off", c)
    off1 = _cell(result, "recalib REST binary, batching off", 1)
    if on is None or off is None:
        raise RuntimeError("no recalib REST binary cells at concurrency 16")
    rss = max(on["rss_mb"], off["rss_mb"])
    measured = f"{rss:.0f} MB vs {ort['rss_mb']:.0f} MB ({rss / ort['rss_mb']:.2f}x)"
    floor = result.get("with_server_packages")
    if floor is not None:  # what the libraries alone take, with no server code running
        measured += (
            f"; the same session after importing the server's third-party packages "
            f"({', '.join(_top_level(floor['packages']))}): {floor['rss_mb']:.0f} MB "
            f"({floor['rss_mb'] / ort['rss_mb']:.2f}x)"
        )
    lines.append(("RSS after load <= 1.5x in-process ORT", measured, rss <= 1.5 * ort["rss_mb"]))
    for label, cell, base in (
        ("binary, batching off, conc 16", off, ort),
        ("binary, batching off, conc 1", off1, ort1),
        ("binary, batching on, conc 16", on, ort),
    ):
        if cell is None or base is None:
            continue
        extra = cell["server_cpu_ms"] - base["server_cpu_ms"]
        measured = f"{cell['server_cpu_ms']:.2f} vs {base['server_cpu_ms']:.2f} ms (+{extra:.2f})"
        bare = _cell(result, FLOOR_ROW, 1 if base is ort1 else c)
        if bare is not None and "batching on" not in label:  # the floor does not batch
            floor_extra = bare["server_cpu_ms"] - base["server_cpu_ms"]
            measured += f"; a bare ASGI callable on uvicorn: +{floor_extra:.2f}"
        lines.append(
            (f"server CPU per request <= in-process + 0.3 ms ({label})", measured, extra <= 0.3)
        )
    lines.append(
        (
            "REST binary + batching >= 0.6x in-process at conc 16",
            f"{on['ratio']:.2f}x",
            on["ratio"] >= 0.6,
        )
    )
    json_r = _cell(result, "recalib REST JSON", c)
    json_k = _cell(result, "KServe REST JSON", c)
    ratio = _paired(json_r, json_k)
    lines.append(
        (
            "REST JSON >= 3x KServe's Python server at conc 16",
            "KServe skipped" if ratio is None else f"{ratio:.2f}x",
            None if ratio is None else ratio >= 3.0,
        )
    )
    grpc_r = _cell(result, "recalib gRPC, batching on", c)
    ratio = _paired(grpc_r, on)
    stream = _paired(_cell(result, "recalib gRPC stream, batching on", c), on)
    measured = "not measured" if ratio is None else f"{ratio:.2f}x"
    if ratio is not None and stream is not None:  # the stream is information, not the target
        measured += f" (unary calls; one stream with {c} in flight: {stream:.2f}x)"
    lines.append(
        (
            "gRPC throughput >= REST binary at conc 16 (batching on)",
            measured,
            None if ratio is None else ratio >= 1.0,
        )
    )
    return lines


def print_result(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nmodel {result['model']} (input {result['shape']}), batch-1 requests, "
        f"{args.seconds:g} s per cell, median of {args.rounds} rounds, "
        f"drift_sample_fraction={args.drift}, max_queue_delay_ms={args.delay_ms}, "
        f"intra_op_threads={args.threads}, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'setup':<34} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'x ORT':>6} "
        f"{'srv ms/req':>10} {'cli ms/req':>10} {'RSS MB':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        if "skipped" in row:
            print(f"{row['setup']:<34} {row['skipped']}")
            continue
        cli = "-" if row["client_cpu_ms"] is None else f"{row['client_cpu_ms']:.2f}"
        print(
            f"{row['setup']:<34} {row['concurrency']:>4} {row['throughput']:>7.0f} "
            f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['ratio']:>6.2f} "
            f"{row['server_cpu_ms']:>10.2f} {cli:>10} {row['rss_mb']:>7.0f}"
        )
    print("\ntargets (issue 12 item 5), measured in this run:")
    for target, measured, passed in targets(result):
        verdict = "not measured" if passed is None else ("PASS" if passed else "FAIL")
        print(f"  [{verdict}] {target}: {measured}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--peer":  # in a peer's virtualenv
        _peer_main(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--recalib-server":
        _recalib_main()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="resnet",
        help="resnet, demo, both (resnet,demo), or an .onnx file (FP32 input 'input', "
        "batch dimension first)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--drift", type=float, default=0.1, help="recalib drift_sample_fraction")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="max_queue_delay_ms")
    parser.add_argument("--threads", type=int, default=0, help="intra_op_threads (0: ORT's)")
    parser.add_argument("--max-batch", type=int, default=32, help="max_batch_size")
    parser.add_argument("--kserve-python", help="python of a venv with kserve + onnxruntime")
    parser.add_argument("--mlserver-python", help="python of a venv with mlserver + onnxruntime")
    parser.add_argument(
        "--mlserver-workers", type=int, default=1, help="MLServer parallel_workers (its default)"
    )
    parser.add_argument("--startup", type=float, default=120.0, help="server start-up limit, s")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--hold-session", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--imports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold_session:
        imports = [name for name in args.imports.split(",") if name]
        _hold_session(
            args.hold_session, args.threads, json.loads(args.shape), args.seconds, imports
        )
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if 16 not in args.concurrency:
        parser.error("--concurrency must include 16 (the targets are at concurrency 16)")
    kinds = [k.strip() for k in args.model.split(",")]
    if any(k not in ("resnet", "demo") and not k.endswith(".onnx") for k in kinds):
        parser.error(f"--model: expected resnet, demo or an .onnx file (got {args.model!r})")

    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    results = []
    with tempfile.TemporaryDirectory(prefix="data_plane_") as tmp:
        for kind in kinds:
            workdir = Path(tmp) / Path(kind).stem  # a fresh RECALIB_HOME per model
            workdir.mkdir()
            result = bench_model(kind, args, workdir)
            results.append(result)
            print_result(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
