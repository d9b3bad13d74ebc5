"""Data-plane test helpers: tiny BN models exported to ONNX, seeded images, and a minimal
v2 app (the real router and runtime, a fake registry)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from torch import Tensor, nn

from recalib.onnx.export import export_onnx
from service.api import metrics_route, v2
from service.app import RecalibApp
from service.dataplane import DataPlane
from service.errors import NotFound, install_error_handlers
from service.metrics import ServiceMetrics
from service.runtime.runtime import ServingRuntime
from service.settings import Settings

IMAGE = (3, 8, 8)
CLASSES = 3


class TinyNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU-pool-Linear on ``(N, 3, 8, 8)``; three outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        out: Tensor = self.fc(x.mean(dim=(2, 3)))
        return out


def source_images(n: int, seed: int) -> np.ndarray:
    """``(n, 3, 8, 8)`` float32 standard-normal images (the source domain)."""
    return np.random.default_rng(seed).standard_normal((n, *IMAGE)).astype(np.float32)


def shifted_images(n: int, seed: int) -> np.ndarray:
    """The new domain: per-channel scale and offset."""
    scale = np.array([0.4, 2.0, 1.3], dtype=np.float32)[None, :, None, None]
    shift = np.array([1.5, -0.8, 0.6], dtype=np.float32)[None, :, None, None]
    return (source_images(n, seed) * scale + shift).astype(np.float32)


def make_model(seed: int = 0, calibrate_on: np.ndarray | None = None) -> TinyNet:
    """A seeded :class:`TinyNet` in eval mode whose BN statistics match ``calibrate_on``
    (source images by default), so in-domain data shows little drift."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyNet()
    data = source_images(512, seed + 1) if calibrate_on is None else calibrate_on
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for i in range(0, len(data), 128):
            model(torch.from_numpy(data[i : i + 128]))
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    """Export ``model`` with BN kept and a dynamic batch axis; returns ``path``."""
    export_onnx(model, torch.zeros(2, *IMAGE), path)
    return path


def export_versions(root: Path) -> dict[int, tuple[TinyNet, Path]]:
    """Versions 1 and 2 of the tiny model (different seeds), exported under ``root``."""
    out: dict[int, tuple[TinyNet, Path]] = {}
    for version, seed in ((1, 0), (2, 1)):
        model = make_model(seed)
        out[version] = (model, export(model, root / f"v{version}.onnx"))
    return out


def runtime_settings(home: Path, **overrides: Any) -> Settings:
    """CPU, one ORT thread, drift watched on every batch; ``overrides`` win."""
    base: dict[str, Any] = {
        "home": home,
        "execution_provider": "cpu",
        "intra_op_threads": 1,
        "drift_sample_fraction": 1.0,
    }
    return Settings(**{**base, **overrides})


def reference_outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The torch model's float32 logits for ``x``."""
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(x)).numpy()
    return out


class FakeRegistry:
    """``resolve(name, ref)`` over a dict: versions, aliases, production/latest default."""

    def __init__(self, paths: dict[int, Path]) -> None:
        self.versions = {"m": dict(paths)}
        self.aliases = {"m": {"production": 1, "staging": 2}}
        self.calls: list[tuple[str, str | None]] = []

    def model_names(self) -> list[str]:
        return sorted(self.versions)

    def version_numbers(self, name: str) -> list[int]:
        if name not in self.versions:
            raise NotFound(f"model {name!r} not found")
        return sorted(self.versions[name])

    def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
        self.calls.append((name, ref))
        if name not in self.versions:
            raise NotFound(f"model {name!r} not found")
        versions = self.versions[name]
        if ref is None:
            version = self.aliases[name].get("production", max(versions))
        elif re.fullmatch(r"[0-9]+", ref):
            version = int(ref)
        elif ref in self.aliases[name]:
            version = self.aliases[name][ref]
        else:
            raise NotFound(f"model {name!r} has no alias {ref!r}")
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version}")
        return version, versions[version]


def build_app(settings: Settings, registry: Any) -> FastAPI:
    metrics = ServiceMetrics(CollectorRegistry())
    runtime = ServingRuntime(settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        for name in registry.model_names():  # as the app's start-up does (serve_all)
            version, path = registry.resolve(name, None)
            await runtime.serve(name, version, path)
        yield
        await runtime.close()

    app = RecalibApp(lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.dataplane = DataPlane(settings, registry, runtime, metrics)
    install_error_handlers(app)
    app.include_router(v2.router)
    app.include_router(metrics_route.router)
    app.answer_inference(app.state.dataplane, settings)  # as create_app
    return app


@contextmanager
def serving(app: FastAPI, *, startup: float = 30.0) -> Iterator[str]:
    """``app`` under uvicorn in a thread on a free 127.0.0.1 port (its lifespan on);
    yields ``"127.0.0.1:<port>"``; stopped and joined on exit.

    Raises:
        RuntimeError: uvicorn did not start within ``startup`` seconds.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(startup)
        sock.close()
