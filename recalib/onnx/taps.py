"""In-graph drift taps: per-channel moments of every BatchNormalization input as ONNX outputs.

:func:`add_drift_taps` returns a copy of an ONNX model with, for each
``BatchNormalization`` node, three extra graph outputs (after the original ones, which are
left untouched) from which :func:`tap_moments` recovers the moments of the node's input
``X`` of shape ``(N, C, *)``:

* ``recalib_tap::<layer>::count`` - int64 scalar ``L``, spatial positions per row
  (``numel(X) / (N * C)``; 1 for ``(N, C)`` inputs);
* ``recalib_tap::<layer>::sum``   - ``(N, C)``, ``sum over space of (v - c)``;
* ``recalib_tap::<layer>::sumsq`` - ``(N, C)``, ``sum over space of (v - c)**2``;

or, for the layers tapped in the *pooled* form (below), columns of one output shared by
all of them, ``recalib_tap::pooled`` - ``(N, 2 * sum of their C, 1, 1)``: per layer, ``C``
columns of row means of ``v`` then ``C`` of row means of ``v**2``, with ``L`` a constant
of the metadata.

``v`` is the tapped tensor and ``c`` a per-channel centre (see below). Rows are reduced
over space only: the kernel is faster than a reduction over ``(N, *spatial)`` and the
float32 sums are shorter; :func:`tap_moments` combines the ``N`` rows exactly in float64
(Chan's merge). The tap names, where each tap reads and the BN inputs it needs are stored
as JSON in ``metadata_props["recalib.drift_taps"]``; :func:`read_taps` reads them back and
resolves the per-channel constants from the model's initializers.

Where a tap reads (``source``):

* ``"input"``: ``v = X``. When ``X`` comes from a ``Conv``, the tap is a second consumer
  of the Conv output, and ONNX Runtime's Conv+BN fusion (which needs a single consumer)
  no longer applies: the BN runs as its own pass.
* ``"output"``: ``v = Y = s * (X - m) / sqrt(var + eps) + B``, mapped back exactly per
  channel: with ``a = sqrt(var + eps) / s``, ``X = m + a * (Y - B)``, so the moments of a
  row map as ``mean_X = m + a * (mean_Y - B)`` and ``m2_X = a**2 * m2_Y``. The Conv output
  keeps its single consumer and the Conv+BN fusion survives (the tap still reads the
  fused output, so a following activation is no longer fused into the Conv). Valid only
  for inference BN (``training_mode=0``) whose scale, bias, mean and variance are
  constants with every scale non-zero. ``Y`` carries float rounding relative to ``|Y|``,
  which maps back to ``X`` magnified by about ``(|B / s| + k) * sigma_ref / sigma_live``
  (in units of the live standard deviation, ``k`` a few), so channels with
  ``|B / s| > 1e3`` rule it out. Under a strong drift to a much narrower input the
  recovered variance loses digits accordingly (1e-4 relative at ``sigma_live`` =
  ``sigma_ref / 100`` in float32): the drift score is then large and unaffected.
* ``"auto"`` (default): ``"output"`` where it keeps a fusion (``X`` is the output of a
  ``Conv`` or ``MatMul`` read only by the BN; ORT does not fuse ``Gemm`` + BN) and is
  valid, else ``"input"``.

Centring (``center``): the variance of a row is ``(S2 - S1**2 / L) / L``, which cancels
when ``|mean(v) - c|`` is large against ``v``'s standard deviation: the float32 sums lose
about ``log10(kappa)`` digits, ``kappa = 1 + (mean - c)**2 / var``. Subtracting a centre
in-graph costs a full extra pass over the activation, so by default (``center=None``) a
layer is centred only when its stored statistics predict ``kappa > 1e3`` for ``c = 0``
(input: ``c = m``, ``kappa = 1 + m**2 / var``; output: ``c = B``, ``kappa = 1 + (B/s)**2``):
the relative error of the variance then stays below about ``1e-3`` (the symmetric KL, being
quadratic in it, moves by ~``1e-6``). ``center=True`` / ``False`` forces it.

The pooled form (``reduce``): ``GlobalAveragePool(v)`` and ``GlobalAveragePool(v * v)``,
concatenated over the layers into one output. Unlike ``Reshape`` + ``ReduceSum``, both
are operators ONNX Runtime's x86 NCHWc layout runs natively, so a 4D activation is not
reordered to NCHW for its tap and only the small pooled rows are; one output instead of
three per layer also saves the run's per-output work. On the benchmark's 9-layer CNN it
cuts the taps' extra time by 44% at batch 1 and at batch 32. It applies to float32 4D
tensors ``(N, C, H, W)`` whose ``C``, ``H`` and ``W`` shape inference fixes from the
graph's inputs and initializers (declared intermediate shapes are not trusted, and a
non-positive dimension counts as free: ``L = H * W`` is then a constant, where reading
the tensor's shape at run time would bring the reorder back), and not to centred or
float64 taps. ``reduce="auto"`` (default) pools those layers whose ``C`` is also a
multiple of 16 (the NCHWc block is 8 with AVX2 and 16 with AVX-512; with other channel
counts ORT reorders the whole activation for the pooling operators, and the pooled form
measured ~6% slower than the summed one) and sums the others; ``"sum"`` never pools,
``"pool"`` requires it of every tapped layer. Row means carry float32 rounding comparable
to row sums' (``mean(v**2) - mean(v)**2`` cancels like ``S2 - S1**2 / L``), somewhat
coarser for long rows, as ``GlobalAveragePool`` accumulates in one float32 sum per row:
against a float64 reference, 1-2e-6 relative error in the mean at ``L = 12,544`` (summed:
1-2e-7), and 2.6e-3 in the variance at ``kappa`` = 900 (summed: 1.7e-3): the bound of
about ``1e-3`` above is a few ``1e-3`` for rows that long, still ~1e-5 of the symmetric KL.

Reductions run in float32 (other float inputs are cast first), or in float64 with
``dtype="float64"`` (ONNX Runtime's CPU ReduceSum / ReduceSumSquare support double; never
centred, at the price of a cast pass). In the summed form the tapped tensor is reshaped
to ``(N, C, L)`` so 2D inputs (``BatchNorm1d`` after ``Linear``) and dynamic batch sizes
work alike.
``ReduceSum`` takes ``axes`` as an input from opset 13, ``ReduceSumSquare`` from opset 18;
both forms are emitted as needed. Only the main graph is tapped (not ``If``/``Loop``
subgraphs or model-local functions).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..drift import MomentWindow
from ..errors import NoBatchNormError
from .graph import GraphIndex, opset_of

__all__ = [
    "POOLED_OUTPUT",
    "TAP_METADATA_KEY",
    "TAP_PREFIX",
    "BnTap",
    "TapBuilder",
    "TapDtype",
    "TapReduce",
    "TapSource",
    "add_drift_taps",
    "add_tap_outputs",
    "read_taps",
    "reference_stats",
    "tap_moments",
    "tap_output_names",
]

TAP_METADATA_KEY = "recalib.drift_taps"
TAP_PREFIX = "recalib_tap"
_FORMAT = 2  # 1: no pooled taps; still read
_FORMATS = (1, 2)
POOLED_OUTPUT = f"{TAP_PREFIX}::pooled"
_MAX_OFFSET_RATIO = 1e3
_MAX_KAPPA = 1e3
_FUSING_PRODUCERS = frozenset({"Conv", "MatMul"})  # ORT fuses these with a following BN
# channels of a pooled tap under reduce="auto": a multiple of ORT's x86 NCHWc block (8 with
# AVX2, 16 with AVX-512), else its layout transformer reorders the whole activation to NCHW
# for Mul and GlobalAveragePool and the pooled form is slower than the summed one
_POOL_BLOCK = 16

TapSource = Literal["auto", "input", "output"]
TapDtype = Literal["float32", "float64"]
TapReduce = Literal["auto", "sum", "pool"]

_DTYPES: dict[str, int] = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class BnTap:
    """One tapped BatchNormalization node and how to map its tap outputs back to ``X``.

    Attributes:
        layer: the node's name (its output's name when the node has none).
        source: ``"input"`` or ``"output"``, where the statistics are read.
        mean, var: names of the node's ``input_mean`` / ``input_var`` inputs.
        count, sum, sumsq: names of the tap outputs (see the module docstring); for a
            pooled tap ``sum`` and ``sumsq`` both name the shared pooled output and
            ``count`` is empty.
        center: per-channel ``c`` subtracted in-graph before reducing (zeros if none).
        gain, offset, base: per-channel ``a``, ``b``, ``m`` with ``X = m + a * (v - b)``
            for the tapped tensor ``v`` (``1, 0, 0`` for input taps).
        pooled_offset: a pooled tap's first column in the pooled output (``None``: sums).
        channels, fixed_count: a pooled tap's ``C`` and ``L`` (spatial positions per row).
    """

    layer: str
    source: Literal["input", "output"]
    mean: str
    var: str
    count: str
    sum: str
    sumsq: str
    center: FloatArray
    gain: FloatArray
    offset: FloatArray
    base: FloatArray
    pooled_offset: int | None = None
    channels: int | None = None
    fixed_count: int | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph outputs this tap reads."""
        if self.pooled_offset is not None:
            return (self.sum,)
        return self.count, self.sum, self.sumsq


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _layer_names(nodes: list[onnx.NodeProto]) -> list[str]:
    names = [node.name or node.output[0] for node in nodes]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise ValueError(f"expected unique BatchNormalization node names (got duplicates {dupes})")
    return names


