"""What the control-plane tests share besides fixtures: the token, a fake serving runtime
and a started app's client (:class:`Api`). A module of its own, imported by bare name as
``runtime_helpers`` is, so tests never import ``conftest`` (two test folders have one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
from fastapi.testclient import TestClient

from service.errors import InvalidInput, NotFound
from service.runtime.bank_refs import BankRef
from service.settings import Settings

__all__ = [
    "AUTH",
    "TOKEN",
    "Api",
    "FakeRuntime",
    "bank_bytes",
    "real_api",
    "replica_settings",
    "shifted_stats",
]

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeRuntime:
    """Records what the control plane asks; ``fail`` holds ``(name, version)`` that
    refuse to load. Bank pushes are recorded apart (``bank_calls``, and the latest set
    per model in ``banks``) so the serve/unload sequences stay as they were;
    ``fail_banks`` makes ``set_banks`` raise."""

    def __init__(self) -> None:
        self.served: dict[str, int] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[tuple[str, int]] = set()
        self.started = self.closed = False
        self.bank_calls: list[tuple[str, tuple[BankRef, ...], str | None]] = []
        self.banks: dict[str, tuple[tuple[BankRef, ...], str | None]] = {}
        self.fail_banks = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def serve(
        self,
        name: str,
        version: int,
        onnx_path: Path,
        *,
        if_unserved: bool = False,
        generation: int | None = None,  # noqa: ARG002 - the data plane's race guard
    ) -> None:
        if if_unserved and name in self.served:
            return
        self.calls.append(("serve", name, version))
        if (name, version) in self.fail or not onnx_path.is_file():
            raise InvalidInput(f"could not load {name} version {version}")
        self.served[name] = version

    def served_version(self, name: str) -> int | None:
        return self.served.get(name)

    def generation(self, name: str) -> int:  # noqa: ARG002 - no deletes race here
        """The data plane reads it before resolving (see ``service.dataplane``)."""
        return 0

    async def unload_model(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.served.pop(name, None)

    def drift(self, name: str) -> dict[str, Any]:
        if name not in self.served:
            raise NotFound(f"model {name!r} is not served")
        return {"model": name, "version": self.served[name], "score": 0.5, "exceeded": False}

    def reset_drift(self, name: str) -> None:
        self.calls.append(("reset_drift", name))

    async def set_banks(self, name: str, banks: Sequence[BankRef], default: str | None) -> None:
        """As ``ServingRuntime.set_banks``: a model's whole bank set and default."""
        if self.fail_banks:
            raise OSError(5, f"could not read the banks of {name}")
        self.bank_calls.append((name, tuple(banks), default))
        self.banks[name] = (tuple(banks), default)

    def bank_names(self, name: str) -> dict[str, list[int]]:
        """``{bank: sorted valid versions}`` of the latest push for ``name``."""
        return {b.name: sorted(b.versions) for b in self.banks.get(name, ((), None))[0]}


class Api:
    """A started app's client with the calls tests repeat."""

    def __init__(self, client: TestClient, runtime: Any) -> None:
        self.client = client
        self.runtime = runtime
        self.app: Any = cast(Any, client.app)
        self.home: Path = self.app.state.settings.home
        self.closed = False

    def close(self) -> None:
        """Stop the app (its lifespan's shutdown runs)."""
        if not self.closed:
            self.closed = True
            self.client.__exit__(None, None, None)

    def register(self, name: str, data: bytes, filename: str = "model.onnx", **form: str) -> Any:
        """POST /v1/models."""
        return self.client.post(
            "/v1/models", data={"name": name, **form}, files={"file": (filename, data)}
        )

    def upload(self, data: bytes, filename: str = "data.npz") -> Any:
        """POST /v1/datasets."""
        return self.client.post("/v1/datasets", files={"file": (filename, data)})

    def wait(self, job_id: str, *, limit: float = 120.0) -> dict[str, Any]:
        """Poll a job until it is final (``limit`` only guards against a hang)."""
        end = time.monotonic() + limit
        while True:
            job: dict[str, Any] = self.client.get(f"/v1/recalibrations/{job_id}").json()
            if job["state"] not in ("queued", "running"):
                return job
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job['state']} after {limit} s")
            time.sleep(0.05)

    def files(self) -> list[str]:
        """Every file under the home but the database (for "nothing changed" checks)."""
        return sorted(
            str(p.relative_to(self.home))
            for p in self.home.rglob("*")
            if p.is_file() and not p.name.startswith("recalib.db")
        )


def replica_settings(settings: Settings, store: Path, home: Path, **update: Any) -> Settings:
    """``settings`` for a store-fed inference replica of ``store`` with its own ``home``
    (``update`` wins)."""
    return settings.model_copy(
        update={"model_store": store, "role": "inference", "home": home, **update}
    )


def real_api(make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes) -> Api:
    """An app on the real serving runtime (CPU, one thread, warm-up at batch 1) with model
    ``m``: version 1 (production) and version 2."""
    api = make_api(
        settings.model_copy(
            update={"execution_provider": "cpu", "intra_op_threads": 1, "warmup_batch_sizes": [1]}
        ),
        runtime=None,  # the real serving runtime
    )
    assert api.register("m", bn_onnx).status_code == 201
    assert (
        api.client.post("/v1/models/m/versions", files={"file": ("m.onnx", bn_onnx)}).status_code
        == 201
    )
    return api


def shifted_stats(model: onnx.ModelProto, by: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``model``'s BN statistics, shifted (means + by, variances * (1 + by))."""
    from recalib.onnx.names import bn_node_stats

    return {k: (m + by, v * (1.0 + by)) for k, (m, v) in bn_node_stats(model).items()}


def bank_bytes(
    model: onnx.ModelProto,
    tmp_path: Path,
    stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> bytes:
    """A stat bank file of ``model``'s weights (its statistics shifted by 0.5 unless
    ``stats``), stamped with its weights digest."""
    from recalib.onnx.bank_files import save_onnx_bank

    path = tmp_path / "bank.safetensors"
    save_onnx_bank(model, shifted_stats(model, 0.5) if stats is None else stats, path, name="b")
    return path.read_bytes()
