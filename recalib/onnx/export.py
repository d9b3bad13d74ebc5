"""ONNX export that keeps every BatchNorm as a node, names it, and checks itself.

:func:`export_onnx` writes a model whose BN / BatchRenorm layers each appear as an ONNX
``BatchNormalization`` node reading the layer's ``running_mean`` / ``running_var`` from
initializers, so the statistics can be recalibrated in the ONNX file and read by the
drift monitor. Torch folds BN into the preceding Conv when it constant-folds (the
default), so the export runs the TorchScript exporter with constant folding off::

    torch.onnx.export(module, args, f, dynamo=False, do_constant_folding=False,
                      training=TrainingMode.PRESERVE, opset_version=17, ...)

with the module in eval mode. ONNX Runtime fuses Conv+BN itself when it loads the file,
so keeping the nodes costs nothing at serving time.

Which node belongs to which layer is not taken from the exporter's names. During the
export the ``k``-th layer's statistics hold a fingerprint, ``mean = -(1 + k)`` and
``var = 1.5 + k`` in every channel (exact in float32, and in fp16 up to ~1000 layers);
the values each node reads name its layer, then the real statistics are written into
the node's own initializers and the layer's buffers restored. The TorchScript exporter
deduplicates equal initializers (through ``Identity`` nodes), so the nodes are first
given initializers of their own (:func:`recalib.onnx.names.untie_bn_stats`). The map is
stored in the file (see :mod:`recalib.onnx.names`).

A forward may return a tensor, a tuple or list, a dict or namedtuple, or nests of them:
each tensor becomes one graph output, named by its place (see :func:`export_onnx`).

The check: ``onnx.checker.check_model(full_check=True)``, then ONNX Runtime (CPU) against
torch on the example inputs and, with a dynamic batch axis, on a batch one larger. An
element of any output passes when ``|ort - torch| <= atol + rtol * |torch|`` (numpy's
``allclose``); the file is written only when every element of every output passes.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.jit import TracerWarning  # type: ignore[attr-defined]
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import (
    BatchNormFoldedError,
    ExportError,
    ExportParityError,
    NoBatchNormError,
)
from ..modes import eval_mode
from .names import (
    VERSION_KEY,
    BnGraphError,
    BnNodeInfo,
    _set_metadata,
    bn_node_stats,
    read_bn_map,
    set_bn_node_stats,
    untie_bn_stats,
    write_bn_map,
)

__all__ = [
    "BatchNormFoldedError",
    "BnGraphError",
    "BnNodeInfo",
    "ExportError",
    "ExportParityError",
    "ExportReport",
    "bn_node_stats",
    "export_onnx",
    "read_bn_map",
    "set_bn_node_stats",
]

logger = logging.getLogger(__name__)

_PRODUCER_KEY = "recalib.producer"


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked it.

    Args:
        path: the ONNX file.
        opset: the default-domain opset.
        input_names / output_names: the graph's inputs and outputs.
        input_shapes / output_shapes: their shapes; a dynamic axis is its name (``"batch"``).
        bn_nodes: number of ``BatchNormalization`` nodes with stored statistics.
        bn_map: ``{node: {"layer", "mean", "var", "channels"}}``, as stored in the file.
        max_abs_err: per output, ``max |ort - torch|`` over the batch sizes checked.
        max_rel_err: per output, ``max |ort - torch| / max |torch|`` over the batch sizes.
        batch_sizes: the batch sizes run through ONNX Runtime (empty without a check).
        rtol / atol: the tolerance of the check.
        seconds: wall time of the whole export and check.
    """

    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[list[int | str | None]]
    output_shapes: list[list[int | str | None]]
    bn_nodes: int
    bn_map: dict[str, dict[str, str | int]]
    max_abs_err: dict[str, float] = field(default_factory=dict)
    max_rel_err: dict[str, float] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


@dataclass
class _Layer:
    """A BN layer's live statistics buffers and how many times the forward calls it."""

    name: str
    mean: Tensor
    var: Tensor
    calls: int = 0