@dataclass(frozen=True, eq=False)
class _Affine:
    """The constants of one BN node that the taps need (float64, ``None`` if not constant)."""

    scale: FloatArray | None
    bias: FloatArray | None
    mean: FloatArray | None
    var: FloatArray | None
    eps: float

    @classmethod
    def of(cls, index: GraphIndex, node: onnx.NodeProto) -> _Affine:
        scale, bias, mean, var = (index.constant(node.input[i]) for i in (1, 2, 3, 4))
        return cls(scale, bias, mean, var, float(_attr(node, "epsilon", 1e-5)))


def _output_tap_problem(node: onnx.NodeProto, k: _Affine) -> str | None:
    """Why the BN output cannot be mapped back to its input exactly (``None`` if it can)."""
    if _attr(node, "training_mode", 0):
        return "training_mode=1 normalizes with batch statistics"
    if k.scale is None or k.bias is None or k.mean is None or k.var is None:
        return "scale, bias, mean and variance must be constant initializers"
    if not (np.all(np.isfinite(k.scale)) and np.all(np.isfinite(k.bias))):
        return "scale and bias must be finite"
    if np.any(k.scale == 0.0):
        return f"scale is zero in channels {np.flatnonzero(k.scale == 0.0).tolist()[:8]}"
    ratio = float(np.max(np.abs(k.bias) / np.abs(k.scale)))
    if ratio > _MAX_OFFSET_RATIO:
        return f"|bias / scale| reaches {ratio:.3g} (> {_MAX_OFFSET_RATIO:g}): too much rounding"
    return None


