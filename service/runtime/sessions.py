"""ONNX Runtime sessions: provider selection, thread settings, signatures, warm-up.

:func:`create_session` builds one :class:`ModelSession` (an ``InferenceSession`` plus its
input/output signature in Open Inference Protocol terms) from the service settings:

* Provider: ``execution_provider="auto"`` asks for CUDA when ONNX Runtime lists
  ``CUDAExecutionProvider`` as available, else CPU; ``"cuda"`` always asks for CUDA;
  ``"cpu"`` for CPU. ONNX Runtime falls back to CPU silently when CUDA cannot be used (not
  built in, libraries missing), so the provider actually in use is read back from
  ``session.get_providers()``. When CUDA was asked for (``"cuda"``, or ``"auto"`` with CUDA
  listed) and is not in use, ``provider_fallback="fail"`` raises
  :class:`ProviderUnavailable` and ``"warn"`` logs a warning and marks the session
  :attr:`ModelSession.fell_back` (the runtime counts it in
  ``recalib_provider_fallbacks_total``). ``"auto"`` on a machine without CUDA is not a
  fallback: CPU is what was asked for.
* Threads: ``intra_op_num_threads`` from the settings (0: ONNX Runtime's default, one per
  physical core), ``inter_op_num_threads=1`` with sequential execution (the graphs are
  chains; parallel branches are not worth a second pool), and intra-op spinning off when
  the session shares its cores with the event loop and other sessions (a spinning pool
  burns the CPU the HTTP side needs between runs).
* Graph optimisation ``ORT_ENABLE_ALL`` (Conv+BN fusion happens here).
* On CUDA, :meth:`ModelSession.run` uses IOBinding: each input is copied to the device
  into an ``OrtValue`` *before* ``run_with_iobinding`` (one synchronous host-to-device copy
  per input, not a staging copy inside the run), outputs are bound to device memory that
  ONNX Runtime allocates at the right shape, and are copied to the host once, after the
  run. ``binding=True`` forces the same path on CPU (tests exercise it there).
* :func:`cuda_usable` says whether CUDA really runs here: ``get_available_providers()``
  lists the providers a build *contains* (an onnxruntime-gpu wheel lists CUDA on a machine
  without a GPU or without the CUDA 13 / cuDNN 9 libraries, then silently runs on CPU).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from ..errors import InvalidInput, NotReady, without_path
from ..settings import Settings

__all__ = [
    "CPU",
    "CUDA",
    "DATATYPES",
    "ModelSession",
    "ProviderUnavailable",
    "TensorSpec",
    "choose_providers",
    "create_session",
    "cuda_usable",
    "session_options",
    "share_cpu_arena",
    "warmup_sizes",
    "zero_inputs",
]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
"""Open Inference Protocol datatype -> NumPy dtype (``BYTES`` has none: not supported)."""

_ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class ProviderUnavailable(NotReady):
    """The requested execution provider is not in use and the settings forbid a fallback."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the Open Inference Protocol describes it.

    Attributes:
        name: the ONNX value name.
        datatype: v2 datatype (``FP32``, ``INT64``, ...; ``BYTES`` for strings, and
            ``UNSUPPORTED:<ort type>`` for types the protocol has no name for).
        shape: dimensions, ``-1`` where the graph leaves a dimension variable.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any] | None:
        """NumPy dtype of the tensor (``None`` for BYTES and unsupported types)."""
        return DATATYPES.get(self.datatype)

    @property
    def batched(self) -> bool:
        """True when axis 0 is variable: requests can be concatenated along it."""
        return len(self.shape) > 0 and self.shape[0] == -1

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type, f"UNSUPPORTED:{arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


@dataclass(frozen=True)
class ProviderChoice:
    """What to ask ONNX Runtime for.

    Attributes:
        requested: the setting (``auto``, ``cpu`` or ``cuda``).
        providers: the provider list passed to ``InferenceSession``.
        wants_cuda: whether CUDA not being in use afterwards is a fallback.
        cuda_listed: whether ONNX Runtime lists CUDA as available (when it does not,
            CUDA is not even passed: ONNX Runtime would only warn and use CPU).
    """

    requested: str
    providers: tuple[str, ...]
    wants_cuda: bool
    cuda_listed: bool


