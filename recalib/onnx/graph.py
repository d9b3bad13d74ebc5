"""Look-ups over an ONNX graph, shared by the name map, the drift taps and in-graph
recalibration: producers, reads, constants (through ``Identity`` chains), element types and
the default-domain opset.

:class:`GraphIndex` is a snapshot: rebuild it after a structural edit of the graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

__all__ = ["ORT_NUMPY_TYPES", "GraphIndex", "opset_of", "prune_unused", "used_names"]


def used_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name read by a node, including reads from inside subgraphs."""
    for node in graph.node:
        yield from (i for i in node.input if i)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from used_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from used_names(g)


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version.

    Raises:
        ValueError: the model imports no default-domain opset.
    """
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("expected a default-domain (ai.onnx) opset import (got none)")


def _without_declared_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``value_info`` and graph outputs keep their element types
    but not their shapes (shape inference keeps declared shapes it cannot refine)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for info in (*copy.graph.value_info, *copy.graph.output):
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")
    return copy


class GraphIndex:
    """Look-up tables over a model's main graph.

    Args:
        model: a ``ModelProto`` (needed for ``infer_types``) or its main ``GraphProto``.
        infer_types: run ONNX shape inference to fill :attr:`elem_types` for every value
            it can type (otherwise only initializers are typed).

    Attributes:
        graph: the indexed graph.
        initializers: name to ``TensorProto``.
        producers: tensor name to the node that outputs it.
        graph_inputs, graph_outputs: names of the graph's inputs and outputs.
        uses: how often each name is read: node inputs (subgraphs included) plus graph
            outputs.
        elem_types: ``TensorProto`` element type per typed name.
        shapes: per name with a known rank, its dimensions (``None`` where symbolic,
            unknown or not positive, as older converters write ``-1`` for a free one);
            filled by ``infer_types`` (otherwise only initializers) from the graph's
            inputs and initializers alone: the shapes its ``value_info`` and outputs
            declare are not trusted (a stale annotation would fix a free dimension).
    """

    def __init__(self, model: onnx.ModelProto | onnx.GraphProto, *, infer_types: bool = False):
        graph = model.graph if isinstance(model, onnx.ModelProto) else model
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.uses: Counter[str] = Counter(used_names(graph))
        self.uses.update(o.name for o in graph.output)
        self.elem_types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        self.shapes: dict[str, tuple[int | None, ...]] = {
            t.name: tuple(int(d) for d in t.dims) for t in graph.initializer
        }
        if infer_types:
            if not isinstance(model, onnx.ModelProto):
                raise TypeError("expected a ModelProto for infer_types=True (got a GraphProto)")
            inferred = onnx.shape_inference.infer_shapes(_without_declared_shapes(model)).graph
            for info in (*inferred.input, *inferred.output, *inferred.value_info):
                if not info.type.HasField("tensor_type"):
                    continue
                tensor = info.type.tensor_type
                if tensor.elem_type:
                    self.elem_types[info.name] = tensor.elem_type
                if tensor.HasField("shape"):
                    self.shapes[info.name] = tuple(
                        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in tensor.shape.dim
                    )

    @property
    def names(self) -> set[str]:
        """Every name the graph defines or exposes."""
        return set(self.initializers) | self.graph_inputs | self.graph_outputs | set(self.producers)

    def const(self, name: str) -> onnx.TensorProto | None:
        """The tensor stored under ``name`` (initializer or ``Constant`` value), if any."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensor: onnx.TensorProto = attr.t
                    return tensor
        return None

    def resolve(self, name: str) -> str:
        """Follow ``Identity`` nodes back to the tensor they copy."""
        seen: set[str] = set()
        node = self.producers.get(name)
        while node is not None and node.op_type == "Identity" and name not in seen:
            seen.add(name)
            name = node.input[0]
            node = self.producers.get(name)
        return name

    def constant(self, name: str) -> npt.NDArray[np.float64] | None:
        """Float64 value of ``name`` if it is constant (not fed as a graph input)."""
        name = self.resolve(name)
        if name in self.graph_inputs:
            return None
        tensor = self.const(name)
        return None if tensor is None else numpy_helper.to_array(tensor).astype(np.float64)

    def is_stat_source(self, name: str) -> bool:
        """Whether a statistic named ``name`` is stored (or fed), not computed."""
        src = self.resolve(name)
        return self.const(src) is not None or (
            src in self.graph_inputs and src not in self.producers
        )


ORT_NUMPY_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
"""ONNX Runtime's type strings (``NodeArg.type``) to NumPy dtypes."""


def prune_unused(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove the initializers among ``names`` that nothing reads any more, and the
    ``Identity``/``Constant`` chains producing them (what only they read goes too).

    Args:
        graph: edited in place.
        names: tensors that may have lost their last reader.
    """
    pending = list(names)
    while pending:
        index = GraphIndex(graph)
        name = pending.pop()
        if index.uses[name] > 0:
            continue
        node = index.producers.get(name)
        if node is not None and node.op_type in ("Identity", "Constant"):
            pending.extend(node.input)
            graph.node.remove(node)
        elif name in index.initializers and name not in index.graph_inputs:
            graph.initializer.remove(index.initializers[name])
