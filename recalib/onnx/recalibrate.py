"""``recalibrate_onnx``: re-estimate the BN statistics stored in an ONNX file, with ORT.

The ONNX counterpart of :func:`recalib.recalibrate` for files from any exporter (PyTorch,
tf2onnx, ...) whose main graph holds inference ``BatchNormalization`` nodes. The same
estimators (:mod:`recalib.estimators`) and the same passes as the torch core; the result
is a copy of the model in which only the ``input_mean`` / ``input_var`` tensors of the
recalibrated nodes changed.

How the moments are collected. A *working copy* of the graph, never written anywhere,
is run by ONNX Runtime batch by batch:

* every selected node reads its ``input_mean`` / ``input_var`` from new graph inputs
  (``recalib_cal::<node>::mean`` / ``::var``, in the stored dtype) instead of the file's
  tensors, so each pass feeds the current estimates without rebuilding the session (ORT
  then does not fuse Conv+BN, which only costs calibration time);
* for each selected node, the tensor it normalizes ``X (N, C, *)`` is reshaped to
  ``(N, C, L)``, cast to float64, shifted by the fed mean (conditioning) and reduced over
  ``L`` in-graph (the drift taps' builder, :mod:`recalib.onnx.taps`): per sample and channel
  ``count = L``, ``sum(x - c)`` and ``sum((x - c)**2)`` come back as extra outputs
  ``(N, C)``, whose rows are merged exactly in float64 (:class:`~recalib.moments.ChannelMoments`).
  Activations never leave the graph, and nothing is summed in less than float64 (fp16
  models included).

Normalisation, as in the torch core:

* ``mode="eval"``: the first (anchor) pass joins the first batches, up to ``anchor`` items,
  into one batch in which every selected node normalizes with the statistics of its own
  input over that batch, computed in-graph from its tap in float64: the mean and the
  *unbiased* variance, i.e. what is stored, so this one run is the eval fixed point of
  those items (the ``prior`` mix is applied in-graph too; for ``ema`` it is only a start).
  Then passes over all data normalize with the fed running statistics, each with the
  previous pass's estimates, until no stored statistic moves by more than ``tol``
  (relative), at most ``max_passes``; unconverged results raise
  :class:`~recalib.errors.NotConvergedError` unless ``allow_unconverged=True``. Without an
  anchor pass (``anchor=0``, batches that cannot be joined: a warning) and
  ``init="batch"`` (default) the first pass normalizes by batch statistics wherever a
  batch has more than one value per channel (AdaBN start).
* ``mode="train"``: one pass normalizing every selected node by its batch statistics.

Batch-statistics normalisation is built as an explicit subgraph replacing the node in
the working copy (``Reshape`` to ``(N, C, L)``, ``ReduceMean`` over ``(0, 2)``, ...;
float32, or float64 for float64 models), with a ``Where`` falling back to the fed
running statistics when a batch has one value per channel. ``BatchNormalization`` with
``training_mode=1`` would do the same, but exists only from opset 14 (opsets 9-13 express
training by extra outputs) and has no such fallback; the subgraph works on every opset
from 9 and on any rank (``BatchNorm1d`` on ``(N, C)`` too).

What the output changes: the values of the recalibrated nodes' statistics tensors, in
their stored dtype (fp16 stays fp16), under their names. Every other initializer, node and
name, the opset, IR version, producer and metadata are kept byte for byte, with one
exception on purpose:

* *shared statistics* (one tensor read by several BN nodes, or reached through
  ``Identity`` nodes, as the TorchScript exporter deduplicates equal initializers) are
  written in place when every reader is a recalibrated node getting the same values (a
  layer called twice). Otherwise, and only then, they are untied before writing
  (:func:`~recalib.onnx.names.untie_bn_stats`: every shared BN statistic gets its own
  initializer ``<node>/input_mean`` / ``.../input_var``, the ``Identity`` nodes go), and
  recalib's node-to-layer map in ``metadata_props``, if any, is rewritten to match. The
  report's ``params["untied_stats"]`` counts the rewired statistics (0: nothing untied).

Statistics that are *graph inputs* (fed at run time, no initializer behind them) are
refused (:class:`~recalib.onnx.names.BnGraphError`): the file holds no source statistics
for ``ema``/``prior``, the report or the eval start, and turning the input into an
initializer would change the model's interface. Exclude such nodes with ``layers=`` (their
statistics are then fed with the data like any other input), or store the statistics as
initializers first. An initializer that is also listed as a graph input (old exporters,
IR < 4) is an ordinary stored statistic.

BN nodes of the same torch layer (recalib's name map gives the layer; a layer called
twice in the forward exports as two nodes) share one estimator, as the layer does in the
torch core, and get the same statistics. Only the main graph is searched (not ``If`` /
``Loop`` bodies or model-local functions).
"""

from __future__ import annotations

import heapq
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ..batches import Batch, iterate_batches
from ..errors import (
    DataError,
    DivergedError,
    NoBatchNormError,
    NonFiniteError,
    NotConvergedError,
    OnnxModelError,
)
from ..estimators import ExactEstimator, make_estimator
from ..fixed_point import anchor_items
from ..layers import select_by_name
from ..moments import ChannelMoments
from ..options import DEFAULTS, RecalibOptions
from ..report import LayerReport, RecalibrationReport, compare_stats
from ..run_options import batch_total, progress_bar, relative_change
from .graph import ORT_NUMPY_TYPES, GraphIndex, opset_of
from .names import (
    BN_MAP_KEY,
    BnGraphError,
    BnNodeInfo,
    bn_nodes,
    checked_stat_values,
    read_bn_map,
    set_bn_node_stats,
    untie_bn_stats,
    write_bn_map,
)
from .taps import TAP_PREFIX, BnTap, TapBuilder, add_tap_outputs, tap_moments