def choose_providers(requested: str, available: Iterable[str]) -> ProviderChoice:
    """The providers to ask for, from the setting and ONNX Runtime's available list.

    Args:
        requested: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        available: ``onnxruntime.get_available_providers()``.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"expected execution provider 'auto', 'cpu' or 'cuda' (got {requested!r})")
    has_cuda = CUDA in set(available)
    if requested == "cuda" and not has_cuda:
        return ProviderChoice(requested, (CPU,), True, False)
    if requested == "cuda" or (requested == "auto" and has_cuda):
        return ProviderChoice(requested, (CUDA, CPU), True, True)
    return ProviderChoice(requested, (CPU,), False, has_cuda)


_ARENA_LOCK = threading.Lock()
_arena_shared = False


def share_cpu_arena() -> None:
    """Register one CPU memory arena with ONNX Runtime's environment (once per process);
    every session of :func:`session_options` allocates from it
    (``session.use_env_allocators``) instead of holding an arena of its own.

    A version serves through up to four sessions (plain, drift-tapped, and the bank
    session and its tapped twin), and each arena would keep its own peak: the activations
    of the largest batch it ran (the warm-up's). Shared, the peak is held once: 10-12 MB
    less RSS on the benchmark's ResNet-ish model at 32x32 (183-186 vs 193-196 MB, drift
    on). Memory freed by an unloaded version stays in the arena for the next one.
    """
    global _arena_shared
    with _ARENA_LOCK:
        if _arena_shared:
            return
        cpu = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # ORT's defaults: no size limit, its extend strategy and chunk sizes
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))
        _arena_shared = True


def session_options(settings: Settings, *, spinning: bool) -> ort.SessionOptions:
    """Thread counts, spinning, graph optimisation and the shared CPU arena
    (:func:`share_cpu_arena`) for one session."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only; provider fallbacks are reported by us
    flag = "1" if spinning else "0"
    share_cpu_arena()
    opts.add_session_config_entry("session.use_env_allocators", "1")  # one arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", flag)
    opts.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return opts