def _keeps_fusion(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """True when X is a Conv/MatMul output that only this BN reads (what ORT's fusion needs)."""
    x = node.input[0]
    producer = index.producers.get(x)
    return producer is not None and producer.op_type in _FUSING_PRODUCERS and index.uses[x] == 1


def _choose_source(
    index: GraphIndex, node: onnx.NodeProto, k: _Affine, layer: str, source: TapSource
) -> Literal["input", "output"]:
    if source == "input":
        return "input"
    problem = _output_tap_problem(node, k)
    if source == "output":
        if problem is not None:
            raise ValueError(f"cannot tap the output of BatchNormalization {layer!r}: {problem}")
        return "output"
    return "output" if problem is None and _keeps_fusion(index, node) else "input"


def _centre_value(source: str, k: _Affine) -> FloatArray | None:
    """The natural centre of the tapped tensor (``m`` or ``B``), ``None`` if not constant."""
    return k.bias if source == "output" else k.mean


def _wants_centre(source: str, k: _Affine, center: bool | None, dtype: str) -> bool:
    c = _centre_value(source, k)
    if center is not None:
        if center and c is None:
            raise ValueError("cannot centre a tap whose running mean is not a constant")
        return center
    if dtype == "float64" or c is None:
        return False
    # Predicted variance of the tapped tensor: var + eps for X, s**2 for Y.
    if source == "output" and k.scale is not None:
        spread2 = k.scale * k.scale
    elif source == "input" and k.var is not None:
        spread2 = k.var + k.eps
    else:
        return False
    return bool(np.max(1.0 + c * c / spread2) > _MAX_KAPPA)


class TapBuilder:
    """Appends tap nodes, constants and outputs to a graph, with deterministic names."""

    def __init__(self, graph: onnx.GraphProto, index: GraphIndex, opset: int, dtype: int) -> None:
        self.graph = graph
        self.index = index
        self.opset = opset
        self.dtype = dtype
        self.shared: dict[str, str] = {}
        self.count = 0

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.count += 1
        name = f"{TAP_PREFIX}::{op}_{self.count}"
        self.graph.node.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def shared_const(self, key: str, value: npt.NDArray[Any]) -> str:
        if key not in self.shared:
            name = f"{TAP_PREFIX}::{key}"
            self.graph.initializer.append(numpy_helper.from_array(value, name))
            self.shared[key] = name
        return self.shared[key]

    def cast(self, name: str, output: str) -> str:
        if self.index.elem_types.get(name) == self.dtype:
            return name
        return self.node("Cast", [name], output, to=self.dtype)

    def reduce(self, op: str, x: str, output: str) -> str:
        axes_input_since = {"ReduceSum": 13, "ReduceSumSquare": 18}[op]
        if self.opset >= axes_input_since:
            axes = self.shared_const("axes", np.array([2], dtype=np.int64))
            return self.node(op, [x, axes], output, keepdims=0)
        return self.node(op, [x], output, axes=[2], keepdims=0)

    def sums(self, value: str, centre: str | None, tap: BnTap) -> None:
        """Rows ``sum(value - centre)`` and ``sum((value - centre)**2)`` over space."""
        prefix = f"{TAP_PREFIX}::{tap.layer}::_"
        ncl = self.shared_const("shape_ncl", np.array([0, 0, -1], dtype=np.int64))
        flat = self.node("Reshape", [value, ncl], prefix + "flat")
        flat = self.cast(flat, prefix + "flat_cast")
        if centre is not None:
            c1 = self.shared_const("shape_c1", np.array([-1, 1], dtype=np.int64))
            c = self.node("Reshape", [self.cast(centre, prefix + "centre_cast"), c1], prefix + "c")
            flat = self.node("Sub", [flat, c], prefix + "centred")
        self.reduce("ReduceSum", flat, tap.sum)
        self.reduce("ReduceSumSquare", flat, tap.sumsq)
        size = self.node("Size", [value], prefix + "numel")
        self.node("Div", [size, self.node("Size", [tap.sum], prefix + "rows")], tap.count)

    def pooled(self, value: str, layer: str) -> list[str]:
        """Row means ``(N, C, 1, 1)`` of ``value`` and of its square (see the module)."""
        prefix = f"{TAP_PREFIX}::{layer}::_"
        square = self.node("Mul", [value, value], prefix + "square")
        return [
            self.node("GlobalAveragePool", [value], prefix + "mean"),
            self.node("GlobalAveragePool", [square], prefix + "meansq"),
        ]

    def pooled_output(self, parts: list[str], columns: int) -> None:
        """Concatenate every pooled layer's row means into :data:`POOLED_OUTPUT`."""
        self.node("Concat", parts, POOLED_OUTPUT, axis=1)
        self.graph.output.append(
            helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, [None, columns, 1, 1])
        )


