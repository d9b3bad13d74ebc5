"""Stat banks in the graph: one ONNX Runtime session serving many sets of BN statistics.

:func:`add_bank_inputs` rewrites every inference ``BatchNormalization`` node

    y = scale * (x - mean) / sqrt(var + eps) + B

as a per-row affine map whose coefficients are gathered from per-layer tables::

    A[k] = scale / sqrt(var_k + eps),   S[k] = B - mean_k * A[k]     (K rows of C)
    y[n] = x[n] * A[bank[n]] + S[bank[n]]

``K`` is the number of banks; row 0 holds the version's own statistics. The tables are
**graph inputs**, not initializers: ONNX Runtime's CPU provider binds a contiguous numpy
feed of the right dtype without copying it, so adding a bank makes the table one row
longer and needs no new session (on CUDA, keep the tables as device ``OrtValue`` s bound
with IOBinding, updated when a bank is added). Weights are held once, whatever ``K``.
Everything else in the graph is left as it was; the original outputs come first and
unchanged. The cost: ORT folds a BN into the preceding Conv only when the statistics are
constants, so each rewritten layer runs as a Gather pair, a Mul and an Add after the Conv,
a following ReLU no longer fuses into the Conv, and on x86 ORT's blocked (NCHWc) layout is
left and re-entered around each layer - ``docs/benchmarks.md`` ("Stat banks") has the
numbers.

Routing (``route_layers >= 1``). A row whose ``recalib_bank_index`` is ``-1`` gets the bank
nearest to its own BN-input moments, computed in the same run. For each routing layer
(the first BN layers in graph order whose input does not depend on a rewritten layer: in
a CNN, the stem's Conv output) the row's per-channel moments over the spatial axes,
``mu`` and ``v`` (population variance, ``+ eps``), are compared with each bank's
population statistics ``M_k``, ``V_k = var_k + eps`` of that layer by the Gaussian KL of
the row from the bank, averaged over channels (and over routing layers)::

    d_k = mean_c 1/2 [ v / V_k - 1 - log(v / V_k) + (mu - M_k)^2 / V_k ]

KL(row || bank), not the symmetric KL of :mod:`recalib.drift`: a bank's variance includes
the spread *between* images, so one image's spatial variance sits below it in every
domain; this direction penalises that less, and it routed better (``docs/design.md``).
It is also cheap: expanded, ``d_k`` is a row feature ``[v + mu'^2, mu']`` (``mu' = mu - c``,
``c`` the version's mean, to keep float32 sums short) times a bank table
``[1 / V_k, -2 M'_k / V_k]`` plus a bank constant ``sum_c (M'_k^2 / V_k + log V_k)``: one
``Gemm`` over ``[N, 2C] x [2C, K]`` per routing layer. Then::

    chosen = argmin_k (d_k + penalty_k)
    bank   = 0 if d_chosen + penalty_chosen > min(threshold, limit_chosen) else chosen

``penalty`` (``[K]``, an input too) is ``+inf`` at row 0 by default (:class:`BankTables`
``route_source``): bank 0 is the fallback, not a candidate. ``threshold``
(``recalib_route_threshold``, a scalar) is one limit for every bank; ``limit``
(``recalib_route_limit``, ``[K]``) is each bank's own, ``+inf`` for none (bank 0 always):
e.g. a high quantile of its calibration rows' distance to it
(:func:`recalib.onnx.bank_routing.bank_route_limit`), which needs no labels and follows
each model's and bank's scale of ``d`` (``docs/benchmarks.md``: a useful global threshold
differs ~8x between models). Only routed rows fall back; an explicitly chosen bank answers
however far the row is.

Extra inputs: ``recalib_bank_index`` int64 ``[N]``, the tables
``recalib_bank::<node>::scale`` / ``::shift`` (``[K, C, 1, ...]``: a Gather gives the
broadcast shape) per rewritten layer and, with routing, ``recalib_route::<node>::weight``
(``[K, 2C]``) / ``::bias`` (``[K]``) per routing layer, ``recalib_route_penalty`` ``[K]``,
``recalib_route_limit`` ``[K]`` and ``recalib_route_threshold`` (float scalar). Extra
outputs: ``recalib_bank`` int64 ``[N]``, the bank that answered each row, and with routing
``recalib_bank_distance`` float ``[N]``, ``d`` of that bank - for an explicitly chosen
bank too (how far the row is from the bank it asked for), without the penalty.
:class:`BankTables` holds the tables host-side and builds the feed.

What the rewrite records in ``metadata_props[BANK_METADATA_KEY]`` (JSON): each rewritten
node's torch layer, channels, epsilon, ``scale``/``B`` and the version's own statistics
(float64, base64), so the tables can be built from the rewritten file alone. Its
``format`` is 2 since ``recalib_route_limit`` exists: a format-1 graph lacks that input,
and :func:`read_bank_spec` refuses it (rebuild it with :func:`add_bank_inputs`).
Only the main graph is rewritten; the statistics of every BN node must be stored
(:func:`recalib.onnx.names.bn_node_stats`) and its ``scale``/``B`` constant.
"""

