"""Where the BatchNorm statistics live in an ONNX graph, and how to read and write them.

An inference ``BatchNormalization`` node computes ``y = scale * (x - mean) / sqrt(var + eps)
+ B`` with ``mean`` and ``var`` as inputs 3 and 4. recalib keeps one such node per BN /
BatchRenorm call when it exports (:func:`recalib.onnx.export.export_onnx`) and records in the
model's ``metadata_props`` (key :data:`BN_MAP_KEY`) which torch layer each node came from::

    {"/layer1/0/bn1/BatchNormalization":
        {"layer": "layer1.0.bn1", "mean": "layer1.0.bn1.running_mean",
         "var": "layer1.0.bn1.running_var", "channels": 64}, ...}

:func:`read_bn_map` returns that map checked against the graph; for files without it (other
exporters) it discovers the nodes from the graph and names each layer after its node.
:func:`bn_node_stats` and :func:`set_bn_node_stats` read and overwrite the statistics in
place, keeping the stored dtype (an fp16 model stays fp16).

Where the statistics may live:

- an initializer: read and written in place (one also listed as a graph input, as old
  exporters write them, is the default value a feed may override);
- the output of a ``Constant`` node: read and written in its ``value`` tensor;
- behind ``Identity`` nodes (exporters deduplicate equal initializers that way): read
  through; written only after :func:`untie_bn_stats` gave the node its own initializer;
- a graph input (fed at run time): cannot be read or written here (:class:`BnGraphError`).

An initializer shared by several BN nodes can be written only with equal values for all of
them (anything else would silently change the other nodes); :func:`untie_bn_stats` gives
every node its own copy. Only the main graph is searched (not ``If``/``Loop`` bodies or
model-local functions), and initializers must be loaded (``onnx.load`` with external data).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BnGraphError
from .graph import GraphIndex, prune_unused

__all__ = [
    "BN_MAP_KEY",
    "VERSION_KEY",
    "BnGraphError",
    "BnNodeInfo",
    "bn_node_stats",
    "bn_nodes",
    "checked_stat_values",
    "read_bn_map",
    "set_bn_node_stats",
    "untie_bn_stats",
    "write_bn_map",
]

BN_MAP_KEY = "recalib.bn_layers"
"""``metadata_props`` key of the JSON map from BN node name to its torch layer."""

VERSION_KEY = "recalib.version"
"""``metadata_props`` key of the recalib version that wrote the file."""

_MEAN, _VAR = 3, 4  # BatchNormalization input slots of the statistics.


@dataclass(frozen=True)
class BnNodeInfo:
    """One inference ``BatchNormalization`` node and the layer it normalizes.

    Args:
        node: the node's key: its name (``BatchNormalization_<i>`` for an unnamed node).
        layer: the torch module's qualified name, or the node key when the file does not
            say (exported by another tool).
        mean: name of the tensor feeding ``input_mean`` (input 3).
        var: name of the tensor feeding ``input_var`` (input 4).
        channels: number of channels ``C``; ``-1`` when it cannot be read from the graph.
        input: name of the tensor the node normalizes (input 0): the tensor whose
            per-channel moments a recalibration collects.
        epsilon: the node's ``epsilon`` attribute.
    """

    node: str
    layer: str
    mean: str
    var: str
    channels: int
    input: str
    epsilon: float


def _is_inference_bn(node: onnx.NodeProto) -> bool:
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    training = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
    return training == 0 and len(node.input) >= 5


def bn_nodes(index: GraphIndex) -> list[tuple[str, onnx.NodeProto]]:
    """``(key, node)`` of every inference BN node whose statistics are stored or fed."""
    found: list[tuple[str, onnx.NodeProto]] = []
    keys: set[str] = set()
    for i, node in enumerate(n for n in index.graph.node if _is_inference_bn(n)):
        if not (index.is_stat_source(node.input[_MEAN]) and index.is_stat_source(node.input[_VAR])):
            continue  # statistics computed in the graph (batch statistics): nothing to set
        key = node.name or f"BatchNormalization_{i}"
        if key in keys:
            key = f"{key}#{i}"
        keys.add(key)
        found.append((key, node))
    return found


def _channels(index: GraphIndex, node: onnx.NodeProto) -> int:
    tensor = index.const(index.resolve(node.input[_MEAN]))
    if tensor is not None and len(tensor.dims) == 1:
        return int(tensor.dims[0])
    return -1


def _epsilon(node: onnx.NodeProto) -> float:
    return next((float(a.f) for a in node.attribute if a.name == "epsilon"), 1e-5)


def _info(index: GraphIndex, key: str, node: onnx.NodeProto, layer: str) -> BnNodeInfo:
    return BnNodeInfo(
        node=key,
        layer=layer,
        mean=node.input[_MEAN],
        var=node.input[_VAR],
        channels=_channels(index, node),
        input=node.input[0],
        epsilon=_epsilon(node),
    )


def _metadata(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def read_bn_map(model: onnx.ModelProto) -> dict[str, BnNodeInfo]:
    """The inference BN nodes of ``model`` and the torch layers they came from.

    With recalib's metadata (:data:`BN_MAP_KEY`) the layer names come from it, checked
    against the graph; without it every BN node whose statistics are stored (initializer,
    ``Constant``, ``Identity`` of one) or fed as a graph input is listed, its layer named
    after the node. BN nodes that compute their statistics in the graph are not listed.

    Args:
        model: the ONNX model.

    Returns:
        ``{node key: BnNodeInfo}`` in graph order.

    Raises:
        BnGraphError: the metadata is not valid JSON or does not describe this graph (a
            node was renamed, removed or fused, or its statistics were rewired after export).
    """
    index = GraphIndex(model.graph)
    nodes = bn_nodes(index)
    raw = _metadata(model, BN_MAP_KEY)
    if raw is None:
        return {key: _info(index, key, node, key) for key, node in nodes}
    try:
        recorded = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BnGraphError(f"metadata {BN_MAP_KEY!r} is not valid JSON: {exc}") from exc
    if not isinstance(recorded, dict) or set(recorded) != {key for key, _ in nodes}:
        got = sorted(recorded) if isinstance(recorded, dict) else type(recorded).__name__
        raise BnGraphError(
            f"metadata {BN_MAP_KEY!r} does not match the graph: expected entries for the BN "
            f"nodes {sorted(k for k, _ in nodes)} (got {got}); was the file optimized "
            "(BN fused) or edited after export?"
        )
    out: dict[str, BnNodeInfo] = {}
    for key, node in nodes:
        entry = recorded[key]
        info = _info(index, key, node, str(entry.get("layer", key)))
        if (entry.get("mean"), entry.get("var")) != (info.mean, info.var):
            raise BnGraphError(
                f"metadata {BN_MAP_KEY!r} says node {key!r} reads mean/var "
                f"{entry.get('mean')!r}/{entry.get('var')!r} (got {info.mean!r}/{info.var!r} "
                "in the graph); the file was edited after export"
            )
        out[key] = info
    return out


def write_bn_map(model: onnx.ModelProto, layers: Mapping[str, str]) -> dict[str, BnNodeInfo]:
    """Record in ``model.metadata_props`` which torch layer each BN node normalizes.

    Args:
        model: the ONNX model, changed in place.
        layers: ``{node key: torch layer qualified name}``, one entry per BN node that
            :func:`read_bn_map` finds.

    Returns:
        The map as :func:`read_bn_map` will read it back.

    Raises:
        BnGraphError: ``layers`` does not name exactly the graph's BN nodes.
    """
    index = GraphIndex(model.graph)
    nodes = bn_nodes(index)
    if set(layers) != {key for key, _ in nodes}:
        raise BnGraphError(
            f"expected a layer for each BN node {sorted(k for k, _ in nodes)} "
            f"(got {sorted(layers)})"
        )
    infos = {key: _info(index, key, node, layers[key]) for key, node in nodes}
    payload = {
        k: {"layer": i.layer, "mean": i.mean, "var": i.var, "channels": i.channels}
        for k, i in infos.items()
    }
    _set_metadata(model, BN_MAP_KEY, json.dumps(payload, sort_keys=True))
    return infos


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=key, value=value)


def _stored(index: GraphIndex, key: str, name: str, what: str) -> onnx.TensorProto:
    tensor = index.const(index.resolve(name))
    if tensor is None:
        raise BnGraphError(
            f"the {what} of BN node {key!r} is {name!r}, a graph input fed at run time; "
            "expected an initializer (give the statistics in the feed instead)"
        )
    return tensor


def bn_node_stats(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The stored ``(mean, var)`` of every inference BN node, as copies in their dtype.

    Args:
        model: the ONNX model.

    Returns:
        ``{node key: (mean, var)}``, each of shape ``(C,)``, keyed as :func:`read_bn_map`.

    Raises:
        BnGraphError: a node's statistics are a graph input, not stored in the file.
    """
    index = GraphIndex(model.graph)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, node in bn_nodes(index):
        mean = numpy_helper.to_array(_stored(index, key, node.input[_MEAN], "input_mean"))
        var = numpy_helper.to_array(_stored(index, key, node.input[_VAR], "input_var"))
        out[key] = (mean.copy(), var.copy())
    return out