def _pooled_positions(
    index: GraphIndex, name: str, channels: int | None, why_not: list[str]
) -> tuple[int, int] | None:
    """``(C, H * W)`` when the tap of ``name`` can take the pooled form, else ``None``
    (the reason appended to ``why_not``)."""
    shape = index.shapes.get(name)
    if index.elem_types.get(name) != TensorProto.FLOAT:
        why_not.append("it is not float32")
    elif shape is None or len(shape) != 4:
        why_not.append(f"it is not 4D (shape {shape})")
    elif shape[2] is None or shape[3] is None or (shape[1] is None and channels is None):
        why_not.append(f"shape inference leaves its channels or spatial size open ({shape})")
    else:
        width = channels if channels is not None else shape[1]
        if width is not None:
            return width, shape[2] * shape[3]
    return None


def _make_tap(
    layer: str,
    source: Literal["input", "output"],
    k: _Affine,
    centred: bool,
    stats: tuple[str, str],
    pooled: tuple[int, int, int] | None = None,
) -> BnTap:
    """The tap of ``layer``; ``stats`` names the node's running mean and variance inputs,
    ``pooled`` is ``(offset, C, L)`` for a pooled tap."""
    base = f"{TAP_PREFIX}::{layer}::"
    centre = _centre_value(source, k)
    one, zero = np.ones(()), np.zeros(())
    if source == "output":
        if k.scale is None or k.bias is None or k.mean is None or k.var is None:
            raise ValueError(f"expected constant BN parameters for output tap {layer!r}")
        gain, offset, mean = np.sqrt(k.var + k.eps) / k.scale, k.bias, k.mean
    else:
        gain, offset, mean = one, zero, zero
    return BnTap(
        layer=layer,
        source=source,
        mean=stats[0],
        var=stats[1],
        count="" if pooled else base + "count",
        sum=POOLED_OUTPUT if pooled else base + "sum",
        sumsq=POOLED_OUTPUT if pooled else base + "sumsq",
        center=centre if centred and centre is not None else zero,
        gain=gain,
        offset=offset,
        base=mean,
        pooled_offset=None if pooled is None else pooled[0],
        channels=None if pooled is None else pooled[1],
        fixed_count=None if pooled is None else pooled[2],
    )