class ModelSession:
    """An ONNX Runtime session, its v2 signature and the provider it runs on.

    Build it with :func:`create_session`. :meth:`run` is thread-safe (ONNX Runtime allows
    concurrent ``run`` calls on one session) and releases the GIL while it computes.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        inputs, outputs: graph signature (outputs in graph order, tap outputs included).
        requested: the ``execution_provider`` setting.
        provider: the provider actually in use (first of ``session.get_providers()``).
        fell_back: CUDA was asked for but the session runs elsewhere (policy "warn").
    """

    def __init__(
        self, session: Any, requested: str, fell_back: bool, *, binding: bool | None = None
    ) -> None:
        self.session = session
        self.inputs = tuple(_spec(a) for a in session.get_inputs())
        self.outputs = tuple(_spec(a) for a in session.get_outputs())
        self.requested = requested
        providers = list(session.get_providers())
        self.provider = providers[0] if providers else CPU
        self.fell_back = fell_back
        self.uses_binding = self.provider == CUDA if binding is None else binding
        self._device = "cuda" if self.provider == CUDA else "cpu"

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def run(
        self,
        feed: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str] | None = None,
        *,
        resident: Mapping[str, Any] | None = None,
    ) -> list[npt.NDArray[Any]]:
        """Run the graph on ``feed`` (input name to array); outputs in ``output_names`` order
        (all graph outputs when ``None``).

        Args:
            feed: host inputs.
            output_names: what to return.
            resident: inputs already on this session's device (``OrtValue`` s from
                :meth:`to_device`, e.g. stat-bank tables), bound as they are; only with
                :attr:`uses_binding` (else put them in ``feed``).
        """
        names = list(output_names) if output_names is not None else self.output_names
        if not self.uses_binding:
            if resident:
                raise ValueError("expected resident inputs only on a session with IOBinding")
            return list(self.session.run(names, dict(feed)))
        binding = self.session.io_binding()
        for name, value in (resident or {}).items():
            binding.bind_ortvalue_input(name, value)
        # Keep the device copies referenced until the run is over.
        staged = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self._device, 0)
            for value in feed.values()
        ]
        for name, value in zip(feed, staged, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, self._device, 0)
        self.session.run_with_iobinding(binding)
        return [value.numpy() for value in binding.get_outputs()]

    def to_device(self, value: npt.NDArray[Any]) -> Any:
        """``value`` copied once into an ``OrtValue`` on this session's device (for
        :meth:`run`'s ``resident``)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self._device, 0)

    def warm_up(self, batch_sizes: Sequence[int], output_names: Sequence[str] | None = None) -> int:
        """Run zero inputs once per batch size (first runs per shape are slow: memory
        planning, cuDNN algorithm search). Returns the number of runs made.

        Inputs whose axis 0 is fixed are run at that size once. Variable non-batch axes
        have no meaningful size to warm up with: such models are not warmed up (logged).

        Raises:
            InvalidInput: a run failed on a model whose input shapes are all known.
        """
        if any(-1 in spec.shape[1:] for spec in self.inputs):
            log.info("warm-up skipped: the model has variable non-batch input dimensions")
            return 0
        if any(spec.dtype is None for spec in self.inputs):
            log.info("warm-up skipped: the model takes non-numeric inputs")
            return 0
        sizes = sorted(set(batch_sizes)) or [1]
        if not all(spec.batched for spec in self.inputs):
            sizes = [0]
        runs = 0
        for size in sizes:
            feed = zero_inputs(self.inputs, size)
            try:
                self.run(feed, output_names)
            except Exception as exc:  # ORT raises its own exception types
                shapes = {k: v.shape for k, v in feed.items()}
                raise InvalidInput(
                    f"expected the model to run on zero inputs of shapes {shapes} "
                    f"(warm-up failed: {exc})"
                ) from exc
            runs += 1
        return runs


def zero_inputs(specs: Sequence[TensorSpec], size: int) -> dict[str, npt.NDArray[Any]]:
    """Zeros for each input of ``specs``, ``size`` rows on a variable axis 0 (a warm-up
    feed; every other dimension must be known and every dtype numeric)."""
    return {
        spec.name: np.zeros(
            tuple(size if (i == 0 and d == -1) else d for i, d in enumerate(spec.shape)),
            dtype=spec.dtype,
        )
        for spec in specs
    }


_PROBE_INPUT = "x"


@cache
def _probe_model() -> bytes:
    """A one-node ``Relu`` graph (IR 8, opset 13: loadable by every supported ORT)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", [_PROBE_INPUT], ["y"])],
        "cuda_probe",
        [helper.make_tensor_value_info(_PROBE_INPUT, TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return bytes(model.SerializeToString())


@cache
def cuda_usable() -> bool:
    """Whether ONNX Runtime can really run on CUDA here (cached for the process).

    ``CUDAExecutionProvider`` in ``get_available_providers()`` only says the build has it;
    this builds a one-node session on CUDA and checks that CUDA is the provider it got
    (ONNX Runtime falls back to CPU silently when the driver, a GPU, or the CUDA / cuDNN
    libraries are missing).
    """
    if CUDA not in ort.get_available_providers():
        return False
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the probe's failure is the answer, not an error
    try:
        session = ort.InferenceSession(_probe_model(), sess_options=opts, providers=[CUDA, CPU])
    except Exception:  # ORT raises its own (non-exported) exception types
        log.debug("CUDA probe session failed", exc_info=True)
        return False
    return bool(session.get_providers()) and session.get_providers()[0] == CUDA


def warmup_sizes(settings: Settings) -> list[int]:
    """``settings.warmup_batch_sizes`` clipped to ``max_batch_size``, deduplicated, sorted
    (one run at batch size 1 when dynamic batching is off)."""
    if not settings.dynamic_batching:
        return [1]
    return sorted({min(max(1, b), settings.max_batch_size) for b in settings.warmup_batch_sizes})


def create_session(
    model: str | Path | bytes,
    settings: Settings,
    *,
    label: str = "model",
    spinning: bool = False,
) -> ModelSession:
    """Build a session on the configured provider and check which one it got.

    Args:
        model: an ``.onnx`` path or serialized ``ModelProto`` bytes.
        settings: ``execution_provider``, ``provider_fallback``, ``intra_op_threads``.
        label: how the model is named in log lines and errors (e.g. ``"demo v3"``).
        spinning: let idle intra-op threads spin (only worth it on dedicated cores).

    Raises:
        InvalidInput: ONNX Runtime cannot load the model.
        ProviderUnavailable: CUDA was asked for, is not in use, and the policy is "fail".
    """
    available = list(ort.get_available_providers())
    choice = choose_providers(settings.execution_provider, available)
    wanted = f"{label}: expected a session on {CUDA} (execution_provider={choice.requested!r})"
    strict = settings.provider_fallback == "fail"
    if choice.wants_cuda and not choice.cuda_listed and strict:
        raise ProviderUnavailable(
            f"{wanted}, but this ONNX Runtime build does not provide it (available: "
            f"{available}; install onnxruntime-gpu, not both onnxruntime and onnxruntime-gpu); "
            "provider_fallback='fail' refuses to serve"
        )
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(
            source,
            sess_options=session_options(settings, spinning=spinning),
            providers=list(choice.providers),
        )
    except Exception as exc:  # ORT raises its own (non-exported) exception types
        text = without_path(str(exc), model) if isinstance(model, Path) else str(exc)
        if CUDA in choice.providers and strict:
            raise ProviderUnavailable(f"{wanted}, but ONNX Runtime failed: {text}") from exc
        raise InvalidInput(f"{label}: ONNX Runtime cannot load the model: {text}") from exc
    actual = list(session.get_providers())
    fell_back = choice.wants_cuda and (not actual or actual[0] != CUDA)
    if fell_back:
        message = (
            f"{wanted}, but the session runs on {actual[0] if actual else 'nothing'} "
            f"(available providers: {available})"
        )
        if strict:
            raise ProviderUnavailable(message + "; provider_fallback='fail' refuses to serve")
        log.warning("%s; falling back (provider_fallback='warn')", message)
    result = ModelSession(session, choice.requested, fell_back)
    log.info("%s: session on %s (requested %s)", label, result.provider, result.requested)
    return result
