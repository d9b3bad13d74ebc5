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

Readiness never loads a version named explicitly: ``model_readiness(name, "2")`` answers
from the runtime (loaded: ready; loading, failed or not loaded yet: not ready, with the
last load failure as the reason). Only the served version (``ref=None``) is loaded on
first use, as inference would - unless the repository extension unloaded the model.

Extensions beyond the core protocol (listed in :data:`EXTENSIONS`):

* model repository - :meth:`DataPlane.repository_index` (every registered version with
  its state ``READY`` / ``LOADING`` / ``UNAVAILABLE`` and a reason),
  :meth:`DataPlane.load_model` (serve the production version: loaded and warmed up, then
  traffic moves, as a promote does) and :meth:`DataPlane.unload_model` (stop serving:
  every loaded version is dropped once its in-flight requests finish, and the model
  leaves server readiness; nothing is deleted, and the next unversioned inference, a
  load or a promote serves it again);
* model configuration - :meth:`DataPlane.model_config`, Triton's ``ModelConfig``
  (:mod:`service.triton_config`);
* statistics - :meth:`DataPlane.model_statistics`, Triton's per version counters
  (:mod:`service.runtime.stats`).

Request parameters the server does not honour (sequences, priority, timeout) are refused
(:func:`~service.runtime.tensors.check_parameters`), never silently ignored.

Examples::

    >>> plane = DataPlane(settings, registry, runtime, metrics)
    >>> plane.check_token(presented)                       # raises Unauthorized
    >>> response = await plane.infer("demo", None, request)
    >>> async with plane.inference("demo", "2") as call:  # body read inside the window
    ...     response = await call.infer(decode(await read_body()))