def _tap_json(node: onnx.NodeProto, tap: BnTap, centred: bool) -> dict[str, Any]:
    return {
        "source": tap.source,
        "centered": centred,
        "scale": node.input[1],
        "bias": node.input[2],
        "mean": tap.mean,
        "var": tap.var,
        "epsilon": float(_attr(node, "epsilon", 1e-5)),
        "outputs": {
            "pooled": tap.sum,
            "offset": tap.pooled_offset,
            "channels": tap.channels,
            "positions": tap.fixed_count,
        }
        if tap.pooled_offset is not None
        else {"count": tap.count, "sum": tap.sum, "sumsq": tap.sumsq},
    }


def add_tap_outputs(graph: onnx.GraphProto, tap: BnTap, dtype: int, channels: int | None) -> None:
    """Declare ``tap``'s count, sum and sum-of-squares rows as graph outputs."""
    graph.output.append(helper.make_tensor_value_info(tap.count, TensorProto.INT64, []))
    for name in (tap.sum, tap.sumsq):
        graph.output.append(helper.make_tensor_value_info(name, dtype, [None, channels]))


def add_drift_taps(
    onnx_model: onnx.ModelProto,
    *,
    layers: Iterable[str] | None = None,
    source: TapSource = "auto",
    center: bool | None = None,
    dtype: TapDtype = "float32",
    reduce: TapReduce = "auto",
) -> onnx.ModelProto:
    """Copy of ``onnx_model`` with per-channel moment outputs for its BN inputs.

    Args:
        onnx_model: a model with ``BatchNormalization`` nodes in its main graph (not
            modified).
        layers: node names to tap (a node without a name goes by its output's name); all
            BatchNormalization nodes when ``None``.
        source: ``"input"``, ``"output"`` or ``"auto"``; see the module docstring.
        center: subtract the running mean (input) or BN bias (output) in-graph before
            reducing; ``None`` decides per layer from the predicted conditioning.
        dtype: reduction precision, ``"float32"`` or ``"float64"``.
        reduce: ``"auto"``, ``"sum"`` or ``"pool"``: where the pooled form is used (see
            the module docstring).

    Returns:
        The tapped model: original outputs first and unchanged, then three outputs per
        tapped node summed and one shared by the pooled ones, and the mapping in
        ``metadata_props[TAP_METADATA_KEY]``.

    Examples::

        >>> tapped = add_drift_taps(model)
        >>> taps = read_taps(tapped)
        >>> names = tap_output_names(taps)
        >>> windows = tap_moments(dict(zip(names, session.run(names, feed))), taps)
    """
    if source not in ("auto", "input", "output"):
        raise ValueError(f"expected source 'auto', 'input' or 'output' (got {source!r})")
    if dtype not in _DTYPES:
        raise ValueError(f"expected dtype 'float32' or 'float64' (got {dtype!r})")
    if reduce not in ("auto", "sum", "pool"):
        raise ValueError(f"expected reduce 'auto', 'sum' or 'pool' (got {reduce!r})")
    if any(p.key == TAP_METADATA_KEY for p in onnx_model.metadata_props):
        raise ValueError("expected a model without drift taps (it already has them)")
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    opset = opset_of(model)
    if opset < 7:
        raise ValueError(f"expected opset >= 7 (got {opset})")
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization" and not n.domain]
    if not bn_nodes:
        raise NoBatchNormError("expected BatchNormalization nodes in the main graph (got none)")
    names = _layer_names(bn_nodes)
    selected = _select(names, layers)
    index = GraphIndex(model, infer_types=True)
    taken = sorted(n for n in index.names if n.startswith(f"{TAP_PREFIX}::"))
    if taken:
        raise ValueError(f"expected no names starting with {TAP_PREFIX}:: (got {taken[:4]})")
    builder = TapBuilder(model.graph, index, opset, _DTYPES[dtype])
    entries: dict[str, dict[str, Any]] = {}
    pooled_parts: list[str] = []
    columns = 0  # of the pooled output so far
    for node, layer in zip(bn_nodes, names, strict=True):
        if layer not in selected:
            continue
        if _attr(node, "spatial", 1) != 1:
            raise ValueError(f"expected spatial=1 BatchNormalization (got spatial=0 in {layer!r})")
        k = _Affine.of(index, node)
        src = _choose_source(index, node, k, layer, source)
        centred = _wants_centre(src, k, center, dtype)
        tapped = node.output[0] if src == "output" else node.input[0]
        channels = None if k.mean is None else k.mean.size
        pooled, why_not = None, ["reduce='sum'"] if reduce == "sum" else []
        if dtype != "float32":
            why_not.append(f"dtype is {dtype}")
        elif centred:
            why_not.append("it is centred")
        elif not why_not:
            pooled = _pooled_positions(index, tapped, channels, why_not)
        if pooled is None and reduce == "pool":
            raise ValueError(f"cannot pool the tap of {layer!r}: {'; '.join(why_not)}")
        if pooled is not None and reduce == "auto" and pooled[0] % _POOL_BLOCK:
            pooled = None  # ORT would reorder the whole activation for the pooling ops
        stats = (node.input[3], node.input[4])
        if pooled is None:
            tap = _make_tap(layer, src, k, centred, stats)
            centre_name = (node.input[2] if src == "output" else node.input[3]) if centred else None
            builder.sums(tapped, centre_name, tap)
            add_tap_outputs(model.graph, tap, _DTYPES[dtype], channels)
        else:
            width, positions = pooled
            tap = _make_tap(layer, src, k, centred, stats, (columns, width, positions))
            pooled_parts += builder.pooled(tapped, layer)
            columns += 2 * width
        entries[layer] = _tap_json(node, tap, centred)
    if pooled_parts:
        builder.pooled_output(pooled_parts, columns)
    payload = {"format": _FORMAT, "layers": entries}
    props = {p.key: p.value for p in model.metadata_props}
    helper.set_model_props(model, {**props, TAP_METADATA_KEY: json.dumps(payload)})
    return model