# --------------------------------------------------------------------------- inputs
def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, Tensor) for a in args):
        kinds = [type(a).__name__ for a in args]
        raise ExportError(f"expected a tensor or a tuple of tensors as inputs (got {kinds})")
    return args


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _join(prefix: str | None, part: str) -> str:
    return part if prefix is None else f"{prefix}.{part}"


def _output_leaves(out: object, prefix: str | None = None) -> list[tuple[str, Tensor]]:
    """The forward's output as ``(name, tensor)`` pairs, depth first, in output order.

    A tensor is ``output``; a tuple or list gives ``output_<i>``; a dict its keys and a
    namedtuple its fields; nested levels are joined with ``.`` (``aux.0``, ``output_1.0``).
    """
    if isinstance(out, Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif _is_namedtuple(out):
        items = [(f, getattr(out, f)) for f in out._fields]  # type: ignore[attr-defined]
    elif isinstance(out, tuple | list):
        stem = [f"output_{i}" for i in range(len(out))] if prefix is None else None
        leaves: list[tuple[str, Tensor]] = []
        for i, v in enumerate(out):
            leaves += _output_leaves(v, stem[i] if stem is not None else _join(prefix, str(i)))
        return leaves
    else:
        where = f" at {prefix!r}" if prefix is not None else ""
        raise ExportError(
            "expected the forward to return tensors, possibly in tuples, lists, dicts or "
            f"namedtuples (got {type(out).__name__}{where})"
        )
    return [leaf for name, v in items for leaf in _output_leaves(v, _join(prefix, name))]


def _flat_outputs(out: object) -> list[Tensor]:
    leaves = [t for _, t in _output_leaves(out)]
    if not leaves:
        raise ExportError(f"expected the forward to return at least one tensor (got {out!r})")
    return leaves


def _is_flat(out: object) -> bool:
    """A tensor or a plain tuple/list of tensors: the exporter's own output order."""
    if isinstance(out, Tensor):
        return True
    if isinstance(out, tuple | list) and not _is_namedtuple(out):
        return all(isinstance(o, Tensor) for o in out)
    return False


class _FlatOutputs(nn.Module):
    """Runs a model and returns its output's tensors as one flat tuple (named outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = False  # TrainingMode.PRESERVE reads the exported module's flag

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return tuple(_flat_outputs(self.model(*args)))


def _names(given: Sequence[str] | None, defaults: list[str], what: str) -> list[str]:
    names = list(defaults if given is None else given)
    if len(names) != len(defaults) or len(set(names)) != len(names):
        hint = f"; pass {what}_names" if given is None else ""
        raise ExportError(f"expected {len(defaults)} distinct {what} names (got {names}){hint}")
    return names


def _grown_batch(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The example with its first sample appended: batch ``B + 1``."""
    for a in args:
        if a.dim() == 0:
            raise ExportError("expected inputs with a batch axis for dynamic_batch (got 0D input)")
    return tuple(torch.cat([a, a[:1]]) for a in args)


# --------------------------------------------------------------------------- the layers
def _module_layers(model: nn.Module, args: tuple[Tensor, ...]) -> tuple[list[_Layer], object]:
    """BN layers with running statistics, counted by a reference forward (eval, no_grad)."""
    layers: list[_Layer] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            layer = _Layer(name, module.running_mean, module.running_var)  # type: ignore[arg-type]
            layers.append(layer)
            handles.append(module.register_forward_hook(_counter(layer)))
    if not layers:
        raise NoBatchNormError(
            "expected a model with BatchNorm/BatchRenorm layers that track running statistics "
            f"(got {type(model).__name__} with none); there is nothing for the export to keep"
        )
    try:
        outputs = model(*args)
        _flat_outputs(outputs)
    finally:
        for h in handles:
            h.remove()
    # Lazy layers materialise their buffers in that first forward: read them afterwards.
    for layer in layers:
        module = model.get_submodule(layer.name)
        layer.mean, layer.var = module.running_mean, module.running_var  # type: ignore[assignment]
    return [lay for lay in layers if lay.calls > 0], outputs


def _check_batch_stat_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not module.track_running_stats:
            raise ExportError(
                f"layer {name!r} normalizes with batch statistics (track_running_stats=False), "
                "which torch's exporter supports only with a static batch: expected "
                "dynamic_batch=False for this model"
            )


def _counter(layer: _Layer) -> Any:
    def hook(*_: object) -> None:
        layer.calls += 1

    return hook


_BN_TARGETS = (
    "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default",
    "aten._native_batch_norm_legit.default",
    "aten._native_batch_norm_legit_functional.default",
    "aten.native_batch_norm.default",
)


def _program_layers(ep: torch.export.ExportedProgram, module: nn.Module) -> list[_Layer]:
    """BN calls of an exported program, found in its graph (it has no BN modules)."""
    buffers = ep.graph_signature.inputs_to_buffers
    layers: dict[str, _Layer] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _BN_TARGETS:
            continue
        mean, var = node.args[3], node.args[4]
        if mean is None or var is None:
            continue  # no running statistics: batch statistics in eval too
        no_training = "no_training" in str(node.target)
        if not no_training and bool(node.args[5]):
            raise ExportError(
                f"the ExportedProgram normalizes with batch statistics at {node.name!r} "
                "(exported in training mode); expected torch.export.export(model.eval(), ...)"
            )
        fqn = buffers.get(str(mean))
        if fqn is None or str(var) not in buffers:
            raise ExportError(
                f"expected the statistics of {node.name!r} to be module buffers "
                f"(got {mean}, {var} that are not); export a model whose BN layers own them"
            )
        name = fqn.removesuffix(".running_mean")
        if name not in layers:
            layers[name] = _Layer(
                name, module.get_buffer(fqn), module.get_buffer(buffers[str(var)])
            )
        layers[name].calls += 1
    if not layers:
        raise NoBatchNormError(
            "expected an ExportedProgram with BatchNorm calls that use running statistics "
            "(got none); there is nothing for the export to keep"
        )
    return list(layers.values())


def _check_program_batch(ep: torch.export.ExportedProgram) -> None:
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and isinstance(val, Tensor):
            if val.dim() > 0 and isinstance(val.shape[0], int):
                raise ExportError(
                    f"expected a dynamic batch axis in the ExportedProgram (got a static "
                    f"batch of {val.shape[0]} for input {node.name!r}); export it with "
                    "dynamic_shapes={...: {0: torch.export.Dim('batch')}} or pass "
                    "dynamic_batch=False"
                )


# --------------------------------------------------------------------------- fingerprints
def _numpy(t: Tensor) -> np.ndarray:
    """A float64 copy (exact for every float dtype; numpy has no bfloat16)."""
    return t.detach().cpu().double().numpy()


def _fingerprint(k: int) -> tuple[float, float]:
    """The ``(mean, var)`` that name layer ``k``: distinct per layer, never 0 or 1."""
    return -(1.0 + k), 1.5 + k


def _decode(mean: np.ndarray, var: np.ndarray) -> int | None:
    m, v = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    if m.size == 0 or v.size == 0 or np.ptp(m) != 0 or np.ptp(v) != 0:
        return None
    k = -m.flat[0] - 1.0
    if k < 0 or k != int(k) or (m.flat[0], v.flat[0]) != _fingerprint(int(k)):
        return None
    return int(k)


@contextlib.contextmanager
def _fingerprinted(layers: list[_Layer]) -> Iterator[None]:
    """Give each layer's statistics values that name it; restore them on exit."""
    saved = [(lay.mean.detach().clone(), lay.var.detach().clone()) for lay in layers]
    try:
        with torch.no_grad():
            for k, lay in enumerate(layers):
                mean, var = _fingerprint(k)
                lay.mean.fill_(mean)
                lay.var.fill_(var)
            for k, lay in enumerate(layers):
                if _decode(_numpy(lay.mean), _numpy(lay.var)) != k:
                    raise ExportError(
                        f"cannot tag layer {lay.name!r} (BN layer {k} of {len(layers)}): its "
                        f"{lay.mean.dtype} statistics cannot hold {_fingerprint(k)} exactly, or "
                        "share their tensors with another layer; expected layers that own "
                        "their buffers (and float32 for more than ~120 bf16 / ~1000 fp16 layers)"
                    )
        yield
    finally:
        with torch.no_grad():
            for lay, (old_mean, old_var) in zip(layers, saved, strict=True):
                lay.mean.copy_(old_mean)
                lay.var.copy_(old_var)


# --------------------------------------------------------------------------- export
def _torch_export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    *,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    from_program: bool,
) -> onnx.ModelProto:
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="recalib-export-") as tmp, warnings.catch_warnings():
        # Known and harmless on torch 2.13: the TorchScript exporter announces its own
        # deprecation, and ExportedProgram.module()'s shape guards (torch._assert on a
        # tensor) are traced as constants.
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings(
            "ignore", message="The feature will be removed", category=DeprecationWarning
        )
        if from_program:
            warnings.filterwarnings("ignore", category=TracerWarning, module="torch$")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            args,
            path,
            dynamo=False,
            do_constant_folding=False,  # folding merges BN into the preceding Conv
            training=torch.onnx.TrainingMode.PRESERVE,  # set by eval_mode
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
        )
        return onnx.load(path)