from __future__ import annotations

import base64
import heapq
import json
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import BankIndexError, NoBatchNormError, OnnxModelError, StatBankMismatchError
from .bank_files import check_stat_values
from .graph import GraphIndex, opset_of, prune_unused, used_names
from .names import BnNodeInfo, bn_node_stats, bn_nodes, read_bn_map

if TYPE_CHECKING:
    from ..statbank import StatBank

__all__ = [
    "AUTO",
    "BANK_INDEX",
    "BANK_METADATA_KEY",
    "BANK_OUTPUT",
    "DISTANCE_OUTPUT",
    "ROUTE_LIMIT",
    "ROUTE_PENALTY",
    "ROUTE_THRESHOLD",
    "BankLayer",
    "BankSpec",
    "BankTables",
    "add_bank_inputs",
    "read_bank_spec",
]

BANK_METADATA_KEY = "recalib.stat_banks"
BANK_INDEX = "recalib_bank_index"
ROUTE_THRESHOLD = "recalib_route_threshold"
ROUTE_PENALTY = "recalib_route_penalty"
ROUTE_LIMIT = "recalib_route_limit"
BANK_OUTPUT = "recalib_bank"
DISTANCE_OUTPUT = "recalib_bank_distance"
AUTO = -1
"""The bank index that asks for routing."""

_FORMAT = 2  # 2: the recalib_route_limit input (a format-1 graph lacks it)
_BANK, _ROUTE = "recalib_bank", "recalib_route"
_BANKS_DIM = "recalib_banks"

FloatArray = npt.NDArray[np.float64]
Stats = Mapping[str, tuple[Any, Any]]
BankLike = Union["StatBank", Stats]
"""A :class:`~recalib.statbank.StatBank` (keyed by torch layer names) or a mapping from
torch layer name or ONNX node key to ``(running_mean, running_var)``."""


@dataclass(frozen=True, eq=False)
class BankLayer:
    """One rewritten BN node: what turns a bank's ``(mean, var)`` into its table rows.

    Attributes:
        node: the ONNX node key (:func:`~recalib.onnx.names.read_bn_map`).
        layer: the torch layer's qualified name (the node key for foreign files).
        channels: ``C``.
        rank: the rank of the node's input ``(N, C, *spatial)``; the tables are
            ``[K, C, 1, ...]`` so that a Gather gives the broadcast shape directly.
        epsilon: the node's ``epsilon``.
        gamma, beta: the node's ``scale`` and ``B`` (float64).
        mean, var: the version's own statistics: bank 0 (float64).
    """

    node: str
    layer: str
    channels: int
    rank: int
    epsilon: float
    gamma: FloatArray
    beta: FloatArray
    mean: FloatArray
    var: FloatArray

    @property
    def table_shape(self) -> tuple[int, ...]:
        """The shape of one bank's row in the scale and shift tables: ``(C, 1, ...)``."""
        return (self.channels,) + (1,) * (self.rank - 2)

    @property
    def scale_input(self) -> str:
        return f"{_BANK}::{self.node}::scale"

    @property
    def shift_input(self) -> str:
        return f"{_BANK}::{self.node}::shift"

    def affine(self, mean: FloatArray, var: FloatArray) -> tuple[FloatArray, FloatArray]:
        """``(A, S)`` with ``BN(x) = x * A + S`` for the statistics ``mean``, ``var``."""
        a = self.gamma / np.sqrt(var + self.epsilon)
        return a, self.beta - mean * a

    def route_inputs(self) -> tuple[str, str]:
        """Names of this layer's routing tables: ``weight [K, 2C]`` and ``bias [K]``."""
        base = f"{_ROUTE}::{self.node}::"
        return base + "weight", base + "bias"

    def route_centre(self) -> FloatArray:
        """The centre ``c`` subtracted from the means before routing (float32-exact)."""
        return self.mean.astype(np.float32).astype(np.float64)

    def route_rows(self, mean: FloatArray, var: FloatArray) -> tuple[FloatArray, FloatArray]:
        """This bank's routing rows: ``[1 / V, -2 M' / V]`` and ``sum_c (M'^2 / V + log V)``
        with ``V = var + eps`` and ``M' = mean - c``."""
        v = var + self.epsilon
        m = mean - self.route_centre()
        weight = np.concatenate([1.0 / v, -2.0 * m / v])
        return weight, np.asarray(np.sum(m * m / v + np.log(v)))