def _select(names: list[str], layers: Iterable[str] | None) -> set[str]:
    if layers is None:
        return set(names)
    wanted = list(layers)
    unknown = [name for name in wanted if name not in names]
    if unknown or not wanted:
        raise NoBatchNormError(
            f"expected BatchNormalization node names from {names} (got {wanted})"
        )
    return set(wanted)


def _pooled_entry(layer: str, outputs: Mapping[str, Any], k: _Affine) -> tuple[int, int, int]:
    """``(offset, C, L)`` of a pooled tap's metadata, checked."""
    if outputs.get("pooled") != POOLED_OUTPUT:
        raise ValueError(f"expected the pooled output {POOLED_OUTPUT!r} for tap {layer!r}")
    values = tuple(outputs.get(key) for key in ("offset", "channels", "positions"))
    least = (0, 1, 1)
    if not all(type(v) is int and v >= low for v, low in zip(values, least, strict=True)):
        raise ValueError(
            f"expected integers offset >= 0, channels >= 1 and positions >= 1 for pooled "
            f"tap {layer!r} (got {list(values)})"
        )
    offset, channels, positions = cast(tuple[int, int, int], values)  # checked just above
    known = next((a.size for a in (k.mean, k.var, k.scale) if a is not None and a.ndim), None)
    if known is not None and known != channels:
        raise ValueError(f"expected {known} channels for pooled tap {layer!r} (got {channels})")
    return offset, channels, positions


