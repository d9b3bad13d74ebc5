"""The data plane: the Open Inference Protocol's operations, independent of the wire.

:class:`DataPlane` (as Seldon MLServer's) holds what health, metadata, readiness and
inference mean for this service - version resolution, loading on first use, readiness
rules, request metrics, the in-flight gauge and the bearer-token rules - so that the REST
routes (:mod:`service.api.v2`) and the gRPC servicer only translate their protocol to
these calls and back. Nothing here knows HTTP: errors are the domain's
(:class:`~service.errors.NotFound`, :class:`~service.errors.InvalidInput`, ...), which
each protocol maps to its own status codes.

Resolution: ``ref`` is a version number or an alias (a string, as in the URL), or
``None`` for the served version (the registry's ``production`` alias, else the latest
version, served on first use). A version that is not loaded yet is loaded on first use.
Both read the runtime's :meth:`~service.runtime.runtime.ServingRuntime.generation` of the
model *before* asking the registry, so a model deleted meanwhile is refused (404) rather
than loaded back.

Examples::

    >>> plane = DataPlane(settings, registry, runtime, metrics)
    >>> plane.check_token(presented)                       # raises Unauthorized
    >>> response = await plane.infer("demo", None, request)
    >>> async with plane.inference("demo", "2") as call:  # body read inside the window
    ...     response = await call.infer(decode(await read_body()))
"""

from __future__ import annotations

import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .auth import check_bearer
from .errors import NotFound, ServiceError, Unauthorized
from .metrics import ServiceMetrics
from .names import check_name, is_number
from .runtime.tensors import InferRequest, InferResponse
from .settings import Settings

__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "DataPlane",
    "Inference",
    "InferenceRuntime",
    "ModelResolver",
    "server_version",
]

SERVER_NAME = "recalib"
"""The ``name`` of the server metadata."""

EXTENSIONS = ("binary_tensor_data",)
"""The protocol extensions the server metadata lists."""


def server_version() -> str:
    """The installed ``recalib`` distribution's version (``0+unknown`` when it is not
    installed, e.g. run from a source tree)."""
    try:
        return importlib_metadata.version("recalib")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


class ModelResolver(Protocol):
    """What the data plane asks the model registry (``service.registry.Registry``)."""

    def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
        """``(version, ONNX path)`` of ``ref``; raises NotFound / InvalidInput."""
        ...

    def model_names(self) -> list[str]:
        """Every registered model."""
        ...


class InferenceRuntime(Protocol):
    """What the data plane asks the serving runtime
    (:class:`service.runtime.runtime.ServingRuntime`)."""

    @property
    def started(self) -> bool: ...

    def generation(self, name: str) -> int: ...

    def served_version(self, name: str) -> int | None: ...

    def is_ready(self, name: str, version: int | None = None) -> bool: ...

    async def load(
        self, name: str, version: int, onnx_path: Path, *, generation: int | None = None
    ) -> None: ...

    async def serve(
        self,
        name: str,
        version: int,
        onnx_path: Path,
        *,
        if_unserved: bool = False,
        generation: int | None = None,
    ) -> None: ...

    def metadata(self, name: str, version: int | None = None) -> dict[str, Any]: ...

    async def infer(
        self, name: str, version: int | None, request: InferRequest
    ) -> InferResponse: ...


def _outcome(exc: BaseException) -> str:
    """The ``outcome`` label of a failed request: 4xx errors are the client's."""
    if isinstance(exc, ServiceError) and 400 <= exc.status < 500:
        return "client_error"
    return "server_error"