def checked_stat_values(key: str, what: str, value: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``value`` for the statistic ``what`` of BN node ``key``, checked against the stored
    ``old`` (same shape, finite, a variance not negative).

    Raises:
        BnGraphError: it is not.
    """
    arr = np.asarray(value)
    if arr.shape != old.shape:
        raise BnGraphError(
            f"expected {what} of node {key!r} of shape {old.shape} (got {arr.shape})"
        )
    if not np.all(np.isfinite(arr)):
        raise BnGraphError(f"expected finite {what} for node {key!r} (got NaN/Inf)")
    if what == "var" and np.any(arr < 0):
        raise BnGraphError(f"expected var >= 0 for node {key!r} (got min {arr.min()})")
    with np.errstate(over="ignore"):  # an overflow is reported below, with the node named
        cast = arr.astype(old.dtype)
    if not np.all(np.isfinite(cast)):
        raise BnGraphError(
            f"the {what} of node {key!r} overflows the stored dtype {old.dtype} "
            f"(max |value| {np.abs(arr).max():.6g})"
        )
    return cast


def set_bn_node_stats(
    model: onnx.ModelProto, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Overwrite the stored statistics of BN nodes in place, keeping their dtype.

    Values are cast to the stored dtype (an fp16 initializer stays fp16) and the tensor
    keeps its name, so nothing else in the graph changes. An initializer shared by several
    tensors (other BN nodes, other consumers) is written only if every BN node reading it
    receives the same value and nothing else reads it; :func:`untie_bn_stats` lifts that.
    All checks run before anything is written.

    Args:
        model: the ONNX model, changed in place.
        stats: ``{node key: (mean, var)}`` for some or all nodes of :func:`read_bn_map`,
            each of shape ``(C,)``; ``var`` is the variance ``BatchNormalization`` divides
            by (torch's unbiased ``running_var``).

    Raises:
        BnGraphError: an unknown node key, a statistic that is a graph input or reached
            through ``Identity``, a shape mismatch, non-finite or negative values, a value
            the stored dtype cannot hold, or conflicting writes to a shared initializer.
    """
    index = GraphIndex(model.graph)
    nodes = dict(bn_nodes(index))
    unknown = sorted(set(stats) - set(nodes))
    if unknown:
        raise BnGraphError(f"no inference BN node named {unknown} (got nodes {sorted(nodes)})")
    writes: dict[str, tuple[onnx.TensorProto, np.ndarray]] = {}
    readers: Counter[str] = Counter()
    for key, (mean, var) in stats.items():
        node = nodes[key]
        for slot, what, value in ((_MEAN, "mean", mean), (_VAR, "var", var)):
            name = node.input[slot]
            tensor = _direct(index, key, name, what)
            new = checked_stat_values(key, what, value, numpy_helper.to_array(tensor))
            if name in writes and not np.array_equal(writes[name][1], new):
                raise BnGraphError(
                    f"tensor {name!r} is shared by several BN nodes and got different "
                    f"values (node {key!r}); call untie_bn_stats(model) first"
                )
            writes[name] = (tensor, new)
            readers[name] += 1
    for name, count in readers.items():
        if index.uses[name] > count:
            raise BnGraphError(
                f"tensor {name!r} is also read outside the nodes being set "
                f"({index.uses[name]} reads, {count} written); writing it would change them "
                "too: call untie_bn_stats(model) first, or set every BN node that reads it"
            )
    for tensor, new in writes.values():
        tensor.CopyFrom(numpy_helper.from_array(new, name=tensor.name))


def _direct(index: GraphIndex, key: str, name: str, what: str) -> onnx.TensorProto:
    tensor = index.const(name)
    if tensor is not None:
        return tensor
    if index.const(index.resolve(name)) is not None:
        raise BnGraphError(
            f"the {what} of BN node {key!r} ({name!r}) is an Identity of another tensor; "
            "call untie_bn_stats(model) first to give the node its own initializer"
        )
    _stored(index, key, name, f"input_{what}")  # raises: a graph input
    raise BnGraphError(f"no stored tensor {name!r} for the {what} of node {key!r}")


def untie_bn_stats(model: onnx.ModelProto) -> int:
    """Give every BN node's ``input_mean``/``input_var`` an initializer of its own.

    A statistic that is shared (with another node or input slot) or reached through
    ``Identity`` nodes gets a fresh initializer, a copy of the stored values named
    ``"<node key>/input_mean"`` (or ``.../input_var``); ``Identity``/``Constant`` nodes and
    initializers left unread by the rewiring are removed. Graph-input statistics are left
    as they are.

    Args:
        model: the ONNX model, changed in place.

    Returns:
        The number of statistics rewired.
    """
    index = GraphIndex(model.graph)
    taken = set(index.initializers) | set(index.producers) | index.graph_inputs
    detached: list[str] = []
    for key, node in bn_nodes(index):
        for slot, what in ((_MEAN, "input_mean"), (_VAR, "input_var")):
            name = node.input[slot]
            if name in index.initializers and index.uses[name] == 1:
                continue
            tensor = index.const(index.resolve(name))
            if tensor is None:
                continue  # a graph input: fed at run time
            new_name = _fresh(f"{key}/{what}", taken)
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = new_name
            model.graph.initializer.append(copy)
            node.input[slot] = new_name
            index.uses[name] -= 1
            detached.append(name)
    prune_unused(model.graph, detached)
    return len(detached)


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