def _check_pooled_columns(index: GraphIndex, taps: Mapping[str, BnTap]) -> None:
    """The pooled taps' column ranges tile the declared pooled output, without overlap."""
    ranges = sorted(
        (t.pooled_offset, t.pooled_offset + 2 * t.channels, t.layer)
        for t in taps.values()
        if t.pooled_offset is not None and t.channels is not None
    )
    if not ranges:
        return
    end = 0
    for start, stop, layer in ranges:
        if start != end:
            raise ValueError(
                f"expected pooled tap {layer!r} at column {end} of {POOLED_OUTPUT!r} (got {start})"
            )
        end = stop
    declared = next((o for o in index.graph.output if o.name == POOLED_OUTPUT), None)
    dims = [] if declared is None else list(declared.type.tensor_type.shape.dim)
    if declared is None or len(dims) != 4 or dims[1].dim_value != end:
        raise ValueError(f"expected a graph output {POOLED_OUTPUT!r} of shape (N, {end}, 1, 1)")


def _tap_from_json(index: GraphIndex, layer: str, entry: Mapping[str, Any]) -> BnTap:
    names = {key: entry[key] for key in ("scale", "bias", "mean", "var")}
    consts = {key: index.constant(name) for key, name in names.items()}
    k = _Affine(consts["scale"], consts["bias"], consts["mean"], consts["var"], entry["epsilon"])
    source = entry["source"]
    if source not in ("input", "output"):
        raise ValueError(f"expected tap source 'input' or 'output' (got {source!r})")
    needed: tuple[str, ...] = ("scale", "bias", "mean", "var") if source == "output" else ()
    if entry["centered"]:
        needed += ("bias",) if source == "output" else ("mean",)
    missing = [names[key] for key in needed if consts[key] is None]
    if missing:
        raise ValueError(f"expected constant initializers {missing} for tap {layer!r}")
    stats = (names["mean"], names["var"])
    outputs = entry["outputs"]
    if "pooled" in outputs:
        pooled = _pooled_entry(layer, outputs, k)
        return _make_tap(layer, source, k, bool(entry["centered"]), stats, pooled)
    tap = _make_tap(layer, source, k, bool(entry["centered"]), stats)
    if (tap.count, tap.sum, tap.sumsq) != (outputs["count"], outputs["sum"], outputs["sumsq"]):
        raise ValueError(f"expected tap output names {tap.outputs} (got {outputs})")
    return tap


def read_taps(onnx_model: onnx.ModelProto) -> dict[str, BnTap]:
    """The taps written by :func:`add_drift_taps`, layer name to :class:`BnTap`.

    The per-channel constants (:attr:`BnTap.gain` ...) are read from the model's
    initializers, so the mapping always matches the statistics the model holds.
    """
    raw = next((p.value for p in onnx_model.metadata_props if p.key == TAP_METADATA_KEY), None)
    if raw is None:
        raise ValueError(
            f"expected metadata {TAP_METADATA_KEY!r} (got a model without drift taps; "
            "build one with add_drift_taps)"
        )
    payload = json.loads(raw)
    if payload.get("format") not in _FORMATS:
        raise ValueError(
            f"expected drift-tap format {' or '.join(map(str, _FORMATS))} "
            f"(got {payload.get('format')!r})"
        )
    index = GraphIndex(onnx_model, infer_types=False)
    taps: dict[str, BnTap] = {}
    try:
        for layer, entry in payload["layers"].items():
            if payload["format"] < 2 and "pooled" in entry["outputs"]:
                raise ValueError(f"expected no pooled taps in format 1 (got {layer!r})")
            taps[layer] = _tap_from_json(index, layer, entry)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"expected drift-tap metadata of format {payload['format']} (got {exc!r})"
        ) from None
    _check_pooled_columns(index, taps)
    return taps


def tap_output_names(mapping: Mapping[str, BnTap]) -> list[str]:
    """Every tap output name in the graph's order (to pass as ``output_names`` to ORT):
    the summed layers' three each, layer by layer, then the pooled output once."""
    summed = [n for tap in mapping.values() if tap.pooled_offset is None for n in tap.outputs]
    pooled = any(tap.pooled_offset is not None for tap in mapping.values())
    return summed + ([POOLED_OUTPUT] if pooled else [])


