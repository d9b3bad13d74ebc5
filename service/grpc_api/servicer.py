"""``inference.GRPCInferenceService``: the Open Inference Protocol over gRPC.

Every RPC translates gRPC <-> :class:`~service.dataplane.DataPlane` calls, exactly as the
REST routes do for HTTP: the same version resolution and lazy loading, dynamic batching,
drift sampling, metrics and bearer token (``authorization: Bearer <token>`` in the call's
metadata, as ``tritonclient.grpc`` sends ``headers=``). Health and server metadata need
the token only with ``protect_health``, as over REST. Errors are the service's
:class:`~service.errors.ServiceError` hierarchy, mapped to gRPC status codes by
:func:`service.errors.grpc_error` with the same messages as over REST.

The model repository (``RepositoryIndex``, ``RepositoryModelLoad``,
``RepositoryModelUnload``), model configuration (``ModelConfig``) and statistics
(``ModelStatistics``) extensions answer what the REST routes answer: the data plane's
objects, as Triton's messages (the statistics and the index are parsed from their JSON
form with ``json_format.ParseDict``, so both protocols carry the same numbers). The
``repository_name`` of the repository RPCs must be empty (there is one repository).

The RPCs of extensions recalib does not implement (shared memory, trace, logging) answer
``UNIMPLEMENTED`` with a message naming the extension.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ..auth import bearer_token
from ..dataplane import DataPlane
from ..errors import InvalidInput, NotFound, ServiceError, grpc_error
from .codec import decode_infer_request, encode_infer_response, from_parameters, typed_elements

__all__ = ["INFERENCE_SERVICE", "InferenceServicer", "require_token"]

INFERENCE_SERVICE: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
"""The v2 service's full name, ``inference.GRPCInferenceService`` (also a
``grpc.health.v1`` service name)."""

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return bearer_token(value.decode("latin-1") if isinstance(value, bytes) else value)
    return None


async def require_token(dataplane: DataPlane, context: grpc.aio.ServicerContext) -> None:
    """Check the call's bearer token (its metadata) against the configured one; a missing
    or wrong one aborts the call with the mapped status and the REST message."""
    try:
        dataplane.check_token(_bearer(context))
    except ServiceError as exc:
        await context.abort(*grpc_error(exc))


_DECODE_INLINE_ELEMENTS = 1 << 16
"""Typed-contents requests with more values are decoded in a worker thread."""


def _stream_error(request: Any, message: str) -> Any:
    """A stream's answer to a failed request: the message, and the request's id and model
    (as Triton sends them), so the client can tell which request failed."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            id=request.id, model_name=request.model_name, model_version=request.model_version
        ),
    )


def _ref(version: str) -> str | None:
    return version or None


def _one_repository(name: str) -> None:
    if name:
        raise InvalidInput(
            f"repository_name: this server has one model repository (expected none, "
            f"got {name[:64]!r})"
        )