__all__ = ["OnnxModelError", "load_onnx_model", "ort_errors", "recalibrate_onnx"]

PREFIX = "recalib_cal"
"""Prefix of every name the working copy adds (besides the taps' ``recalib_tap::``)."""

_MIN_OPSET = 9
_FOLDED_HINT = (
    "BatchNormalization was probably folded into the preceding Conv/Gemm at export "
    "(torch.onnx.export folds it in eval mode with constant folding on; so do graph "
    "optimizers such as onnxsim or ORT's optimized_model_filepath). Export with BN kept: "
    "recalib.export_onnx(model, example, path), or torch.onnx.export(model, args, path, "
    "dynamo=False, do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE); "
    "or recalibrate the torch model with recalib.recalibrate before exporting"
)


@dataclass(frozen=True)
class _Node:
    """One selected BN node: where its statistics live and what the working copy adds."""

    info: BnNodeInfo
    dtype: np.dtype[Any]
    source: tuple[np.ndarray, np.ndarray]
    fed_mean: str
    fed_var: str
    tap: BnTap

    @property
    def key(self) -> str:
        return self.info.node

    @property
    def layer(self) -> str:
        return self.info.layer


# --------------------------------------------------------------------------- the model
def load_onnx_model(model_or_path: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """``model_or_path`` as a ModelProto (read from its file), or an :class:`OnnxModelError`."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if not isinstance(model_or_path, str | Path):
        raise OnnxModelError(
            f"expected an onnx.ModelProto or a path to an .onnx file "
            f"(got {type(model_or_path).__name__})"
        )
    path = Path(model_or_path)
    if not path.is_file():
        raise OnnxModelError(f"expected an ONNX file (got {str(path)!r}, which does not exist)")
    try:
        return onnx.load(str(path))
    except (DecodeError, OSError, ValueError) as exc:
        raise OnnxModelError(f"could not read {path.name} as an ONNX model: {exc}") from exc


def _bn_map(model: onnx.ModelProto) -> dict[str, BnNodeInfo]:
    infos = read_bn_map(model)
    if infos:
        return infos
    graph_bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if graph_bn:
        raise NoBatchNormError(
            f"expected inference BatchNormalization nodes with stored statistics (got "
            f"{len(graph_bn)} BatchNormalization node(s) that compute their statistics in "
            "the graph or run in training mode): there is nothing to recalibrate"
        )
    raise NoBatchNormError(
        "expected BatchNormalization nodes in the ONNX graph (got none): nothing to "
        f"recalibrate. {_FOLDED_HINT}"
    )


def _select(infos: dict[str, BnNodeInfo], layers: str | Sequence[str] | None) -> list[BnNodeInfo]:
    return select_by_name(
        list(infos.values()), layers, lambda i: [i.layer, i.node], what="BatchNormalization node"
    )


def _graph_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The inference BN nodes of ``graph`` under :func:`read_bn_map`'s keys (live refs)."""
    return dict(bn_nodes(GraphIndex(graph)))


def _unsupported(node: onnx.NodeProto, opset: int) -> str | None:
    """Why a BN node's stored statistics are not what it normalizes with at inference."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("spatial", 1) != 1:
        return "spatial=0 (per-position statistics) is not supported; expected spatial=1"
    if opset < 14 and sum(1 for o in node.output if o) > 1:
        return "training-mode node (extra outputs): it normalizes by batch statistics"
    return None


def _stored(index: GraphIndex, info: BnNodeInfo, name: str, what: str) -> np.ndarray:
    tensor = index.const(index.resolve(name))
    if tensor is None:
        raise BnGraphError(
            f"the {what} of BN node {info.node!r} (layer {info.layer!r}) is {name!r}, a graph "
            "input fed at run time: the file holds no statistics to recalibrate; expected "
            "initializers (store the statistics as initializers, or exclude the node with "
            "layers=)"
        )
    return numpy_helper.to_array(tensor).copy()


def _plan(
    model: onnx.ModelProto, infos: list[BnNodeInfo], opset: int
) -> tuple[list[_Node], list[dict[str, str]]]:
    index = GraphIndex(model.graph)
    graph_nodes = _graph_nodes(model.graph)
    nodes: list[_Node] = []
    skipped: list[dict[str, str]] = []
    for info in infos:
        reason = _unsupported(graph_nodes[info.node], opset)
        if reason is not None:
            skipped.append({"layer": info.layer, "reason": reason})
            continue
        mean = _stored(index, info, info.mean, "input_mean")
        var = _stored(index, info, info.var, "input_var")
        if mean.ndim != 1 or mean.shape != var.shape or mean.dtype != var.dtype:
            raise BnGraphError(
                f"expected input_mean and input_var of BN node {info.node!r} of one shape "
                f"(C,) and dtype (got {mean.shape} {mean.dtype} and {var.shape} {var.dtype})"
            )
        base = f"{PREFIX}::{info.node}::"
        tap = BnTap(
            layer=info.node,
            source="input",
            mean=base + "mean",
            var=base + "var",
            count=f"{TAP_PREFIX}::{info.node}::count",
            sum=f"{TAP_PREFIX}::{info.node}::sum",
            sumsq=f"{TAP_PREFIX}::{info.node}::sumsq",
            center=np.zeros(mean.shape),
            gain=np.ones(()),
            offset=np.zeros(()),
            base=np.zeros(()),
        )
        source = (mean.astype(np.float64), var.astype(np.float64))
        nodes.append(_Node(info, mean.dtype, source, base + "mean", base + "var", tap))
    if not nodes:
        raise NoBatchNormError(
            f"expected at least one BatchNormalization node to recalibrate (got none usable: "
            f"{skipped})"
        )
    return nodes, skipped


def _check_names(model: onnx.ModelProto) -> None:
    g = model.graph
    names = [
        *(t.name for t in g.initializer),
        *(v.name for v in (*g.input, *g.output)),
        *(n.name for n in g.node),
        *(o for n in g.node for o in n.output),
    ]
    taken = sorted({n for n in names if n.startswith((f"{TAP_PREFIX}::", f"{PREFIX}::"))})
    if taken:
        raise OnnxModelError(
            f"expected no tensor or node names starting with {TAP_PREFIX}:: or {PREFIX}:: "
            f"(got {taken[:4]}); a model with drift taps is recalibrated before tapping"
        )


# --------------------------------------------------------------------------- working copy
class _Subgraph:
    """Builds the batch-statistics normalisation that replaces one BN node."""

    def __init__(self, opset: int, out: list[onnx.NodeProto], inits: list[TensorProto]) -> None:
        self.opset = opset
        self.nodes = out
        self.inits = inits
        self.consts: dict[str, str] = {}
        self.count = 0

    def const(self, key: str, value: np.ndarray) -> str:
        if key not in self.consts:
            name = f"{PREFIX}::{key}"
            self.inits.append(numpy_helper.from_array(value, name))
            self.consts[key] = name
        return self.consts[key]

    def op(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.count += 1
        self.nodes.append(
            helper.make_node(op, inputs, [output], name=f"{PREFIX}::{op}_{self.count}", **attrs)
        )
        return output

    def mean_02(self, x: str, output: str) -> str:
        if self.opset >= 18:
            axes = self.const("axes_02", np.array([0, 2], dtype=np.int64))
            return self.op("ReduceMean", [x, axes], output, keepdims=1)
        return self.op("ReduceMean", [x], output, axes=[0, 2], keepdims=1)

    def per_channel(self, name: str, work: int, output: str) -> str:
        """A ``(C,)`` tensor cast to the working type and shaped ``(1, C, 1)``."""
        shape = self.const("shape_1c1", np.array([1, -1, 1], dtype=np.int64))
        return self.op("Reshape", [self.op("Cast", [name], output + "_w", to=work), shape], output)

    def statistics(self, bn: onnx.NodeProto, node: _Node, flat: str, work: int) -> tuple[str, str]:
        """Batch mean and (biased) variance ``(1, C, 1)``, or the fed running statistics
        when the batch has a single value per channel (where torch would refuse)."""
        p = f"{PREFIX}::{node.key}::_"
        bmean = self.mean_02(flat, p + "batch_mean")
        dev = self.op("Sub", [flat, bmean], p + "dev")
        bvar = self.mean_02(self.op("Mul", [dev, dev], p + "dev2"), p + "batch_var")
        numel = self.op("Size", [bn.input[0]], p + "numel")
        n = self.op("Div", [numel, self.op("Size", [node.fed_mean], p + "channels")], p + "n")
        ok = self.op("Greater", [n, self.const("one_i64", np.array(1, dtype=np.int64))], p + "ok")
        rmean = self.per_channel(node.fed_mean, work, p + "rmean")
        rvar = self.per_channel(node.fed_var, work, p + "rvar")
        return (
            self.op("Where", [ok, bmean, rmean], p + "mean"),
            self.op("Where", [ok, bvar, rvar], p + "var"),
        )

    def sum_rows(self, rows: str, output: str) -> str:
        """``(N, C)`` -> ``(C,)`` summed over the batch axis."""
        if self.opset >= 13:
            axes = self.const("axes_0", np.array([0], dtype=np.int64))
            return self.op("ReduceSum", [rows, axes], output, keepdims=0)
        return self.op("ReduceSum", [rows], output, axes=[0], keepdims=0)

    def population(self, node: _Node, prior_strength: float | None) -> tuple[str, str]:
        """The node's input statistics over the whole batch, from its tap's float64 rows:
        the mean and the *unbiased* variance (what is stored, so normalising with them is
        the eval fixed point of that batch), mixed with the fed statistics as the
        ``prior`` estimator mixes them; in the stored dtype.

        With one value per channel the fed statistics are used (as torch's eval mode)."""
        p = f"{PREFIX}::{node.key}::fp_"
        f64 = TensorProto.DOUBLE
        t = node.tap
        s1 = self.sum_rows(t.sum, p + "s1")
        s2 = self.sum_rows(t.sumsq, p + "s2")
        zero = self.const("zero_i64", np.array(0, dtype=np.int64))
        shape = self.op("Shape", [t.sum], p + "rows_shape")
        rows = self.op("Cast", [self.op("Gather", [shape, zero], p + "rows_i")], p + "rows", to=f64)
        per_row = self.op("Cast", [t.count], p + "per_row", to=f64)
        n = self.op("Mul", [rows, per_row], p + "n")
        shift = self.op("Div", [s1, n], p + "shift")
        fed_mean = self.op("Cast", [node.fed_mean], p + "fed_mean", to=f64)
        fed_var = self.op("Cast", [node.fed_var], p + "fed_var", to=f64)
        mean = self.op("Add", [fed_mean, shift], p + "mean")
        one = self.const("one_f64", np.array(1.0, dtype=np.float64))
        zero_f = self.const("zero_f64", np.array(0.0, dtype=np.float64))
        m2 = self.op(
            "Max",
            [self.op("Sub", [s2, self.op("Mul", [s1, shift], p + "ss")], p + "m2_"), zero_f],
            p + "m2",
        )
        dof = self.op("Max", [self.op("Sub", [n, one], p + "n1"), one], p + "dof")
        var = self.op("Div", [m2, dof], p + "var_u")
        var = self.op("Where", [self.op("Greater", [n, one], p + "ok"), var, fed_var], p + "var")
        if prior_strength is not None:
            strength = self.const(f"{node.key}::strength", np.array(prior_strength, np.float64))
            w = self.op("Div", [rows, self.op("Add", [rows, strength], p + "total")], p + "w")
            ws = self.op("Sub", [one, w], p + "ws")

            def mix(src: str, tgt: str, name: str) -> str:
                a = self.op("Mul", [ws, src], p + name + "_src")
                return self.op("Add", [a, self.op("Mul", [w, tgt], p + name + "_tgt")], p + name)

            mean, var = mix(fed_mean, mean, "mix_mean"), mix(fed_var, var, "mix_var")
        stored = helper.np_dtype_to_tensor_dtype(node.dtype)
        return (
            self.op("Cast", [mean], p + "mean_stored", to=stored),
            self.op("Cast", [var], p + "var_stored", to=stored),
        )

    def replace(self, bn: onnx.NodeProto, node: _Node, work: int, x_type: int) -> None:
        """``Y = scale * (X - mu) / sqrt(var + eps) + B`` with the batch's ``mu``, ``var``.

        ``X`` is computed on as ``(N, C, L)`` in the ``work`` type (float32, or float64 for
        float64 models) and ``Y`` cast back to ``x_type`` and shape of ``X``.
        """
        p = f"{PREFIX}::{node.key}::_"
        ncl = self.const("shape_ncl", np.array([0, 0, -1], dtype=np.int64))
        flat = self.op("Reshape", [bn.input[0], ncl], p + "flat")
        flat = self.op("Cast", [flat], p + "w", to=work)
        mean, var = self.statistics(bn, node, flat, work)
        wdt = np.float64 if work == TensorProto.DOUBLE else np.float32
        eps = self.const(f"{node.key}::eps", np.array(node.info.epsilon, dtype=wdt))
        sd = self.op("Sqrt", [self.op("Add", [var, eps], p + "var_eps")], p + "sd")
        xhat = self.op("Div", [self.op("Sub", [flat, mean], p + "centred"), sd], p + "xhat")
        scaled = self.op("Mul", [xhat, self.per_channel(bn.input[1], work, p + "scale")], p + "ys")
        y = self.op("Add", [scaled, self.per_channel(bn.input[2], work, p + "bias")], p + "y")
        if x_type != work:
            y = self.op("Cast", [y], p + "y_cast", to=x_type)
        self.op("Reshape", [y, self.op("Shape", [bn.input[0]], p + "shape")], bn.output[0])


def _working_model(
    model: onnx.ModelProto,
    nodes: list[_Node],
    opset: int,
    *,
    batch_stats: bool,
    fixed_point: bool = False,
    prior_strength: float | None = None,
) -> bytes:
    """The working copy (see the module docstring), serialised for ORT.

    ``fixed_point``: every selected node normalises with the statistics of its own input
    over the whole batch (:meth:`_Subgraph.population`), computed in-graph from its tap.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    by_key = {n.key: n for n in nodes}
    targets: dict[str, _Node] = {}  # by the BN node's output: unique in the graph
    for key, bn in _graph_nodes(graph).items():
        node = by_key.get(key)
        if node is None:
            continue
        targets[bn.output[0]] = node
        elem = helper.np_dtype_to_tensor_dtype(node.dtype)
        channels = int(node.source[0].shape[0])
        for slot, fed in ((3, node.fed_mean), (4, node.fed_var)):
            graph.input.append(helper.make_tensor_value_info(fed, elem, [channels]))
            bn.input[slot] = fed
    index = GraphIndex(work, infer_types=True)
    if batch_stats:
        new_nodes: list[onnx.NodeProto] = []
        sub = _Subgraph(opset, new_nodes, [])
        for bn in graph.node:
            node = targets.get(bn.output[0]) if bn.op_type == "BatchNormalization" else None
            if node is None:
                new_nodes.append(bn)
                continue
            # X's type: from shape inference, else the statistics' (equal before opset 15)
            x_type = index.elem_types.get(bn.input[0], helper.np_dtype_to_tensor_dtype(node.dtype))
            work_type = TensorProto.DOUBLE if x_type == TensorProto.DOUBLE else TensorProto.FLOAT
            sub.replace(bn, node, work_type, x_type)
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(sub.inits)
    builder = TapBuilder(graph, index, opset, TensorProto.DOUBLE)
    for node in by_key.values():
        builder.sums(node.info.input, node.fed_mean, node.tap)
        add_tap_outputs(graph, node.tap, TensorProto.DOUBLE, int(node.source[0].shape[0]))
    if fixed_point:
        extra: list[onnx.NodeProto] = []
        sub = _Subgraph(opset, extra, [])
        stats = {key: sub.population(node, prior_strength) for key, node in by_key.items()}
        for bn in graph.node:
            target = targets.get(bn.output[0]) if bn.op_type == "BatchNormalization" else None
            if target is not None:
                bn.input[3], bn.input[4] = stats[target.key]
        graph.node.extend(extra)
        graph.initializer.extend(sub.inits)
        _toposort(graph)
    serialised: bytes = work.SerializeToString()
    return serialised


def _toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so every node follows the producers of its inputs (the fixed
    point's statistics are computed from taps appended after the nodes reading them)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer} for n in graph.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)  # the earliest ready node first: the original order where it can
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        raise OnnxModelError("the working copy of the graph has a cycle (expected a DAG)")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they derive from ``Exception`` only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        *("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoModel"),
        *("NoSuchFile", "NotImplemented", "RuntimeException", "EPFail"),
    )
    found = tuple(getattr(state, n) for n in names if hasattr(state, n))
    return (*found, RuntimeError, ValueError, TypeError)


class _Session:
    """One ORT session of a working copy, and the model's own inputs."""

    def __init__(self, model_bytes: bytes, providers: list[str], fed: set[str]) -> None:
        import onnxruntime as ort  # lazily: importing recalib does not need it

        self.errors = ort_errors()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # unused-initializer warnings of the working copy
        try:
            self.session = ort.InferenceSession(model_bytes, options, providers=providers)
        except self.errors as exc:
            raise OnnxModelError(f"ONNX Runtime cannot load the model: {exc}") from exc
        self.inputs = [i for i in self.session.get_inputs() if i.name not in fed]

    def run(self, names: list[str], feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        try:
            return [np.asarray(o) for o in self.session.run(names, feed)]
        except self.errors as exc:
            raise DataError(f"ONNX Runtime failed on batch {batch}: {exc}") from exc


# --------------------------------------------------------------------------- data
def _as_numpy(value: Any, name: str, batch: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        try:
            return value.detach().cpu().numpy()
        except TypeError as exc:
            raise DataError(
                f"input {name!r} at batch {batch}: expected a NumPy-compatible dtype "
                f"(got {value.dtype})"
            ) from exc
    return np.asarray(value)


def _shape_matches(shape: Sequence[Any], got: tuple[int, ...]) -> bool:
    if len(shape) != len(got):
        return False
    return all(not isinstance(d, int) or d == g for d, g in zip(shape, got, strict=True))


def _user_feed(
    payload: Any, inputs: list[Any], input_name: str | None, batch: int
) -> dict[str, np.ndarray]:
    names = [i.name for i in inputs]
    if isinstance(payload, Mapping):
        arrays = {str(k): _as_numpy(v, str(k), batch) for k, v in payload.items()}
    else:
        if input_name is None and len(names) != 1:
            raise DataError(
                f"the model has inputs {names}: expected batches as dicts of input name to "
                "array, or input_name= for a single-input batch (got one array)"
            )
        name = input_name if input_name is not None else names[0]
        arrays = {name: _as_numpy(payload, name, batch)}
    if set(arrays) != set(names):
        raise DataError(f"expected inputs {names} at batch {batch} (got {sorted(arrays)})")
    for meta in inputs:
        arr = arrays[meta.name]
        want = ORT_NUMPY_TYPES.get(meta.type)
        if (want is not None and arr.dtype != want) or not _shape_matches(meta.shape, arr.shape):
            raise DataError(
                f"input {meta.name!r} at batch {batch}: expected {meta.type} of shape "
                f"{meta.shape} (got {arr.dtype} of shape {list(arr.shape)})"
            )
    return arrays


# --------------------------------------------------------------------------- the passes
def _stat_feed(
    nodes: list[_Node], current: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    feed: dict[str, np.ndarray] = {}
    for node in nodes:
        mean, var = current[node.key]
        feed[node.fed_mean] = mean.astype(node.dtype)
        feed[node.fed_var] = var.astype(node.dtype)
    return feed


def _moments(
    node: _Node, outs: dict[str, np.ndarray], centre: np.ndarray, batch: int
) -> tuple[ChannelMoments, int]:
    """The exact moments of one node's input on one batch, and its batch size ``N``."""
    s1, s2 = outs[node.tap.sum], outs[node.tap.sumsq]
    if not (np.all(np.isfinite(s1)) and np.all(np.isfinite(s2))):
        raise NonFiniteError(batch=batch, layer=node.layer)
    window = tap_moments(outs, {node.key: replace(node.tap, center=centre)})[node.key]
    count = float(np.asarray(window.count).reshape(-1)[0])
    f64 = torch.float64
    moments = ChannelMoments(
        torch.tensor(count, dtype=f64),
        torch.from_numpy(np.ascontiguousarray(window.mean, dtype=np.float64)),
        torch.from_numpy(np.ascontiguousarray(window.m2, dtype=np.float64)),
    )
    return moments, int(s1.shape[0])


def _run_pass(
    session: _Session,
    nodes: list[_Node],
    current: dict[str, tuple[np.ndarray, np.ndarray]],
    estimators: dict[str, ExactEstimator],
    *,
    data: Any,
    strict_batch_stats: bool,
    input_name: str | None,
    batch_size: int,
    max_samples: int | None,
    bar: Any,
) -> tuple[int, int]:
    """One pass over ``data``; returns ``(items, batches)``."""
    items = batches = 0
    names = [name for n in nodes for name in n.tap.outputs]
    stats = _stat_feed(nodes, current)
    for batch in iterate_batches(data, batch_size=batch_size, max_samples=max_samples):
        feed = _user_feed(batch.payload, session.inputs, input_name, batch.index)
        outs = dict(zip(names, session.run(names, {**feed, **stats}, batch.index), strict=True))
        for node in nodes:
            moments, n_rows = _moments(
                node, outs, stats[node.fed_mean].astype(np.float64), batch.index
            )
            if strict_batch_stats and float(moments.count) < 2:
                raise DataError(
                    f"mode='train' needs more than 1 value per channel in layer {node.layer!r} "
                    f"(got {int(moments.count)} at batch {batch.index}); use mode='eval', "
                    "which works with any batch size"
                )
            estimators[node.layer].update(moments, n_rows)
        items += batch.items
        batches += 1
        if bar is not None:
            bar.update(1)
    return items, batches


def _estimator_factory(
    nodes: list[_Node], method: str, momentum: float | None, prior_strength: float | None
) -> dict[str, ExactEstimator]:
    estimators: dict[str, ExactEstimator] = {}
    for node in nodes:
        if node.layer not in estimators:
            estimators[node.layer] = make_estimator(
                method,
                source_mean=torch.from_numpy(node.source[0].copy()),
                source_var=torch.from_numpy(node.source[1].copy()),
                momentum=momentum,
                prior_strength=prior_strength,
            )
    return estimators


def _update(
    nodes: list[_Node],
    current: dict[str, tuple[np.ndarray, np.ndarray]],
    estimators: dict[str, ExactEstimator],
) -> float:
    """Write each layer's new estimates (rounded to the stored dtype); the largest change."""
    change = 0.0
    done: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in nodes:
        if node.layer not in done:
            mean, var = estimators[node.layer].finalize()
            new_mean = checked_stat_values(
                node.key, "mean", mean.numpy(), node.source[0].astype(node.dtype)
            )
            new_var = checked_stat_values(
                node.key, "var", var.clamp(min=0.0).numpy(), node.source[1].astype(node.dtype)
            )
            done[node.layer] = (new_mean.astype(np.float64), new_var.astype(np.float64))
            old = current[node.key]
            change = max(
                change,
                relative_change(
                    (torch.from_numpy(old[0]), torch.from_numpy(old[1])),
                    (torch.from_numpy(done[node.layer][0]), torch.from_numpy(done[node.layer][1])),
                    node.info.epsilon,
                ),
            )
        current[node.key] = done[node.layer]
    return change


# --------------------------------------------------------------------------- anchor pass
def _joined(
    feeds: list[dict[str, np.ndarray]], inputs: list[Any]
) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """The batches' inputs concatenated along the batch axis and each batch's rows, or
    ``None`` where they cannot be joined. An input without a free leading dimension (a
    scalar, a fixed size) is not batched: it joins when every batch feeds the same value."""
    out: dict[str, np.ndarray] = {}
    rows: list[int] | None = None
    for meta in inputs:
        arrays = [f[meta.name] for f in feeds]
        first = arrays[0]
        if first.ndim == 0 or (meta.shape and isinstance(meta.shape[0], int)):
            if not all(a.shape == first.shape and np.array_equal(a, first) for a in arrays):
                return None
            out[meta.name] = first
            continue
        if any(a.shape[1:] != first.shape[1:] or a.dtype != first.dtype for a in arrays):
            return None
        out[meta.name] = np.concatenate(arrays, axis=0)
        rows = rows or [int(a.shape[0]) for a in arrays]
    if rows is None:
        return (feeds[0], [1]) if len(feeds) == 1 else None
    return out, rows


def _row_slices(
    node: _Node, outs: dict[str, np.ndarray], rows: list[int]
) -> list[dict[str, np.ndarray]]:
    """One node's tap outputs cut back into the joined batches' rows."""
    t = node.tap
    if sum(rows) != outs[t.sum].shape[0]:  # the node's batch axis is not the input's
        return [outs]
    parts, start = [], 0
    for n in rows:
        stop = start + n
        parts.append(
            {
                t.count: outs[t.count],
                t.sum: outs[t.sum][start:stop],
                t.sumsq: outs[t.sumsq][start:stop],
            }
        )
        start = stop
    return parts


def _anchor_pass(
    session: Callable[[str], _Session],
    nodes: list[_Node],
    current: dict[str, tuple[np.ndarray, np.ndarray]],
    estimators: dict[str, ExactEstimator],
    *,
    data: Any,
    input_name: str | None,
    batch_size: int,
    max_samples: int | None,
    anchor: int | None,
) -> tuple[int, int] | None:
    """The first batches (up to ``anchor`` items) joined into one batch whose nodes
    normalise with its own statistics: the eval fixed point of those items. The estimators
    get each batch's moments, in order. ``None`` (after a warning) when they cannot be
    joined."""
    fixed = session("fixed_point")
    names = [name for n in nodes for name in n.tap.outputs]
    stats = _stat_feed(nodes, current)
    chosen: list[tuple[Batch, dict[str, np.ndarray]]] = []
    limit, total = anchor, 0
    for batch in iterate_batches(data, batch_size=batch_size, max_samples=max_samples):
        feed = _user_feed(batch.payload, fixed.inputs, input_name, batch.index)
        if limit is None and chosen:  # one batch's run measures what an item costs
            probe = dict(zip(names, fixed.run(names, {**chosen[0][1], **stats}, -1), strict=True))
            # the largest node input, as the tap's float64 copy (N, C, L)
            peak = max(probe[n.tap.sum].nbytes * max(int(probe[n.tap.count]), 1) for n in nodes)
            limit = anchor_items(peak, chosen[0][0].items, None)
        if chosen and total + batch.items > (limit or 0):
            break
        chosen.append((batch, feed))
        total += batch.items
    joined = _joined([f for _, f in chosen], fixed.inputs)
    if joined is None:
        warnings.warn(
            "mode='eval': the batches cannot be joined into one (a fixed batch dimension, or "
            "inputs of different trailing shapes or dtypes); falling back to ordinary passes, "
            "which may need many passes on a deep network",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    feed, rows = joined
    outs = dict(zip(names, fixed.run(names, {**feed, **stats}, chosen[0][0].index), strict=True))
    for node in nodes:
        centre = stats[node.fed_mean].astype(np.float64)
        for (batch, _), part in zip(chosen, _row_slices(node, outs, rows), strict=False):
            moments, n_rows = _moments(node, part, centre, batch.index)
            estimators[node.layer].update(moments, n_rows)
    return total, len(chosen)


def _diverged(exc: NonFiniteError | BnGraphError, passes: int) -> DivergedError:
    layer = exc.layer if isinstance(exc, NonFiniteError) else ""
    batch = exc.batch if isinstance(exc, NonFiniteError) else -1
    return DivergedError(
        f"mode='eval' diverged in pass {passes}: {exc} Each ordinary pass normalises with "
        "the previous pass's estimates, and they blew up. The anchor pass reaches the fixed "
        "point without such intermediate states: cover more of the data with it (a larger "
        "anchor=, or less data)",
        layer=layer,
        batch=batch,
        passes=passes,
    )


# --------------------------------------------------------------------------- the output
def _written(
    original: onnx.ModelProto,
    nodes: list[_Node],
    current: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``original`` holding the new statistics; untied only when it must be."""
    stats = {n.key: current[n.key] for n in nodes}
    out = onnx.ModelProto()
    out.CopyFrom(original)
    try:
        set_bn_node_stats(out, stats)
        return out, 0
    except BnGraphError:
        out.CopyFrom(original)
        untied = untie_bn_stats(out)
        if untied == 0:
            raise
    if any(p.key == BN_MAP_KEY for p in original.metadata_props):
        write_bn_map(out, {i.node: i.layer for i in read_bn_map(original).values()})
    set_bn_node_stats(out, stats)
    return out, untied


def _report(
    nodes: list[_Node],
    current: dict[str, tuple[np.ndarray, np.ndarray]],
    estimators: dict[str, ExactEstimator],
    **fields: Any,
) -> RecalibrationReport:
    rows: list[LayerReport] = []
    seen: set[str] = set()
    for node in nodes:
        if node.layer in seen:
            continue
        seen.add(node.layer)
        est = estimators[node.layer]
        old = tuple(torch.from_numpy(a) for a in node.source)
        new = tuple(torch.from_numpy(a) for a in current[node.key])
        eps = node.info.epsilon
        rows.append(
            LayerReport(
                name=node.layer,
                kind="BatchNormalization",
                channels=int(node.source[0].shape[0]),
                samples=int(est.moments.count.item()),
                items=est.num_items,
                degenerate_channels=int((current[node.key][1] <= eps).sum()),
                **compare_stats((old[0], old[1]), (new[0], new[1]), eps),
            )
        )
    return RecalibrationReport(layers=rows, **fields)


def _as_list(layers: str | Sequence[str] | None) -> list[str] | None:
    if layers is None:
        return None
    return [layers] if isinstance(layers, str) else list(layers)


def recalibrate_onnx(
    model_or_path: onnx.ModelProto | str | Path,
    data: Any,
    *,
    method: str = DEFAULTS.method,
    mode: str = DEFAULTS.mode,
    prior_strength: float | None = None,
    momentum: float | None = 0.1,
    max_passes: int = 10,
    tol: float = 1e-4,
    max_samples: int | None = None,
    batch_size: int = 64,
    layers: str | Sequence[str] | None = None,
    input_name: str | None = None,
    providers: Sequence[str] | None = None,
    progress: bool = False,
    init: str = "batch",
    anchor: int | None = None,
    allow_unconverged: bool = False,
) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """Re-estimate the ``BatchNormalization`` statistics of an ONNX model on new data.

    The given model is never modified; the returned copy differs from it only in the
    recalibrated statistics (see the module docstring for shared statistics).

    Args:
        model_or_path: an ``onnx.ModelProto`` or the path of an ``.onnx`` file (external
            data is loaded from its directory).
        data: calibration data: an array/tensor (cut into ``batch_size`` chunks) or an
            iterable of batches (arrays, tensors, tuples/lists whose first item is the
            input, or dicts of graph input name to array for multi-input models), in the
            dtype and shape of the model's inputs. ``mode="eval"`` iterates it several
            times, so it must be re-iterable.
        method: ``"exact"``, ``"ema"`` or ``"prior"`` (see :mod:`recalib.estimators`).
        mode: ``"train"`` (normalize by batch statistics, one pass; the default, as for
            :func:`recalib.recalibrate`) or ``"eval"`` (eval-consistent fixed point, any
            batch size).
        prior_strength: pseudo sample size ``N`` of the source statistics (``prior`` only).
        momentum: EMA weight of the new batch (``ema`` only); ``None`` for the cumulative
            average.
        max_passes: the most passes ``mode="eval"`` makes.
        tol: ``mode="eval"`` stops when no mean moved by more than ``tol`` old standard
            deviations and no variance changed by more than ``tol`` relatively.
        max_samples: stop after this many items along the batch axis.
        batch_size: chunk size when ``data`` is one array or tensor.
        layers: torch layer names (from recalib's name map) or node names, or globs of
            them, to recalibrate (default: every BN node with stored statistics).
        input_name: the graph input a non-dict batch feeds (default: the only input).
        providers: ONNX Runtime execution providers (default: CPU).
        progress: show a progress bar on stderr.
        init: where ``mode="eval"``'s ordinary passes start when there is no anchor pass
            (``anchor=0``, batches that cannot be joined): ``"batch"`` (first pass
            normalizes by batch statistics) or ``"source"`` (the stored statistics).
        anchor: ``mode="eval"``: the most items of the first pass, which runs them as one
            batch normalised by its own statistics, the eval fixed point of those items
            (default: what half the free host memory holds, at most 1024; ``0``: none).
        allow_unconverged: ``mode="eval"``: return the model even when ``tol`` was not
            reached in ``max_passes`` (``report.converged`` is then ``False``) instead of
            raising :class:`~recalib.errors.NotConvergedError`.

    Returns:
        ``(model, report)``: the recalibrated copy and a
        :class:`~recalib.report.RecalibrationReport` whose layers are named after the
        torch layers when the file carries recalib's name map, else after the nodes.

    Raises:
        NoBatchNormError: no BN node to recalibrate (e.g. BN folded into Conv at export).
        BnGraphError: statistics fed as graph inputs, or new values the stored dtype
            cannot hold.
        DataError: empty data, inputs of the wrong name, dtype or shape, ORT failing on a
            batch, NaN/Inf (:class:`~recalib.errors.NonFiniteError`).
        OnnxModelError: an unreadable file, a model ORT cannot load, opset < 9.
        NotConvergedError: ``mode="eval"`` did not reach ``tol``;
            :class:`~recalib.errors.DivergedError` when its passes blew up.

    Shape:
        Each BN node's input ``(N, C, *)``; its ``input_mean``/``input_var`` ``(C,)``.

    Examples::

        >>> model, report = recalibrate_onnx("model.onnx", x_new, mode="eval")
        >>> onnx.save(model, "model_recalibrated.onnx")
    """
    RecalibOptions(
        method=method,
        mode=mode,
        prior_strength=prior_strength,
        momentum=momentum,
        max_passes=max_passes,
        tol=tol,
        max_samples=max_samples,
        batch_size=batch_size,
        init=init,
        anchor=anchor,
        allow_unconverged=allow_unconverged,
    )  # validated once, here
    start = time.perf_counter()
    original = load_onnx_model(model_or_path)
    infos = _select(_bn_map(original), layers)
    opset = opset_of(original)
    if opset < _MIN_OPSET:
        raise OnnxModelError(
            f"expected a model of opset >= {_MIN_OPSET} (got {opset}); convert it with "
            "onnx.version_converter.convert_version"
        )
    _check_names(original)
    nodes, skipped = _plan(original, infos, opset)
    passes = max_passes if mode == "eval" else 1
    if passes > 1 and iter(data) is data:
        raise DataError(
            "mode='eval' makes several passes over the data; expected a re-iterable "
            f"(array, tensor, list) (got a one-shot {type(data).__name__})"
        )
    provider_list = list(providers) if providers is not None else ["CPUExecutionProvider"]
    fed = {name for n in nodes for name in (n.fed_mean, n.fed_var)}
    sessions: dict[str, _Session] = {}

    def session(kind: str) -> _Session:
        if kind not in sessions:
            work = _working_model(
                original,
                nodes,
                opset,
                batch_stats=kind == "batch",
                fixed_point=kind == "fixed_point",
                prior_strength=prior_strength if method == "prior" else None,
            )
            sessions[kind] = _Session(work, provider_list, fed)
        return sessions[kind]

    current = {n.key: n.source for n in nodes}
    estimators: dict[str, ExactEstimator] = {}
    items = batches = anchored = 0
    converged, residual, used = mode == "train", None, 0
    # A total only for one pass: eval mode stops when it converges (2 passes, usually).
    total = batch_total(data, batch_size, max_samples) if mode == "train" else None
    bar = progress_bar(progress, f"recalibrate_onnx ({method}/{mode})", total=total)
    try:
        first = 0
        if mode == "eval" and anchor != 0:
            estimators = _estimator_factory(nodes, method, momentum, prior_strength)
            done = _anchor_pass(
                session,
                nodes,
                current,
                estimators,
                data=data,
                input_name=input_name,
                batch_size=batch_size,
                max_samples=max_samples,
                anchor=anchor,
            )
            if done is not None:
                items, batches = done
                anchored, first, used = items, 1, 1
                residual = _update(nodes, current, estimators)
                if bar is not None:
                    bar.update(batches)
        for p in range(first, passes):
            kind = "batch" if mode == "train" or (p == 0 and init == "batch") else "eval"
            diverging = p + 1 if mode == "eval" and p > 0 else None
            estimators = _estimator_factory(nodes, method, momentum, prior_strength)
            try:
                items, batches = _run_pass(
                    session(kind),
                    nodes,
                    current,
                    estimators,
                    data=data,
                    strict_batch_stats=mode == "train",
                    input_name=input_name,
                    batch_size=batch_size,
                    max_samples=max_samples,
                    bar=bar,
                )
                change = _update(nodes, current, estimators)
            except (NonFiniteError, BnGraphError) as exc:
                if diverging is None:
                    raise
                raise _diverged(exc, diverging) from exc
            used = p + 1
            if mode == "eval":
                residual = change
                if change <= tol:
                    converged = True
                    break
    finally:
        if bar is not None:
            bar.close()
    out, untied = _written(original, nodes, current)
    report = _report(
        nodes,
        current,
        estimators,
        method=method,
        mode=mode,
        skipped=skipped,
        passes=used,
        converged=converged,
        residual=residual,
        samples=items,
        batches=batches,
        seconds=time.perf_counter() - start,
        device=",".join(provider_list),
        params={
            "prior_strength": prior_strength,
            "momentum": momentum,
            "tol": tol,
            "max_passes": max_passes,
            "init": init,
            "max_samples": max_samples,
            "layers": _as_list(layers),
            "input_name": input_name,
            "opset": opset,
            "untied_stats": untied,
            "anchor": anchor,
            "anchored_items": anchored,
        },
    )
    if not converged and not allow_unconverged:
        raise NotConvergedError(
            f"mode='eval' did not converge in {used} passes (largest relative change in the "
            f"last pass {residual:.3g}, expected <= tol={tol}); no model was returned. Allow "
            "more passes (max_passes=), or pass allow_unconverged=True to get it anyway",
            report,
        )
    return out, report