class DataPlane:
    """Health, metadata, readiness and inference, for every protocol binding.

    Args:
        settings: ``api_token``, ``protect_health``, ``expect_models`` and
            ``max_request_bytes``.
        registry: resolves version references and lists the registered models.
        runtime: loads, serves and runs the model versions.
        metrics: where request counts, latencies and the in-flight gauge go.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelResolver,
        runtime: InferenceRuntime,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.runtime = runtime
        self.metrics = metrics

    # -- authentication ------------------------------------------------------------------

    @property
    def protect_health(self) -> bool:
        """Whether health and server metadata need the token too (``protect_health``)."""
        return self.settings.protect_health

    def check_token(self, presented: str | None) -> None:
        """Allow the call if no token is configured or ``presented`` is it.

        Args:
            presented: the bearer credentials the caller sent, ``None`` if none.

        Raises:
            Unauthorized: a token is configured and ``presented`` is missing or wrong.
        """
        check_bearer(self.settings.api_token, presented)

    def authorized(self, presented: str | None) -> bool:
        """Whether :meth:`check_token` would allow ``presented``."""
        try:
            self.check_token(presented)
        except Unauthorized:
            return False
        return True

    # -- health and metadata -------------------------------------------------------------

    def live(self) -> bool:
        """True while the process answers."""
        return True

    def ready(self, *, show_names: bool) -> tuple[bool, list[str] | None]:
        """Whether every model is ready for inference.

        Ready means: the runtime runs, every registered model's served version is loaded,
        and every model of ``expect_models`` is registered and loaded.

        Args:
            show_names: whether the caller may see model names (it holds the token, or
                none is configured; health is open to probes by default).

        Returns:
            ``(ready, waiting_for)``: the models not served yet, sorted (empty when
            ready, or when the runtime is not started); ``None`` instead of names the
            caller may not see.
        """
        if not self.runtime.started:
            return False, []
        names = set(self.registry.model_names())
        names.update(self.settings.expect_models)
        waiting = sorted(n for n in names if self.runtime.served_version(n) is None)
        if not waiting:
            return True, []
        return False, waiting if show_names else None

    def server_metadata(self) -> dict[str, Any]:
        """``{name, version, extensions}`` of the server."""
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    async def model_metadata(self, name: str, ref: str | None) -> dict[str, Any]:
        """Metadata of a version (loaded first if needed): ``name, versions, platform,
        inputs, outputs`` (``-1`` for variable dimensions) and ``parameters``.

        Args:
            name: the model.
            ref: a version number or alias, ``None`` for the served version.

        Returns:
            The protocol's model metadata object.

        Raises:
            NotFound: unknown model, version or alias (or deleted meanwhile).
            InvalidInput: the version's file does not load.
        """
        _, explicit = await self._target(name, ref)
        return self.runtime.metadata(name, explicit)

    async def model_ready(self, name: str, ref: str | None) -> bool:
        """Whether a version can answer (loaded on first call).

        Args:
            name: the model.
            ref: a version number or alias, ``None`` for the served version.

        Returns:
            True when ready; False when it failed to load or is not ready.

        Raises:
            InvalidInput: a malformed model name or version reference.
            NotFound: unknown model, version or alias.
        """
        ready, _ = await self.model_readiness(name, ref)
        return ready

    async def model_readiness(self, name: str, ref: str | None) -> tuple[bool, str | None]:
        """:meth:`model_ready` and why not: ``(ready, error)``, ``error`` the message of
        a failed load (``None`` when ready or merely not ready yet).

        Raises:
            InvalidInput: a malformed model name or version reference.
            NotFound: unknown model, version or alias.
        """
        # a malformed name or reference is an error, not a "not ready"
        check_name(name, "model name")
        if ref is not None and not is_number(ref):
            check_name(ref, "version number or alias")
        try:
            _, explicit = await self._target(name, ref)
        except NotFound:
            raise
        except ServiceError as exc:
            return False, exc.message
        return self.runtime.is_ready(name, explicit), None

    # -- inference -----------------------------------------------------------------------

    async def infer(self, name: str, ref: str | None, request: InferRequest) -> InferResponse:
        """Run a decoded request on a version (loaded on first use), counted in the
        request metrics.

        Args:
            name: the model.
            ref: a version number or alias, ``None`` for the served version.
            request: the decoded request.

        Returns:
            The response (``model_version`` is the version that answered).

        Raises:
            NotFound: unknown model, version or alias (or deleted meanwhile).
            InvalidInput: the inputs do not match the model.
            NotReady: the version is being unloaded.
        """
        async with self.inference(name, ref) as call:
            return await call.infer(request)

    def inference(self, name: str, ref: str | None) -> Inference:
        """The metrics window of one inference request, for a protocol that still has to
        read or decode its request (the REST body), as an ``async with`` block.

        Entering resolves the version (loading it if needed: an unknown model raises
        before anything is counted, so unknown names never become metric labels) and
        counts the request in flight; leaving counts it done with its outcome (``ok``,
        ``client_error`` for 4xx errors, else ``server_error``) and its latency.

        Args:
            name: the model.
            ref: a version number or alias, ``None`` for the served version.

        Returns:
            The request's :class:`Inference`; call its :meth:`Inference.infer` inside the
            block.
        """
        return Inference(self, name, ref)

    async def _target(self, name: str, ref: str | None) -> tuple[int, int | None]:
        """Resolve ``ref`` and make sure that version is loaded.

        Returns:
            ``(version, explicit)``: the version that will answer, and the version to
            pass to the runtime (``None`` for the served one).
        """
        runtime = self.runtime
        if ref is None:
            served = runtime.served_version(name)
            if served is not None:
                return served, None
            generation = runtime.generation(name)  # before the registry: see the module
            version, path = self.registry.resolve(name, None)
            # never overrides a serve() made meanwhile (an alias move, a model deletion)
            await runtime.serve(name, version, path, if_unserved=True, generation=generation)
            served = runtime.served_version(name)
            if served is None:
                raise NotFound(f"model {name!r} was deleted")
            return served, None
        generation = runtime.generation(name)
        version, path = self.registry.resolve(name, ref)
        if not runtime.is_ready(name, version):
            await runtime.load(name, version, path, generation=generation)
        return version, version


class Inference:
    """One inference request between resolving its version and answering it (see
    :meth:`DataPlane.inference`).

    Attributes:
        name: the model.
        version: the version that answers (the served one may move while the request
            is decoded: then the one that ran).
    """

    __slots__ = ("_explicit", "_plane", "_ref", "_started", "name", "version")

    def __init__(self, plane: DataPlane, name: str, ref: str | None) -> None:
        self._plane = plane
        self.name = name
        self._ref = ref
        self._started = 0.0
        self.version = 0
        self._explicit: int | None = None

    async def __aenter__(self) -> Inference:
        plane = self._plane
        self._started = time.perf_counter()
        served = plane.runtime.served_version(self.name) if self._ref is None else None
        if served is not None:
            self.version = served
        else:  # resolve before counting: unknown names must not become metric labels
            self.version, self._explicit = await plane._target(self.name, self._ref)
        plane.metrics.inflight_add(self.name, 1)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        metrics = self._plane.metrics
        metrics.inflight_add(self.name, -1)
        outcome = "ok" if exc is None else _outcome(exc)
        metrics.observe_request(
            self.name, self.version, outcome, time.perf_counter() - self._started
        )

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run ``request`` on the resolved version (resolved again if it was unloaded
        while the request was read).

        Args:
            request: the decoded request.

        Returns:
            The response.

        Raises:
            NotFound, InvalidInput, NotReady: as :meth:`DataPlane.infer`.
        """
        plane = self._plane
        explicit = self._explicit
        if explicit is not None and not plane.runtime.is_ready(self.name, explicit):
            self.version, explicit = await plane._target(self.name, self._ref)
            self._explicit = explicit
        result = await plane.runtime.infer(self.name, explicit, request)
        self.version = int(result.model_version)
        return result