def _unsupported(extension: str) -> Callable[..., Awaitable[Any]]:
    async def rpc(self: InferenceServicer, request: Any, context: Any) -> Any:  # noqa: ARG001
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"the {extension} extension is not supported by this server",
        )

    return rpc


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The v2 gRPC service over one :class:`DataPlane`.

    Args:
        dataplane: the protocol-neutral data plane the REST routes use too.
    """

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        # without a configured token no call reads its metadata (measured: ~4% of a
        # small model's server CPU per request)
        self._token = dataplane.settings.api_token is not None

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[[], Awaitable[_T]],
        *,
        health: bool = False,
    ) -> _T:
        """Authenticate, run ``work``, and turn service errors into gRPC statuses."""
        try:
            if self._token and (not health or self.dataplane.protect_health):
                self.dataplane.check_token(_bearer(context))
            return await work()
        except ServiceError as exc:
            await context.abort(*grpc_error(exc))
        raise AssertionError("unreachable")  # context.abort raises

    # -- health and metadata -----------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: ARG002
        async def work() -> Any:
            return pb.ServerLiveResponse(live=self.dataplane.live())

        return await self._call(context, work, health=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: ARG002
        async def work() -> Any:
            ready, _ = self.dataplane.ready(show_names=False)
            return pb.ServerReadyResponse(ready=ready)

        return await self._call(context, work, health=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: ARG002
        async def work() -> Any:
            meta = self.dataplane.server_metadata()
            return pb.ServerMetadataResponse(
                name=meta["name"], version=meta["version"], extensions=meta["extensions"]
            )

        return await self._call(context, work, health=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            try:
                ready = await self.dataplane.model_ready(request.name, _ref(request.version))
            except NotFound:
                ready = False  # as Triton: an unknown model is not ready, not an error
            return pb.ModelReadyResponse(ready=ready)

        return await self._call(context, work)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            meta = await self.dataplane.model_metadata(request.name, _ref(request.version))
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
            )

        return await self._call(context, work)

    # -- model configuration and statistics ---------------------------------------------

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            config = await self.dataplane.model_config(request.name, _ref(request.version))
            return pb.ModelConfigResponse(config=config)

        return await self._call(context, work)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            if not request.name and request.version:
                raise InvalidInput("version: expected a model name with it (got none)")
            stats = self.dataplane.model_statistics(request.name or None, _ref(request.version))
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        return await self._call(context, work)

    # -- model repository --------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            _one_repository(request.repository_name)
            index = self.dataplane.repository_index(ready_only=request.ready)
            return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

        return await self._call(context, work)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            _one_repository(request.repository_name)
            parameters = from_parameters(request.parameters)
            await self.dataplane.load_model(request.model_name, parameters)
            return pb.RepositoryModelLoadResponse()

        return await self._call(context, work)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            _one_repository(request.repository_name)
            parameters = from_parameters(request.parameters)
            await self.dataplane.unload_model(request.model_name, parameters)
            return pb.RepositoryModelUnloadResponse()

        return await self._call(context, work)

    # -- inference ---------------------------------------------------------------------

    async def _infer(self, request: Any) -> Any:
        if not request.model_name:
            raise InvalidInput("request: expected a model_name (got none)")
        if typed_elements(request) > _DECODE_INLINE_ELEMENTS:
            # one Python object per typed value: a big message would hold the event
            # loop (REST, gRPC and health probes) for seconds
            decoded = await asyncio.to_thread(decode_infer_request, request)
        else:
            decoded = decode_infer_request(request)
        response = await self.dataplane.infer(
            request.model_name, _ref(request.model_version), decoded
        )
        return encode_infer_response(response)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._call(context, lambda: self._infer(request))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Bidirectional stream: each request is answered as soon as it is done (in
        completion order, matched by ``id``, as Triton does), so concurrent requests of
        one stream are batched together. A failed request answers ``error_message`` and
        the stream goes on."""
        if self._token:
            await require_token(self.dataplane, context)
        answers: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                result = await self._infer(request)
                await answers.put(pb.ModelStreamInferResponse(infer_response=result))
            except ServiceError as exc:
                _, message = grpc_error(exc)
                await answers.put(_stream_error(request, message))
            except Exception:
                log.exception("stream inference failed")
                await answers.put(_stream_error(request, "internal error"))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*list(pending))
            await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await answers.get()
                if item is None:
                    break
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    # -- extensions this server does not implement --------------------------------------

    SystemSharedMemoryStatus = _unsupported("system shared memory")
    SystemSharedMemoryRegister = _unsupported("system shared memory")
    SystemSharedMemoryUnregister = _unsupported("system shared memory")
    CudaSharedMemoryStatus = _unsupported("CUDA shared memory")
    CudaSharedMemoryRegister = _unsupported("CUDA shared memory")
    CudaSharedMemoryUnregister = _unsupported("CUDA shared memory")
    TraceSetting = _unsupported("trace")
    LogSettings = _unsupported("logging")