def _rows_to_window(tap: BnTap, count: float, s1: FloatArray, s2: FloatArray) -> MomentWindow:
    if s1.ndim != 2 or s2.shape != s1.shape:
        raise ValueError(
            f"expected (N, C) sums for tap {tap.layer!r} (got {s1.shape} and {s2.shape})"
        )
    if count <= 0.0:
        return MomentWindow.empty(s1.shape[1])
    d = s1 / count  # row mean of v - centre
    m2_v = np.maximum(s2 - s1 * d, 0.0)
    mean_x = tap.base + tap.gain * ((tap.center - tap.offset) + d)
    m2_x = tap.gain * tap.gain * m2_v
    mean = mean_x.mean(axis=0)
    m2 = m2_x.sum(axis=0) + count * ((mean_x - mean) ** 2).sum(axis=0)
    return MomentWindow(np.asarray(count * s1.shape[0]), mean, m2)


def tap_moments(
    tap_outputs: Mapping[str, npt.ArrayLike], mapping: Mapping[str, BnTap]
) -> dict[str, MomentWindow]:
    """Per-layer windows of ``X`` for one run, from its tap outputs (by output name).

    The ``N`` rows are merged exactly in float64 (all rows have the same count ``L``):
    ``mean = mean_n(mean_n)``, ``m2 = sum_n(m2_n) + L * sum_n((mean_n - mean)**2)``.

    Args:
        tap_outputs: output name to array, e.g. ``dict(zip(names, session.run(names, feed)))``.
        mapping: from :func:`read_taps`; every layer in it is converted.
    """
    missing = [n for n in tap_output_names(mapping) if n not in tap_outputs]
    if missing:
        raise ValueError(f"expected every tap output (missing {missing[:4]})")
    return {
        layer: _rows_to_window(tap, *_row_sums(tap, tap_outputs)) for layer, tap in mapping.items()
    }


def _row_sums(
    tap: BnTap, tap_outputs: Mapping[str, npt.ArrayLike]
) -> tuple[float, FloatArray, FloatArray]:
    """``(L, sums, sums of squares)`` of ``tap``'s rows, from either form of its outputs."""
    if tap.pooled_offset is None or tap.channels is None or tap.fixed_count is None:
        return (
            float(np.asarray(tap_outputs[tap.count])),
            np.asarray(tap_outputs[tap.sum], dtype=np.float64),
            np.asarray(tap_outputs[tap.sumsq], dtype=np.float64),
        )
    pooled = np.asarray(tap_outputs[tap.sum])
    start, width = tap.pooled_offset, tap.channels
    if (
        pooled.ndim < 2
        or pooled.shape[1] < start + 2 * width
        or any(d != 1 for d in pooled.shape[2:])
    ):
        raise ValueError(
            f"expected pooled rows (N, >= {start + 2 * width}, 1, 1) for tap {tap.layer!r} "
            f"(got shape {pooled.shape})"
        )
    rows = pooled.reshape(pooled.shape[0], pooled.shape[1])
    count = float(tap.fixed_count)
    means = rows[:, start : start + width].astype(np.float64)
    squares = rows[:, start + width : start + 2 * width].astype(np.float64)
    return count, means * count, squares * count


def reference_stats(
    onnx_model: onnx.ModelProto, mapping: Mapping[str, BnTap] | None = None
) -> dict[str, tuple[FloatArray, FloatArray]]:
    """Each tapped layer's stored ``(running_mean, running_var)`` in float64.

    The reference for :func:`recalib.drift.score_model`. ``running_var`` is what the model
    holds: PyTorch exports store the unbiased variance.

    Args:
        onnx_model: the tapped model (or the model it was tapped from).
        mapping: the taps; read from ``onnx_model`` when ``None``.
    """
    taps = read_taps(onnx_model) if mapping is None else mapping
    index = GraphIndex(onnx_model, infer_types=False)
    out: dict[str, tuple[FloatArray, FloatArray]] = {}
    for layer, tap in taps.items():
        mean, var = index.constant(tap.mean), index.constant(tap.var)
        if mean is None or var is None:
            raise ValueError(
                f"expected constant running statistics for layer {layer!r} "
                f"(got {tap.mean!r} / {tap.var!r} computed or fed at run time)"
            )
        out[layer] = (mean, var)
    return out