"""

from __future__ import annotations

import asyncio
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from .auth import check_bearer
from .errors import (
    GenerationMoved,
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    Unauthorized,
)
from .metrics import PhaseStats, ServiceMetrics, error_reason
from .names import check_name, is_number
from .runtime.sessions import CUDA, TensorSpec
from .runtime.stats import ModelStats
from .runtime.tensors import InferRequest, InferResponse, check_parameters
from .settings import Settings
from .triton_config import model_config as triton_model_config

__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "DataPlane",
    "Inference",
    "InferenceRuntime",
    "ModelResolver",
    "VersionLister",
    "server_version",
]

_RESOLUTIONS = 3
"""Resolutions a request makes when unloads keep overtaking its load."""

SERVER_NAME = "recalib"
"""The ``name`` of the server metadata."""

EXTENSIONS = ("binary_tensor_data", "model_repository", "model_configuration", "statistics")
"""The protocol extensions the server metadata lists (what the server implements)."""

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"
"""The repository index's version states (Triton's names)."""


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


@runtime_checkable
class VersionLister(Protocol):
    """A resolver that can also list a model's versions (the registry). With one that
    cannot, metadata and the repository index list the production version only."""

    def version_numbers(self, name: str) -> list[int]:
        """Every version of ``name``, ascending; raises NotFound."""
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

    def is_loading(self, name: str, version: int) -> bool: ...

    def load_error(self, name: str, version: int) -> str | None: ...

    async def unload_model(self, name: str) -> None: ...

    def statistics(self, name: str | None = None) -> list[tuple[str, int, ModelStats]]: ...

    def signature(
        self, name: str, version: int | None = None
    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], str]: ...

    async def infer(
        self, name: str, version: int | None, request: InferRequest
    ) -> InferResponse: ...


def _outcome(exc: BaseException) -> str:
    """The ``outcome`` label of a failed request: 4xx errors are the client's, and so is
    a caller that went away (cancelled: nginx's 499), which must not page anyone."""
    if isinstance(exc, ServiceError) and 400 <= exc.status < 500:
        return "client_error"
    if isinstance(exc, asyncio.CancelledError):
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
        # models the repository extension unloaded (and nothing served since)
        self._unloaded: set[str] = set()
        metrics.watch_readiness(self._readiness)  # recalib_ready, recalib_model_ready
        if hasattr(runtime, "statistics"):  # the control-plane fakes of the tests have none
            metrics.watch_statistics(self._loaded_statistics)  # the compute split

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
        and every model of ``expect_models`` is registered and loaded - except models the
        repository extension unloaded (:meth:`unload_model`), which are not waited for
        until something serves them again.

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
        ready, models = self._readiness()
        if ready:
            return True, []
        waiting = sorted(name for name, up in models.items() if not up)
        return False, waiting if show_names else None

    def model_serving(self, name: str) -> bool | None:
        """Whether model ``name`` answers inference now (its served version is loaded),
        for health probes: nothing is loaded or resolved to answer it.

        Returns:
            ``None`` for a name that is neither registered nor in ``expect_models``;
            False while it is not loaded yet, failed to load or was unloaded.
        """
        if name not in self.settings.expect_models and name not in self.registry.model_names():
            return None
        return self.runtime.started and self.runtime.served_version(name) is not None

    def _readiness(self) -> tuple[bool, dict[str, bool]]:
        """``(ready, {model: served})`` over the models :meth:`ready` waits for (the
        ``recalib_ready`` / ``recalib_model_ready`` gauges read it at scrape time)."""
        if not self.runtime.started:
            return False, {}
        registered = set(self.registry.model_names())
        unloaded = self._still_unloaded(registered)
        names = (registered | set(self.settings.expect_models)) - unloaded
        served = self.runtime.served_version
        models = {name: served(name) is not None for name in names}
        return all(models.values()), models

    def _loaded_statistics(self) -> list[tuple[str, int, PhaseStats]]:
        """The runtime's counters of its loaded versions (retired ones export nothing)."""
        runtime = self.runtime
        return [
            (name, version, stats)
            for name, version, stats in runtime.statistics()
            if runtime.is_ready(name, version)
        ]

    def server_metadata(self) -> dict[str, Any]:
        """``{name, version, extensions}`` of the server."""
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    async def model_metadata(self, name: str, ref: str | None) -> dict[str, Any]:
        """Metadata of a version (loaded first if needed): ``name``, ``versions`` (every
        registered version), ``platform``, ``inputs``, ``outputs`` (``-1`` for variable
        dimensions) and ``parameters`` (``version``: the one described).

        Args:
            name: the model.
            ref: a version number or alias, ``None`` for the served version.

        Returns:
            The protocol's model metadata object.

        Raises:
            NotFound: unknown model, version or alias (or deleted meanwhile).
            InvalidInput: the version's file does not load.
        """
        version, explicit = await self._target(name, ref)
        meta = self.runtime.metadata(name, explicit)
        return {**meta, "versions": [str(v) for v in self._versions(name, version)]}

    async def model_ready(self, name: str, ref: str | None) -> bool:
        """Whether a version can answer now (the served version is loaded on first call;
        a version named by ``ref`` never is, see the module).

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
        a failed load, or that the model was unloaded (``None`` when ready or merely not
        loaded yet).

        Raises:
            InvalidInput: a malformed model name or version reference.
            NotFound: unknown model, version or alias.
        """
        # a malformed name or reference is an error, not a "not ready"
        check_name(name, "model name")
        if ref is not None and not is_number(ref):
            check_name(ref, "version number or alias")
        runtime = self.runtime
        if ref is not None:  # answered without loading it
            version, _ = self.registry.resolve(name, ref)
            if runtime.is_ready(name, version):
                return True, None
            return False, runtime.load_error(name, version)
        if name in self._unloaded and runtime.served_version(name) is None:
            self.registry.resolve(name, None)  # NotFound once deleted
            return False, _unloaded_reason(name)
        try:
            _, explicit = await self._target(name, None)
        except NotFound:
            raise
        except ServiceError as exc:
            return False, exc.message
        return runtime.is_ready(name, explicit), None

    # -- model configuration and statistics ----------------------------------------------

    async def model_config(self, name: str, ref: str | None) -> Any:
        """Triton's ``inference.ModelConfig`` of a version (loaded first if needed):
        ``max_batch_size`` and dims without the batch axis when every input and output
        has a variable axis 0, ``dynamic_batching`` when the service batches, one
        instance on the CPU or GPU (see :func:`service.triton_config.model_config`).

        Raises:
            NotFound, InvalidInput: as :meth:`model_metadata`.
        """
        _, explicit = await self._target(name, ref)
        inputs, outputs, provider = self.runtime.signature(name, explicit)
        settings = self.settings
        return triton_model_config(
            name,
            inputs,
            outputs,
            max_batch_size=settings.max_batch_size,
            dynamic_batching=settings.dynamic_batching,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            gpu=provider == CUDA,
        )

    def model_statistics(self, name: str | None, ref: str | None = None) -> list[dict[str, Any]]:
        """Triton's statistics (``model_stats`` entries) of versions that answered.

        Args:
            name: the model; ``None`` for every registered model's loaded versions.
            ref: a version number or alias (``None``: every version of ``name`` that was
                loaded; the production version's zeros if none was).

        Returns:
            One object per version (:meth:`service.runtime.stats.ModelStats.to_dict`), by
            model and version; a version never loaded has zeros. Counters start when a
            version is loaded and end when the model is unloaded or deleted.

        Raises:
            NotFound: unknown model, version or alias; InvalidInput: a malformed one.
        """
        runtime = self.runtime
        if name is None:
            registered = set(self.registry.model_names())
            if not registered:
                return []
            return [s.to_dict(n, v) for n, v, s in runtime.statistics() if n in registered]
        check_name(name, "model name")
        version, _ = self.registry.resolve(name, ref)  # NotFound for an unknown model
        found = runtime.statistics(name)
        if ref is None and found:
            return [s.to_dict(n, v) for n, v, s in found]
        for n, v, s in found:
            if v == version:
                return [s.to_dict(n, v)]
        return [ModelStats.empty(name, version)]

    # -- model repository ----------------------------------------------------------------

    def repository_index(self, *, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every registered version and its state, by model and version.

        Args:
            ready_only: only the versions that are ``READY``.

        Returns:
            ``{name, version, state, reason}`` objects: ``READY`` (loaded, reason ``""``),
            ``LOADING``, or ``UNAVAILABLE`` with the reason (the last load failure,
            ``unloaded``, or ``not loaded``: explicit versions load on first use).
        """
        runtime = self.runtime
        registered = self.registry.model_names()
        unloaded = self._still_unloaded(set(registered))
        entries: list[dict[str, Any]] = []
        for name in registered:
            try:
                versions = self._versions(name)
            except NotFound:  # deleted meanwhile
                continue
            for version in versions:
                if runtime.is_ready(name, version):
                    state, reason = READY, ""
                elif runtime.is_loading(name, version):
                    state, reason = LOADING, "loading"
                else:
                    error = runtime.load_error(name, version)
                    state = UNAVAILABLE
                    reason = error or ("unloaded" if name in unloaded else "not loaded")
                if ready_only and state != READY:
                    continue
                entries.append(
                    {"name": name, "version": str(version), "state": state, "reason": reason}
                )
        return entries

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Serve ``name``'s production version: loaded and warmed up, then unversioned
        requests move to it (as a promote does); a no-op when it is served already.

        Args:
            name: the model.
            parameters: the load request's parameters; none are supported (Triton's
                ``config`` and ``file:`` overrides are refused).

        Raises:
            NotFound: unknown model (or deleted meanwhile).
            InvalidInput: a parameter, or the version's file does not load.
        """
        check_name(name, "model name")
        for key in parameters or {}:
            raise InvalidInput(
                f"load parameter {key!r}: not supported by this server (a load serves the "
                "registered production version; expected no parameters)"
            )
        runtime = self.runtime
        generation = runtime.generation(name)  # before the registry: see the module
        version, path = self.registry.resolve(name, None)
        self._unloaded.discard(name)
        await runtime.serve(name, version, path, generation=generation)

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Stop serving ``name``: every loaded version is dropped once its in-flight
        requests finish, its statistics end, and the server's readiness stops waiting
        for it. The registry keeps it: the next unversioned inference (loaded on first
        use), :meth:`load_model` or a promote serves it again.

        Args:
            name: the model.
            parameters: ``unload_dependents`` (accepted: a model has no dependents);
                anything else is refused.

        Raises:
            NotFound: unknown model; InvalidInput: an unsupported parameter.
        """
        check_name(name, "model name")
        for key in parameters or {}:
            if key != "unload_dependents":
                raise InvalidInput(
                    f"unload parameter {key!r}: not supported by this server (expected "
                    "none, or unload_dependents)"
                )
        self.registry.resolve(name, None)  # NotFound for an unknown model
        self._unloaded.add(name)
        await self.runtime.unload_model(name)
        self._unloaded.add(name)  # again: a request may have served it meanwhile

    def _still_unloaded(self, registered: set[str]) -> set[str]:
        """The unloaded models that are still registered and not served (the others are
        forgotten: served again, or deleted)."""
        if self._unloaded:
            served = self.runtime.served_version
            self._unloaded = {n for n in self._unloaded if n in registered and served(n) is None}
        return self._unloaded

    def _versions(self, name: str, also: int | None = None) -> list[int]:
        """Every version of ``name``; from a resolver that cannot list them, the
        production version (and ``also``)."""
        registry = self.registry
        if isinstance(registry, VersionLister):
            return registry.version_numbers(name)
        version, _ = registry.resolve(name, None)
        return sorted({version} if also is None else {version, also})

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
        ``client_error`` for 4xx errors and cancelled callers, else ``server_error``), its
        ``reason`` (the error's class, :func:`~service.metrics.error_reason`) and its
        latency.

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

        A load that an unload overtook (:class:`GenerationMoved`) is resolved again, so a
        model unloaded through the repository extension is loaded back for the request
        (as after a restart) and only a deleted one answers 404 (the registry's
        "not found" on the next resolution).

        Returns:
            ``(version, explicit)``: the version that will answer, and the version to
            pass to the runtime (``None`` for the served one).
        """
        for _ in range(_RESOLUTIONS):
            try:
                return await self._target_once(name, ref)
            except GenerationMoved:
                continue
        # still registered (a deletion would have been "not found" above): unloads keep
        # overtaking the load - a retry can succeed, so not a 404
        raise NotReady(f"model {name!r} was unloaded {_RESOLUTIONS} times while it loaded: retry")

    async def _target_once(self, name: str, ref: str | None) -> tuple[int, int | None]:
        runtime = self.runtime
        if ref is None:
            served = runtime.served_version(name)
            if served is not None:
                return served, None
            generation = runtime.generation(name)  # before the registry: see the module
            version, path = self.registry.resolve(name, None)
            # never overrides a serve() made meanwhile (an alias move, a model deletion)
            self._unloaded.discard(name)
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
            self.name,
            self.version,
            outcome,
            time.perf_counter() - self._started,
            reason=error_reason(exc),
        )

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run ``request`` on the resolved version (resolved again if it was unloaded
        while the request was read).

        Args:
            request: the decoded request.

        Returns:
            The response.

        Raises:
            NotFound, InvalidInput, NotReady: as :meth:`DataPlane.infer` (InvalidInput
                too for a request parameter the server does not honour).
        """
        check_parameters(request.parameters)
        plane = self._plane
        explicit = self._explicit
        unloaded = (
            plane.runtime.served_version(self.name) is None
            if explicit is None
            else not plane.runtime.is_ready(self.name, explicit)
        )
        if unloaded:  # meanwhile (an unload, a delete): resolve again
            self.version, explicit = await plane._target(self.name, self._ref)
            self._explicit = explicit
        result = await plane.runtime.infer(self.name, explicit, request)
        self.version = int(result.model_version)
        return result


def _unloaded_reason(name: str) -> str:
    return (
        f"model {name!r} is unloaded (the model repository extension's load, a promote, "
        "or an inference serves it again)"
    )