def _identify(proto: onnx.ModelProto, layers: list[_Layer]) -> dict[str, str]:
    """``{node: layer name}`` from the fingerprints; BN nodes must match BN calls 1:1."""
    untie_bn_stats(proto)
    stats = bn_node_stats(proto)
    expected = sum(lay.calls for lay in layers)
    if len(stats) < expected:
        raise BatchNormFoldedError(
            f"expected {expected} BatchNormalization nodes, one per BN call of "
            f"{len(layers)} layers (got {len(stats)} in the exported graph): BN was folded "
            "into the preceding Conv/Gemm. Keep it with torch.onnx.export(..., dynamo=False, "
            "do_constant_folding=False) or dynamo=True, optimize=False, and do not run "
            "graph optimizers (onnxsim, fuse_bn_into_conv) on the file"
        )
    names: dict[str, str] = {}
    for node, (mean, var) in stats.items():
        k = _decode(mean, var)
        if k is None or k >= len(layers):
            raise ExportError(
                f"BatchNormalization node {node!r} reads statistics of no BN layer of the "
                f"model (expected one node per BN call, {expected} in all; got {len(stats)})"
            )
        names[node] = layers[k].name
    if len(stats) != expected or set(names.values()) != {lay.name for lay in layers}:
        raise ExportError(
            f"expected {expected} BatchNormalization nodes covering layers "
            f"{sorted(lay.name for lay in layers)} (got {len(stats)} nodes for "
            f"{sorted(set(names.values()))})"
        )
    return names