@dataclass(frozen=True, eq=False)
class BankSpec:
    """What :func:`add_bank_inputs` recorded: the rewritten layers and the routing layers.

    Attributes:
        layers: every rewritten layer, in graph order.
        route: node keys of the routing layers (empty: no routing).
    """

    layers: tuple[BankLayer, ...]
    route: tuple[str, ...]

    @property
    def routed(self) -> bool:
        return bool(self.route)

    def source_stats(self) -> dict[str, tuple[FloatArray, FloatArray]]:
        """The version's own statistics as a bank (``{node key: (mean, var)}``)."""
        return {lay.node: (lay.mean, lay.var) for lay in self.layers}

    def stats_of(self, bank: BankLike) -> dict[str, tuple[FloatArray, FloatArray]]:
        """``{node key: (mean, var)}`` (float64) of ``bank`` for every rewritten layer.

        Raises:
            StatBankMismatchError: a layer is missing or unknown, a channel count differs,
                or a value is non-finite or a variance negative.
        """
        return _checked_stats(self, bank)

    def route_layers(self) -> list[BankLayer]:
        by_node = {lay.node: lay for lay in self.layers}
        return [by_node[key] for key in self.route]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "layers": [_layer_json(lay) for lay in self.layers],
                "route": list(self.route),
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> BankSpec:
        try:
            payload = json.loads(raw)
            if payload.get("format") != _FORMAT:
                raise OnnxModelError(
                    f"expected stat-bank metadata format {_FORMAT} (got "
                    f"{payload.get('format')!r}: a graph rewritten by another recalib version; "
                    "rebuild it from the original model with add_bank_inputs)"
                )
            layers = tuple(_layer_from_json(entry) for entry in payload["layers"])
            return cls(layers, tuple(str(key) for key in payload["route"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise OnnxModelError(f"metadata {BANK_METADATA_KEY!r} is not valid: {exc!r}") from exc


def _encode(values: FloatArray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode("ascii")


def _decode(text: str, channels: int) -> FloatArray:
    arr = np.frombuffer(base64.b64decode(text), dtype="<f8").astype(np.float64)
    if arr.shape != (channels,):
        raise OnnxModelError(f"expected {channels} values in bank metadata (got {arr.size})")
    return arr


def _layer_json(lay: BankLayer) -> dict[str, Any]:
    return {
        "node": lay.node,
        "layer": lay.layer,
        "channels": lay.channels,
        "rank": lay.rank,
        "epsilon": lay.epsilon,
        **{k: _encode(getattr(lay, k)) for k in ("gamma", "beta", "mean", "var")},
    }


def _layer_from_json(entry: Mapping[str, Any]) -> BankLayer:
    c = int(entry["channels"])
    arrays = {k: _decode(entry[k], c) for k in ("gamma", "beta", "mean", "var")}
    rank, eps = int(entry["rank"]), float(entry["epsilon"])
    return BankLayer(str(entry["node"]), str(entry["layer"]), c, rank, eps, **arrays)


def _metadata(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def read_bank_spec(model: onnx.ModelProto) -> BankSpec:
    """The :class:`BankSpec` that :func:`add_bank_inputs` stored in ``model``.

    Raises:
        OnnxModelError: the model has no (valid) stat-bank metadata.
    """
    raw = _metadata(model, BANK_METADATA_KEY)
    if raw is None:
        raise OnnxModelError(
            f"expected metadata {BANK_METADATA_KEY!r} (got a model without stat-bank inputs; "
            "build one with add_bank_inputs)"
        )
    return BankSpec.from_json(raw)


# --------------------------------------------------------------------------- the rewrite


class _Builder:
    """Collects new nodes and shared constants with deterministic, prefixed names."""

    # ReduceMean / ReduceMin take ``axes`` as an input from opset 18, before as an attribute.
    _AXES_INPUT_SINCE = 18

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[str, str] = {}
        self.outputs: list[str] = []  # new tensor names (not the rewritten BN outputs)

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        if output.startswith((_BANK, _ROUTE)):
            self.outputs.append(output)
        name = f"{output}/{op}"
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def const(self, key: str, value: npt.NDArray[Any]) -> str:
        if key not in self._consts:
            name = f"{_BANK}::const::{key}"
            self.initializers.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def reduce(self, op: str, x: str, axis: int, output: str, *, keepdims: int) -> str:
        if self.opset >= self._AXES_INPUT_SINCE:
            axes = self.const(f"axes_{axis}", np.array([axis], dtype=np.int64))
            return self.node(op, [x, axes], output, keepdims=keepdims)
        return self.node(op, [x], output, axes=[axis], keepdims=keepdims)

    def to_float(self, x: str, elem: int, output: str) -> str:
        return (
            x if elem == TensorProto.FLOAT else self.node("Cast", [x], output, to=TensorProto.FLOAT)
        )


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """Name -> ``(element type, rank or None)`` for every value shape inference types."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    out: dict[str, tuple[int, int | None]] = {}
    for info in (*inferred.input, *inferred.output, *inferred.value_info):
        tt = info.type.tensor_type
        if info.type.HasField("tensor_type"):
            out[info.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
    return out


def _bank_layer(
    index: GraphIndex,
    info: BnNodeInfo,
    node: onnx.NodeProto,
    stats: tuple[Any, Any],
    types: Mapping[str, tuple[int, int | None]],
) -> BankLayer:
    gamma, beta = index.constant(node.input[1]), index.constant(node.input[2])
    if gamma is None or beta is None:
        raise OnnxModelError(
            f"expected constant scale and B for BN node {info.node!r} (got "
            f"{node.input[1]!r} / {node.input[2]!r} fed or computed at run time)"
        )
    rank, _ = _rank_and_type(types, node, info.node)
    if rank < 2:
        raise OnnxModelError(
            f"expected an (N, C, ...) input for BN node {info.node!r} (got rank {rank})"
        )
    mean, var = (np.asarray(s, dtype=np.float64) for s in stats)
    c = int(mean.shape[0])
    return BankLayer(info.node, info.layer, c, rank, info.epsilon, gamma, beta, mean, var)


def _reads(node: onnx.NodeProto) -> Iterator[str]:
    """Names ``node`` reads, including outer-scope reads of its subgraphs."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            yield from used_names(g)


def _route_nodes(graph: onnx.GraphProto, keys: Mapping[int, str], count: int) -> list[str]:
    """The first ``count`` rewritten BN nodes whose input no rewritten BN node feeds."""
    tainted: set[str] = set()
    eligible: list[str] = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        key = keys.get(id(node))
        if key is not None and node.input[0] not in tainted:
            eligible.append(key)
        if key is not None or any(name in tainted for name in _reads(node)):
            tainted.update(o for o in node.output if o)
    if count > len(eligible):
        raise OnnxModelError(
            f"route_layers={count} needs {count} BN layers whose input does not depend on a "
            f"BN layer (got {len(eligible)}: {eligible})"
        )
    return eligible[:count]


def _rank_and_type(
    types: Mapping[str, tuple[int, int | None]], node: onnx.NodeProto, key: str
) -> tuple[int, int]:
    for name in (node.input[0], node.output[0]):
        elem, rank = types.get(name, (0, None))
        if rank is not None and elem:
            return rank, elem
    raise OnnxModelError(
        f"cannot tell the rank of the input of BN node {key!r} ({node.input[0]!r}): "
        "expected a model whose shapes ONNX shape inference can infer"
    )


def _emit_layer(b: _Builder, node: onnx.NodeProto, lay: BankLayer, elem: int, chosen: str) -> None:
    """``y = x * A[chosen] + S[chosen]`` in place of ``node`` (same output name)."""
    if sum(1 for o in node.output if o) > 1:
        raise OnnxModelError(f"expected an inference BN node with one output ({lay.node!r})")
    p = f"{_BANK}::{lay.node}::_"
    a = b.node("Gather", [lay.scale_input, chosen], p + "a", axis=0)
    s = b.node("Gather", [lay.shift_input, chosen], p + "s", axis=0)
    if elem != TensorProto.FLOAT:
        a = b.node("Cast", [a], p + "a_cast", to=elem)
        s = b.node("Cast", [s], p + "s_cast", to=elem)
    xa = b.node("Mul", [node.input[0], a], p + "xa")
    b.node("Add", [xa, s], node.output[0])


def _emit_distance(b: _Builder, lay: BankLayer, x: str, elem: int) -> str:
    """``[N, K]``: KL(row || bank) of one routing layer, averaged over its channels.

    With ``mu' = mu - c`` (``c`` the version's mean: keeps the float32 sums short), the
    bank terms are a product of a row feature ``[v + mu'^2, mu']`` with a bank table
    ``[1 / V, -2 M' / V]`` plus a bank constant ``sum_c (M'^2 / V + log V)``: one Gemm.
    """
    p = f"{_ROUTE}::{lay.node}::_"
    weight, bias = lay.route_inputs()
    x32 = b.to_float(x, elem, p + "x_float")
    ncl = b.const("shape_ncl", np.array([0, 0, -1], dtype=np.int64))
    flat = b.node("Reshape", [x32, ncl], p + "ncl")
    mean = b.reduce("ReduceMean", flat, 2, p + "mean", keepdims=1)
    dev = b.node("Sub", [flat, mean], p + "dev")
    var = b.reduce("ReduceMean", b.node("Mul", [dev, dev], p + "dev2"), 2, p + "var", keepdims=0)
    eps = b.const(f"eps_{lay.node}", np.array(lay.epsilon, dtype=np.float32))
    v = b.node("Add", [var, eps], p + "v")
    nc = b.const("shape_nc", np.array([0, -1], dtype=np.int64))
    centre = b.const(f"centre_{lay.node}", lay.route_centre().astype(np.float32))
    mu = b.node("Sub", [b.node("Reshape", [mean, nc], p + "mean_nc"), centre], p + "mu")
    second = b.node("Add", [v, b.node("Mul", [mu, mu], p + "mu2")], p + "second")
    feature = b.node("Concat", [second, mu], p + "feature", axis=1)
    scale = 0.5 / lay.channels
    gemm = b.node("Gemm", [feature, weight, bias], p + "gemm", alpha=scale, beta=scale, transB=1)
    log_v = b.reduce("ReduceMean", b.node("Log", [v], p + "log_v"), 1, p + "mean_log_v", keepdims=1)
    half = b.const("half", np.array(0.5, dtype=np.float32))
    row = b.node(
        "Mul",
        [b.node("Add", [log_v, b.const("one", np.array(1.0, np.float32))], p + "row1"), half],
        p + "row",
    )
    return b.node("Sub", [gemm, row], p + "kl")


def _emit_routing(b: _Builder, parts: list[str]) -> str:
    """Choose each row's bank; returns the name of the ``[N]`` chosen-bank tensor."""
    p = f"{_ROUTE}::_"
    total = parts[0]
    for i, part in enumerate(parts[1:]):
        total = b.node("Add", [total, part], f"{p}sum_{i}")
    if len(parts) > 1:
        inv = b.const("inv_route_layers", np.array(1.0 / len(parts), dtype=np.float32))
        total = b.node("Mul", [total, inv], p + "mean_kl")
    dist = total
    penalised = b.node("Add", [dist, ROUTE_PENALTY], p + "penalised")
    best = b.node("ArgMin", [penalised], p + "best", axis=1, keepdims=0)
    best_d = b.reduce("ReduceMin", penalised, 1, p + "best_distance", keepdims=0)
    zero = b.const("zero_i64", np.array(0, dtype=np.int64))
    limit = b.node("Gather", [ROUTE_LIMIT, best], p + "limit", axis=0)
    bound = b.node("Min", [limit, ROUTE_THRESHOLD], p + "bound")
    far = b.node("Greater", [best_d, bound], p + "far")
    routed = b.node("Where", [far, zero, best], p + "routed")
    auto = b.node("Less", [BANK_INDEX, zero], p + "auto")
    chosen = b.node("Where", [auto, routed, BANK_INDEX], BANK_OUTPUT)
    col = b.node(
        "Reshape",
        [chosen, b.const("shape_col", np.array([-1, 1], dtype=np.int64))],
        p + "chosen_col",
    )
    picked = b.node("GatherElements", [dist, col], p + "picked", axis=1)
    b.node(
        "Reshape", [picked, b.const("shape_flat", np.array([-1], dtype=np.int64))], DISTANCE_OUTPUT
    )
    return chosen


def _toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in a topological order, as close to the given order as possible."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[x] for x in _reads(node) if x in producer and producer[x] != i}:
            users[j].append(i)
            pending[i] += 1
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[onnx.NodeProto] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise OnnxModelError("the graph has a cycle after the stat-bank rewrite")
    return order


def _rows_dim(graph: onnx.GraphProto) -> str | None:
    for info in graph.input:
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            return str(dims[0].dim_param)
    return None


def _declare(graph: onnx.GraphProto, spec: BankSpec, rows: str | None) -> None:
    graph.input.append(helper.make_tensor_value_info(BANK_INDEX, TensorProto.INT64, [rows]))
    for lay in spec.layers:
        for name in (lay.scale_input, lay.shift_input):
            graph.input.append(
                helper.make_tensor_value_info(
                    name, TensorProto.FLOAT, [_BANKS_DIM, *lay.table_shape]
                )
            )
    graph.output.append(helper.make_tensor_value_info(BANK_OUTPUT, TensorProto.INT64, [rows]))
    if not spec.routed:
        return
    for lay in spec.route_layers():
        weight, bias = lay.route_inputs()
        graph.input.append(
            helper.make_tensor_value_info(weight, TensorProto.FLOAT, [_BANKS_DIM, 2 * lay.channels])
        )
        graph.input.append(helper.make_tensor_value_info(bias, TensorProto.FLOAT, [_BANKS_DIM]))
    for name in (ROUTE_PENALTY, ROUTE_LIMIT):
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [_BANKS_DIM]))
    graph.input.append(helper.make_tensor_value_info(ROUTE_THRESHOLD, TensorProto.FLOAT, []))
    graph.output.append(helper.make_tensor_value_info(DISTANCE_OUTPUT, TensorProto.FLOAT, [rows]))


def add_bank_inputs(model: onnx.ModelProto, *, route_layers: int = 1) -> onnx.ModelProto:
    """Copy of ``model`` whose BN statistics are chosen per row from fed bank tables.

    Args:
        model: an ONNX model with inference ``BatchNormalization`` nodes whose statistics
            are stored (e.g. from :func:`~recalib.onnx.export.export_onnx`); not modified.
        route_layers: how many BN layers (the first in graph order whose input no BN layer
            feeds) route rows with bank index ``-1``; ``0`` builds no routing.

    Returns:
        The rewritten model (see the module docstring for its inputs and outputs), its
        :class:`BankSpec` in ``metadata_props[BANK_METADATA_KEY]``.

    Raises:
        NoBatchNormError: the model has no inference BN node with stored statistics.
        OnnxModelError: a BN node's scale/B is not constant, its rank cannot be inferred,
            the model already has bank inputs, or fewer than ``route_layers`` BN layers
            can route.
        BnGraphError: the BN metadata does not match the graph.
    """
    if route_layers < 0:
        raise OnnxModelError(f"expected route_layers >= 0 (got {route_layers})")
    if _metadata(model, BANK_METADATA_KEY) is not None:
        raise OnnxModelError(
            "expected a model without stat-bank inputs (got one rewritten already)"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    infos = read_bn_map(out)
    if not infos:
        raise NoBatchNormError(
            "expected inference BatchNormalization nodes with stored statistics (got none)"
        )
    index = GraphIndex(out)
    stats = bn_node_stats(out)
    nodes = dict(bn_nodes(index))
    types = _value_types(out)
    spec = BankSpec(
        tuple(
            _bank_layer(index, info, nodes[key], stats[key], types) for key, info in infos.items()
        ),
        tuple(_route_nodes(out.graph, {id(n): k for k, n in nodes.items()}, route_layers)),
    )
    _rewrite(out, spec, nodes, types)
    onnx.checker.check_model(out, full_check=True)
    return out


def _rewrite(
    model: onnx.ModelProto,
    spec: BankSpec,
    nodes: Mapping[str, onnx.NodeProto],
    types: Mapping[str, tuple[int, int | None]],
) -> None:
    graph = model.graph
    taken = GraphIndex(graph).names
    b = _Builder(opset_of(model))
    layers = {lay.node: lay for lay in spec.layers}
    chosen = BANK_INDEX
    if spec.routed:
        parts = []
        for lay in spec.route_layers():
            node = nodes[lay.node]
            _, elem = _rank_and_type(types, node, lay.node)
            parts.append(_emit_distance(b, lay, node.input[0], elem))
        chosen = _emit_routing(b, parts)
    else:
        b.node("Identity", [BANK_INDEX], BANK_OUTPUT)
    routing = list(b.nodes)
    b.nodes.clear()
    rewritten = {id(n): key for key, n in nodes.items()}
    new_nodes: list[onnx.NodeProto] = []
    freed: list[str] = []
    for node in graph.node:
        key = rewritten.get(id(node))
        if key is None:
            new_nodes.append(node)
            continue
        if routing:
            new_nodes += routing
            routing = []
        _, elem = _rank_and_type(types, node, key)
        _emit_layer(b, node, layers[key], elem, chosen)
        new_nodes += b.nodes
        b.nodes.clear()
        freed += node.input[1:5]
    old_inputs = {v.name for v in graph.input}
    _declare(graph, spec, _rows_dim(graph))
    added = {v.name for v in graph.input} - old_inputs
    added |= {t.name for t in b.initializers} | set(b.outputs)
    clash = sorted(taken & added)
    if clash:
        raise OnnxModelError(f"expected the names the rewrite adds to be free (got {clash[:4]})")
    del graph.node[:]
    graph.node.extend(_toposort(new_nodes))
    graph.initializer.extend(b.initializers)
    prune_unused(graph, freed)
    kept = [p for p in model.metadata_props if p.key != BANK_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=BANK_METADATA_KEY, value=spec.to_json())


# --------------------------------------------------------------------------- host tables


def _as_float64(value: Any) -> FloatArray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on a device: no torch import
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _bank_entries(bank: BankLike) -> Stats:
    stats = getattr(bank, "stats", bank)
    if not isinstance(stats, Mapping):
        raise StatBankMismatchError(
            f"expected a StatBank or a mapping of layer -> (mean, var) (got {type(bank).__name__})"
        )
    return stats


def _checked_stats(spec: BankSpec, bank: BankLike) -> dict[str, tuple[FloatArray, FloatArray]]:
    """``{node key: (mean, var)}`` of ``bank`` for every rewritten layer, validated."""
    entries = _bank_entries(bank)
    known = {lay.layer for lay in spec.layers} | {lay.node for lay in spec.layers}
    unexpected = sorted(str(k) for k in entries if k not in known)
    missing = [
        lay.layer for lay in spec.layers if lay.layer not in entries and lay.node not in entries
    ]
    if missing or unexpected:
        raise StatBankMismatchError(
            f"expected statistics for the {len(spec.layers)} BN layers of the model "
            f"(missing {missing[:6]}, unexpected {unexpected[:6]}): a bank of another network?"
        )
    out: dict[str, tuple[FloatArray, FloatArray]] = {}
    for lay in spec.layers:
        raw = entries[lay.layer] if lay.layer in entries else entries[lay.node]
        mean, var = _as_float64(raw[0]), _as_float64(raw[1])
        if mean.shape != (lay.channels,) or var.shape != (lay.channels,):
            raise StatBankMismatchError(
                f"expected mean and var of shape ({lay.channels},) for layer {lay.layer!r} "
                f"(got {mean.shape} and {var.shape})"
            )
        check_stat_values(lay.layer, mean, var)
        out[lay.node] = (mean, var)
    return out


def _table_rows(
    spec: BankSpec, stats: Mapping[str, tuple[FloatArray, FloatArray]]
) -> dict[str, npt.NDArray[np.float32]]:
    rows: dict[str, npt.NDArray[np.float32]] = {}
    for lay in spec.layers:
        a, s = lay.affine(*stats[lay.node])
        rows[lay.scale_input] = a.astype(np.float32).reshape(lay.table_shape)
        rows[lay.shift_input] = s.astype(np.float32).reshape(lay.table_shape)
    for lay in spec.route_layers():
        weight, bias = lay.route_inputs()
        w, c = lay.route_rows(*stats[lay.node])
        rows[weight], rows[bias] = w.astype(np.float32), c.astype(np.float32)
    return rows


class BankTables:
    """The ``[K, C]`` tables of a stat-bank graph, host-side, and the feed for a run.

    Bank 0 is the version's own statistics (from the rewritten model); :meth:`add` appends
    one bank in amortized O(bank size): rows are preallocated, the capacity doubles when
    full, and :meth:`feed` hands ONNX Runtime contiguous float32 views ``[:K]``, which its
    CPU provider reads without copying. :meth:`add` may run while other threads feed and
    run: a row is written before it is counted, and a grown table is a new array (views
    already handed out keep the old one alive). :meth:`retire` takes a bank out of routing
    and naming but keeps its rows (indices already handed out stay valid). With routing,
    each bank has a route limit (``recalib_route_limit``, :meth:`add`): a routed row whose
    distance to the bank it picked exceeds it gets bank 0 (bank 0's own limit is ``+inf``).

    Args:
        model: the rewritten model (or its :class:`BankSpec`).
        banks: banks to add after bank 0, in order (indices 1, 2, ...).
        capacity: rows preallocated.
        route_source: whether routing may choose bank 0. By default its penalty is
            ``+inf``: bank 0 is the fallback (threshold) and the explicit default, and
            routes better out of the argmin (``docs/design.md``); to route rows to the
            version's statistics, add them as a bank (:meth:`BankSpec.source_stats`).

    Examples:
        >>> tables = BankTables(add_bank_inputs(model), [bank_a, bank_b])
        >>> session.run(None, {"input": x, **tables.feed([1, 2, AUTO])})
    """

    def __init__(
        self,
        model: onnx.ModelProto | BankSpec,
        banks: Iterable[BankLike] = (),
        *,
        capacity: int = 16,
        route_source: bool = False,
    ) -> None:
        self.spec = model if isinstance(model, BankSpec) else read_bank_spec(model)
        self._lock = threading.Lock()
        rows = _table_rows(self.spec, self.spec.source_stats())
        if self.spec.routed:
            rows[ROUTE_PENALTY] = np.array(0.0 if route_source else math.inf, dtype=np.float32)
            rows[ROUTE_LIMIT] = np.array(math.inf, dtype=np.float32)
        cap = max(int(capacity), 1)
        self._tables = {
            name: np.zeros((cap, *row.shape), dtype=np.float32) for name, row in rows.items()
        }
        self._count = 0
        self._names: list[str | None] = []
        self._append(rows, "source")
        for bank in banks:
            self.add(bank)

    def __len__(self) -> int:
        return self._count

    @property
    def names(self) -> list[str | None]:
        """Each bank's name (bank 0 is ``"source"``), ``None`` where none was given."""
        return list(self._names[: self._count])

    @property
    def nbytes(self) -> int:
        """Bytes of the tables a run is fed (``K`` rows, not the spare capacity)."""
        k = self._count
        return sum(t[:k].nbytes for t in self._tables.values())

    @property
    def route_limits(self) -> list[float]:
        """Each bank's route limit (:meth:`add`; ``+inf`` for bank 0 and for none); empty
        for a graph without routing."""
        table = self._tables.get(ROUTE_LIMIT)
        return [] if table is None else [float(v) for v in table[: self._count]]

    def index(self, name: str) -> int:
        """The index of the bank added under ``name``."""
        try:
            return self._names.index(name, 0, self._count)
        except ValueError:
            raise BankIndexError(f"no bank named {name!r} (got {self.names})") from None

    def retire(self, index: int) -> None:
        """Take bank ``index`` out of service: routing never picks it again (its penalty
        becomes ``+inf``) and :meth:`index` no longer finds its name. Its rows stay, so an
        index already handed out (a request in flight) still answers with that bank.

        Raises:
            BankIndexError: ``index`` is not in ``[1, K)`` (bank 0, the version's own
                statistics, is the fallback and cannot be retired).
        """
        with self._lock:
            if not 1 <= index < self._count:
                raise BankIndexError(
                    f"expected a bank index to retire in [1, {self._count}) (got {index})"
                )
            if self.spec.routed:
                self._tables[ROUTE_PENALTY][index] = math.inf  # in place: live views see it
            self._names[index] = None

    def add(self, bank: BankLike, *, name: str | None = None, route_limit: float = math.inf) -> int:
        """Append ``bank`` (validated against the model) and return its index.

        Args:
            bank: the bank's statistics.
            name: what :meth:`index` finds it by (and :attr:`names` shows).
            route_limit: a row routed to this bank whose distance to it exceeds this falls
                back to bank 0 (as past the run's ``threshold``: the smaller of the two
                applies); ``+inf``: only the threshold. E.g.
                :func:`~recalib.onnx.bank_routing.bank_route_limit` of the bank's
                calibration data, or a bank file's
                :attr:`~recalib.onnx.bank_files.BankFile.route_limit`. Ignored (but still
                checked) by a graph without routing. Stored as float32, rounded up.

        Returns:
            The bank's index (``len(self)`` before the call).

        Raises:
            StatBankMismatchError: a layer is missing or unknown, a channel count differs,
                or a value is non-finite or a variance negative; ``route_limit`` is not a
                number >= 0 (NaN, negative, not a real number).
        """
        limit = _checked_route_limit(route_limit)
        rows = _table_rows(self.spec, _checked_stats(self.spec, bank))
        if self.spec.routed:
            rows[ROUTE_PENALTY] = np.zeros((), dtype=np.float32)
            rows[ROUTE_LIMIT] = limit
        return self._append(rows, name)

    def _append(self, rows: Mapping[str, npt.NDArray[np.float32]], name: str | None) -> int:
        with self._lock:
            k = self._count
            tables = self._tables
            if k == next(iter(tables.values())).shape[0]:
                tables = {n: _grown(t, k) for n, t in tables.items()}
            for n, row in rows.items():
                tables[n][k] = row
            self._names[k:] = [name]
            self._tables = tables
            self._count = k + 1  # published last: a concurrent feed never sees a half row
        return k

    def feed(
        self, bank_index: npt.ArrayLike, *, threshold: float = math.inf
    ) -> dict[str, npt.NDArray[Any]]:
        """The extra inputs of one run: the tables and ``bank_index`` (``[N]``, ``-1`` routes).

        Args:
            bank_index: the bank of each row, in ``[0, len(self))``, or :data:`AUTO`.
            threshold: a routed row whose best distance exceeds it gets bank 0 (so does
                one farther than the route limit of the bank it picked, :meth:`add`).

        Raises:
            BankIndexError: an index is not an integer in ``[-1, K)`` (``[0, K)`` without
                routing), or the indices are not one-dimensional.
        """
        k = self._count  # read before the tables: they always hold at least k rows
        tables = self._tables
        out: dict[str, npt.NDArray[Any]] = {n: t[:k] for n, t in tables.items()}
        out[BANK_INDEX] = self._checked_index(bank_index, k)
        if self.spec.routed:
            out[ROUTE_THRESHOLD] = np.array(threshold, dtype=np.float32)
        return out

    def _checked_index(self, bank_index: npt.ArrayLike, k: int) -> npt.NDArray[np.int64]:
        idx = np.asarray(bank_index)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise BankIndexError(
                "expected a 1-D integer bank index per row "
                f"(got shape {idx.shape}, dtype {idx.dtype})"
            )
        low = AUTO if self.spec.routed else 0
        bad = (idx < low) | (idx >= k)
        if np.any(bad):
            raise BankIndexError(
                f"expected bank indices in [{low}, {k}) (got {idx[bad][:4].tolist()}"
                + ("" if self.spec.routed else "; -1 needs a graph built with route_layers >= 1")
                + ")"
            )
        return np.ascontiguousarray(idx, dtype=np.int64)


def _checked_route_limit(value: Any) -> npt.NDArray[np.float32]:
    """``value`` as a float32 scalar, rounded up (a distance at the float64 limit stays
    within it), or :class:`StatBankMismatchError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise StatBankMismatchError(
            f"expected a route limit that is a number >= 0 or inf (got {type(value).__name__} "
            f"{repr(value)[:40]})"
        )
    limit = float(value)
    if math.isnan(limit) or limit < 0:
        raise StatBankMismatchError(f"expected a route limit >= 0 or inf (got {limit!r})")
    f32 = np.float32(limit)
    if float(f32) < limit:
        f32 = np.nextafter(f32, np.float32(np.inf))
    return np.array(f32, dtype=np.float32)


def _grown(table: npt.NDArray[np.float32], rows: int) -> npt.NDArray[np.float32]:
    new = np.zeros((2 * table.shape[0], *table.shape[1:]), dtype=table.dtype)
    new[:rows] = table[:rows]
    return new