def _write_real_stats(proto: onnx.ModelProto, names: dict[str, str], layers: list[_Layer]) -> None:
    by_name = {lay.name: lay for lay in layers}
    set_bn_node_stats(
        proto,
        {
            node: (
                _numpy(by_name[layer].mean),
                _numpy(by_name[layer].var),
            )
            for node, layer in names.items()
        },
    )


def _recalib_version() -> str:
    try:
        return metadata.version("recalib")
    except metadata.PackageNotFoundError:
        return "unknown"


def _shapes(values: Sequence[onnx.ValueInfoProto]) -> list[list[int | str | None]]:
    out: list[list[int | str | None]] = []
    for v in values:
        dims = v.type.tensor_type.shape.dim
        out.append([d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims])
    return out


# --------------------------------------------------------------------------- the check
def _run_onnxruntime(
    model_bytes: bytes, names: list[str], args: tuple[Tensor, ...]
) -> list[np.ndarray]:
    import onnxruntime as ort  # lazily: the export itself does not need it

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
    feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True) if n in wanted}
    return [np.asarray(o) for o in session.run(None, feed)]


def _errors(
    got: np.ndarray, ref: np.ndarray, rtol: float, atol: float
) -> tuple[float, float, bool]:
    """``(max abs err, max abs err / max |ref|, allclose)``; non-finite must match exactly."""
    if got.shape != ref.shape:
        return float("inf"), float("inf"), False
    g, r = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(g) & np.isfinite(r)
    if not np.array_equal(g[~finite], r[~finite], equal_nan=True):
        return float("inf"), float("inf"), False
    diff = np.abs(g[finite] - r[finite])
    if diff.size == 0:
        return 0.0, 0.0, True
    scale = float(np.abs(r[finite]).max())
    max_abs = float(diff.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = bool(np.all(diff <= atol + rtol * np.abs(r[finite])))
    return max_abs, max_rel, ok


def _check(
    proto: onnx.ModelProto,
    module: nn.Module,
    input_names: list[str],
    batches: list[tuple[tuple[Tensor, ...], list[Tensor]]],
    report: ExportReport,
) -> None:
    onnx.checker.check_model(proto, full_check=True)
    model_bytes = proto.SerializeToString()
    failed: list[str] = []
    for args, reference in batches:
        if not reference:
            with torch.no_grad():
                reference = _flat_outputs(module(*args))
        got = _run_onnxruntime(model_bytes, input_names, args)
        report.batch_sizes.append(int(args[0].shape[0]) if args[0].dim() else 1)
        for name, o, r in zip(report.output_names, got, reference, strict=True):
            abs_err, rel_err, ok = _errors(o, r.detach().cpu().numpy(), report.rtol, report.atol)
            report.max_abs_err[name] = max(report.max_abs_err.get(name, 0.0), abs_err)
            report.max_rel_err[name] = max(report.max_rel_err.get(name, 0.0), rel_err)
            if not ok:
                failed.append(f"{name} at batch {report.batch_sizes[-1]}")
    if failed:
        raise ExportParityError(
            f"ONNX Runtime differs from torch beyond |err| <= {report.atol} + {report.rtol}*|ref| "
            f"for {', '.join(failed)} (max abs err {report.max_abs_err}, max rel err "
            f"{report.max_rel_err}); the file was not written",
            report,
        )


def export_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    check: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX with every BN layer kept as a named ``BatchNormalization``.

    The model runs in eval mode under ``torch.no_grad()``; every module's training flag
    and every layer's statistics are restored afterwards. Each BN / BatchRenorm call
    becomes one node whose ``input_mean`` / ``input_var`` initializers hold exactly the
    layer's ``running_mean`` / ``running_var``; the node → layer map is stored in the file
    (:func:`read_bn_map`), with the recalib version and producer.

    Args:
        model: an ``nn.Module``, or a ``torch.export.ExportedProgram`` exported from a
            model in eval mode (with a dynamic batch axis unless ``dynamic_batch=False``).
        example_inputs: a tensor or a tuple of tensors, the forward's positional inputs.
        path: the ``.onnx`` file to write.
        dynamic_batch: make axis 0 of every input and output dynamic (named ``"batch"``).
        opset: the ONNX opset.
        input_names: graph input names; ``input`` (or ``input_<i>``) by default.
        output_names: graph output names, one per output tensor. By default ``output``
            for a tensor, ``output_<i>`` for a tuple or list; a dict's keys and a
            namedtuple's fields (torchvision's segmentation models give ``out``, ``aux``);
            nested levels joined with ``.`` (``output_1.0``). Structured outputs are
            exported flat in that order, and each is checked against torch.
        rtol, atol: tolerance of the ONNX Runtime check (``|ort - torch| <= atol +
            rtol * |torch|`` per element).
        check: run the checker and the ONNX Runtime comparison before writing.

    Returns:
        An :class:`ExportReport`.

    Raises:
        NoBatchNormError: the model has no BN layer with running statistics.
        BatchNormFoldedError: the graph has fewer BN nodes than the model has BN calls.
        ExportError: bad inputs or outputs, a training-mode or static-batch ExportedProgram,
            BN nodes that cannot be matched to layers.
        ExportParityError: ONNX Runtime and torch differ beyond the tolerance.

    Examples::

        >>> report = export_onnx(model, torch.randn(2, 3, 32, 32), "model.onnx")
        >>> report.bn_nodes, report.max_abs_err
    """
    start = time.perf_counter()
    args = _as_tuple(example_inputs)
    from_program = isinstance(model, torch.export.ExportedProgram)
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with eval_mode(module, via_attribute=from_program), torch.no_grad():
        layers, raw = _layers_and_outputs(model, module, args, dynamic_batch=dynamic_batch)
        leaves = _output_leaves(raw)
        outputs = [t for _, t in leaves]
        # Dicts, namedtuples and nested tuples leave the exporter with no names to give;
        # a wrapper returning the leaves as one tuple fixes their order and names.
        target = module if _is_flat(raw) else _FlatOutputs(module)
        inputs = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
        names_in = _names(input_names, inputs, "input")
        names_out = _names(output_names, [n for n, _ in leaves], "output")
        with _fingerprinted(layers):
            proto = _torch_export(
                target,
                args,
                opset=opset,
                input_names=names_in,
                output_names=names_out,
                dynamic_batch=dynamic_batch,
                from_program=from_program,
            )
        infos = _name_and_fill(proto, layers)
        report = _new_report(proto, infos, path=path, rtol=rtol, atol=atol)
        if check:
            batches = [(args, outputs)]
            if dynamic_batch:
                batches.append((_grown_batch(args), []))
            _check(proto, target, names_in, batches, report)
    onnx.save(proto, str(path))
    report.seconds = time.perf_counter() - start
    logger.info(
        "exported %s: %d BN nodes, max abs err %s", path, report.bn_nodes, report.max_abs_err
    )
    return report


def _layers_and_outputs(
    model: nn.Module | torch.export.ExportedProgram,
    module: nn.Module,
    args: tuple[Tensor, ...],
    *,
    dynamic_batch: bool,
) -> tuple[list[_Layer], object]:
    """The BN layers the forward calls, and the reference output (eval, no_grad)."""
    if isinstance(model, torch.export.ExportedProgram):
        layers = _program_layers(model, module)
        if dynamic_batch:
            _check_program_batch(model)
        return layers, module(*args)
    if dynamic_batch:
        _check_batch_stat_layers(module)
    return _module_layers(module, args)


def _name_and_fill(proto: onnx.ModelProto, layers: list[_Layer]) -> dict[str, BnNodeInfo]:
    """Identify each BN node's layer, write the real statistics and the metadata."""
    node_layers = _identify(proto, layers)
    _write_real_stats(proto, node_layers, layers)
    infos = write_bn_map(proto, node_layers)
    _set_metadata(proto, VERSION_KEY, _recalib_version())
    _set_metadata(proto, _PRODUCER_KEY, f"{proto.producer_name} {proto.producer_version}")
    return infos


def _new_report(
    proto: onnx.ModelProto,
    infos: dict[str, BnNodeInfo],
    *,
    path: str | Path,
    rtol: float,
    atol: float,
) -> ExportReport:
    return ExportReport(
        path=str(path),
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        input_shapes=_shapes(proto.graph.input),
        output_shapes=_shapes(proto.graph.output),
        bn_nodes=len(infos),
        bn_map={
            k: {"layer": i.layer, "mean": i.mean, "var": i.var, "channels": i.channels}
            for k, i in infos.items()
        },
        rtol=rtol,
        atol=atol,
    )
