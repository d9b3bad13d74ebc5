"""Stat-bank files for ONNX versions: the weights digest and torch-free bank files.

A stat bank (:mod:`recalib.statbank`) holds only BN statistics, so it is right for a model
only if it was computed *with that model's weights*: BN statistics depend on every weight
before the layer, and two networks with the same layer names and channel counts (a
fine-tuned version, another seed) take the same bank without complaint and answer wrong.
:func:`weights_digest` names the weights a bank belongs to:

* sha256 over every constant a node of the main graph reads (initializers and ``Constant``
  values, through ``Identity`` chains), **except** the ``input_mean`` / ``input_var`` of
  inference ``BatchNormalization`` nodes, each counted once, in the order the graph's
  nodes first read them (node order, then input slot). A tensor contributes its dtype,
  shape and values, never its name, so re-exporting the same torch weights (new tensor
  names, statistics re-tagged) gives the same digest. ``BN scale`` / ``B`` are weights: they
  count.
* Recalibrated versions of one model (new statistics, same weights) share the digest; a
  fine-tuned or otherwise retrained version does not.

A bank file is the :class:`~recalib.statbank.StatBank` safetensors format
(``recalib.statbank/1``: ``<layer>.running_mean`` / ``.running_var`` keyed by torch layer
name, the layer signature) whose ``metadata`` JSON carries ``weights_digest``
(:data:`WEIGHTS_DIGEST_KEY`). :func:`save_onnx_bank` writes one for an ONNX model without
torch (``safetensors.numpy``); :func:`read_bank_file` reads one; :func:`check_bank` says
whether a bank fits a model: equal digests and the same BN layers (names and channel
counts), finite statistics, variances >= 0. A torch user stamps a bank with
``save_stat_bank(model, path, metadata={"weights_digest": weights_digest(onnx_model)})``.

A bank's ``metadata`` may also carry its route limit (:data:`ROUTE_LIMIT_KEY`, a number
>= 0: routed rows farther from the bank fall back to the version's statistics,
:meth:`recalib.onnx.banks.BankTables.add`) and the quantile it was computed at
(:data:`ROUTE_LIMIT_QUANTILE_KEY`, informative); a bank job stores both
(:func:`recalib.onnx.bank_routing.bank_route_limit` of its calibration data).
:attr:`BankFile.route_limit` reads it (``inf`` when absent), :meth:`BankFile.check_values`
checks it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from ..errors import StatBankMismatchError
from .graph import GraphIndex
from .names import bn_nodes, read_bn_map

if TYPE_CHECKING:
    from ..statbank import StatBank

__all__ = [
    "BANK_FORMAT",
    "ROUTE_LIMIT_KEY",
    "ROUTE_LIMIT_QUANTILE_KEY",
    "WEIGHTS_DIGEST_KEY",
    "BankFile",
    "bn_layers",
    "check_bank",
    "check_stat_values",
    "layer_difference",
    "layer_signature",
    "read_bank_file",
    "save_onnx_bank",
    "weights_digest",
]

BANK_FORMAT = "recalib.statbank/1"
"""The safetensors ``format`` metadata of a bank file (:mod:`recalib.statbank`'s)."""

WEIGHTS_DIGEST_KEY = "weights_digest"
"""The key of the weights digest in a bank's ``metadata``."""

ROUTE_LIMIT_KEY = "route_limit"
"""The key of a bank's route limit in its ``metadata``: a number >= 0 (JSON), e.g.
:func:`recalib.onnx.bank_routing.bank_route_limit`; absent: none (``inf``)."""

ROUTE_LIMIT_QUANTILE_KEY = "route_limit_quantile"
"""The key of the quantile the route limit was computed at (informative only)."""

_DIGEST_TAG = b"recalib.weights/1\0"
_MEAN, _VAR = 3, 4

Array = npt.NDArray[Any]
StatsLike = Union["StatBank", Mapping[str, tuple[Any, Any]]]
"""A :class:`~recalib.statbank.StatBank` or ``{torch layer or BN node key: (mean, var)}``."""


def layer_signature(layers: list[tuple[str, int]]) -> str:
    """:func:`recalib.layers.layer_signature` without torch (same digest)."""
    payload = json.dumps([[n, int(c)] for n, c in layers]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def weights_digest(model: onnx.ModelProto) -> str:
    """The sha256 (hex) of ``model``'s weights, BN statistics excluded (module docstring).

    Initializers must be loaded (``onnx.load`` with external data).
    """
    index = GraphIndex(model.graph)
    stats = {
        index.resolve(node.input[slot]) for _, node in bn_nodes(index) for slot in (_MEAN, _VAR)
    }
    digest = hashlib.sha256(_DIGEST_TAG)
    # Each tensor once, by the name it is stored under (an initializer's, a Constant's
    # output): not by id() of the proto object, which for a Constant's value is a
    # temporary wrapper whose id the next one may reuse.
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type in ("Identity", "Constant"):
            continue  # read through: what they hold counts where a real node reads it
        for name in node.input:
            if not name:
                continue
            source = index.resolve(name)
            if source in seen or source in stats:
                continue
            tensor = index.const(source)
            if tensor is None:
                continue
            seen.add(source)
            arr = np.ascontiguousarray(numpy_helper.to_array(tensor))
            header = json.dumps([arr.dtype.str, list(arr.shape)]).encode()
            digest.update(len(header).to_bytes(4, "little") + header)
            digest.update(arr.tobytes())
    return digest.hexdigest()


def bn_layers(model: onnx.ModelProto) -> dict[str, int]:
    """``{layer: channels}`` of the model's inference BN nodes (torch layer names when
    recalib exported it, node keys otherwise), in graph order."""
    return {info.layer: info.channels for info in read_bn_map(model).values()}


@dataclass
class BankFile:
    """A bank file's contents, as NumPy arrays.

    Attributes:
        stats: ``{layer: (mean, var)}`` in the file's order.
        signature: the layer signature the file records.
        metadata: its free-form metadata (``weights_digest`` among them, when stamped).
    """

    stats: dict[str, tuple[Array, Array]]
    signature: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str | None:
        """The weights digest it was stamped with (``None``: not stamped)."""
        value = self.metadata.get(WEIGHTS_DIGEST_KEY)
        return value if isinstance(value, str) and value else None

    @property
    def route_limit(self) -> float:
        """The route limit in its metadata (:data:`ROUTE_LIMIT_KEY`), ``inf`` without one.

        Raises:
            StatBankMismatchError: the value is not a number >= 0 (a string, a bool,
                ``null``, NaN, negative).
        """
        if ROUTE_LIMIT_KEY not in self.metadata:
            return float("inf")
        value = self.metadata[ROUTE_LIMIT_KEY]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            number = float(value) if ok else math.nan
        except OverflowError:  # an integer past float range: as large as a limit gets
            number = math.inf
        if not number >= 0:  # NaN fails too
            raise StatBankMismatchError(
                f"expected metadata {ROUTE_LIMIT_KEY!r} to be a number >= 0 (got "
                f"{type(value).__name__} {repr(value)[:40]})"
            )
        return number

    @property
    def layers(self) -> dict[str, int]:
        """``{layer: channels}``, from the tensors."""
        return {name: int(mean.shape[0]) for name, (mean, _) in self.stats.items()}

    def check_values(self) -> None:
        """Raises: StatBankMismatchError: a non-1-D, mismatched, non-finite or negative
        statistic, or a route limit that is not a number >= 0 (:attr:`route_limit`)."""
        _ = self.route_limit  # read for its check
        for name, (mean, var) in self.stats.items():
            if mean.ndim != 1 or mean.shape != var.shape:
                raise StatBankMismatchError(
                    f"expected running_mean and running_var of one shape (C,) for layer "
                    f"{name!r} (got {mean.shape} and {var.shape})"
                )
            check_stat_values(name, mean, var)


def check_stat_values(layer: str, mean: npt.NDArray[Any], var: npt.NDArray[Any]) -> None:
    """A bank layer's statistics are usable: finite, and the variance not negative.

    Raises:
        StatBankMismatchError: they are not (naming ``layer``).
    """
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        raise StatBankMismatchError(f"expected finite statistics for layer {layer!r} (got NaN/Inf)")
    if np.any(var < 0):
        raise StatBankMismatchError(
            f"expected var >= 0 for layer {layer!r} (got min {float(var.min()):.6g})"
        )


def layer_difference(expected: Mapping[str, int], got: Mapping[str, int]) -> str | None:
    """How the layers ``got`` differ from ``expected`` (missing, unexpected, channel
    counts), or ``None`` when they are the same."""
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    channels = [f"{n}: {got[n]} != {c}" for n, c in expected.items() if n in got and got[n] != c]
    if not (missing or unexpected or channels):
        return None
    parts = [
        f"{what} {items[:6]}" + (f" (+{len(items) - 6})" if len(items) > 6 else "")
        for what, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("channel counts", channels),
        )
        if items
    ]
    return "; ".join(parts)


def _as_array(value: Any) -> Array:
    if hasattr(value, "detach"):  # a torch tensor: no torch import
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def save_onnx_bank(
    model: onnx.ModelProto,
    stats: StatsLike,
    path: str | Path,
    *,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> BankFile:
    """Write a bank for ``model`` (its weights digest stamped in) to ``path``.

    Args:
        model: the ONNX version the statistics were computed with (its weights).
        stats: a :class:`~recalib.statbank.StatBank` or ``{layer or node key: (mean, var)}``
            for every BN layer of ``model`` (e.g. :func:`~recalib.onnx.names.bn_node_stats`
            of a recalibrated copy).
        path: the ``.safetensors`` file to write.
        name: recorded as ``metadata["name"]``.
        metadata: free-form string-keyed metadata (JSON-serialisable values).

    Returns:
        What was written, as :func:`read_bank_file` reads it back.

    Raises:
        StatBankMismatchError: a layer missing or unknown, a channel count, a non-finite
            value or a negative variance.
    """
    from safetensors.numpy import save_file

    infos = read_bn_map(model)
    entries = getattr(stats, "stats", stats)
    if not isinstance(entries, Mapping):
        raise StatBankMismatchError(
            f"expected a StatBank or a mapping of layer -> (mean, var) (got {type(stats).__name__})"
        )
    by_layer: dict[str, tuple[Array, Array]] = {}
    for key, (mean, var) in entries.items():
        layer = infos[key].layer if key in infos else str(key)
        by_layer[layer] = (_as_array(mean), _as_array(var))
    bank = BankFile(by_layer, "")
    expected = {info.layer: info.channels for info in infos.values()}
    difference = layer_difference(expected, bank.layers) if by_layer else "no layers"
    if difference is not None:
        raise StatBankMismatchError(
            f"expected statistics for the {len(expected)} BN layers of the model (got {difference})"
        )
    bank.check_values()
    ordered = {layer: by_layer[layer] for layer in expected}
    meta = dict(metadata or {})
    if name is not None:
        meta["name"] = name
    meta[WEIGHTS_DIGEST_KEY] = weights_digest(model)
    tensors: dict[str, Array] = {}
    for layer, (mean, var) in ordered.items():
        dtype = mean.dtype if mean.dtype in (np.float16, np.float32, np.float64) else np.float32
        tensors[f"{layer}.running_mean"] = np.ascontiguousarray(mean, dtype=dtype)
        tensors[f"{layer}.running_var"] = np.ascontiguousarray(var, dtype=dtype)
    signature = layer_signature(list(expected.items()))
    save_file(
        tensors,
        str(path),
        metadata={
            "format": BANK_FORMAT,
            "signature": signature,
            "layers": json.dumps(list(ordered)),
            "metadata": json.dumps(meta),
        },
    )
    return BankFile(ordered, signature, meta)


def read_bank_file(path: str | Path) -> BankFile:
    """Read a bank file (:func:`save_onnx_bank` or :func:`recalib.statbank.save_stat_bank`).

    Raises:
        StatBankMismatchError: not a safetensors bank of :data:`BANK_FORMAT`, or its
            metadata does not list its tensors.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != BANK_FORMAT:
                raise StatBankMismatchError(
                    f"expected a recalib stat bank (safetensors, format {BANK_FORMAT}) "
                    f"(got format {meta.get('format')!r})"
                )
            names = json.loads(meta["layers"])
            extra = json.loads(meta.get("metadata", "{}"))
            if not isinstance(names, list) or not isinstance(extra, dict):
                raise StatBankMismatchError(
                    "expected 'layers' (a JSON list) and 'metadata' (a JSON object) in the "
                    f"bank's metadata (got {type(names).__name__}, {type(extra).__name__})"
                )
            keys = set(f.keys())
            stats: dict[str, tuple[Array, Array]] = {}
            for n in names:
                mean, var = f"{n}.running_mean", f"{n}.running_var"
                if mean not in keys or var not in keys:
                    raise StatBankMismatchError(
                        f"expected tensors {mean!r} and {var!r} in the bank (listed in its "
                        "layers; got neither or one)"
                    )
                stats[str(n)] = (f.get_tensor(mean), f.get_tensor(var))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise StatBankMismatchError(
            f"expected a recalib stat bank (safetensors, format {BANK_FORMAT}) (got a file "
            f"that does not read as one: {exc})"
        ) from exc
    return BankFile(stats, str(meta.get("signature", "")), extra)


def check_bank(model: onnx.ModelProto, bank: BankFile) -> None:
    """Refuse a bank that is not for ``model``'s weights and BN layers.

    Raises:
        StatBankMismatchError: no digest, another digest, other layers or channel counts,
            non-finite statistics or negative variances.
    """
    if bank.digest is None:
        raise StatBankMismatchError(
            f"expected a bank stamped with metadata {WEIGHTS_DIGEST_KEY!r} (got none): write "
            "it with recalib.onnx.bank_files.save_onnx_bank(onnx_model, stats, path)"
        )
    digest = weights_digest(model)
    if bank.digest != digest:
        raise StatBankMismatchError(
            f"expected a bank computed with weights {digest[:16]}... (got {bank.digest[:16]}...: "
            "statistics of other weights)"
        )
    difference = layer_difference(bn_layers(model), bank.layers)
    if difference is not None:
        raise StatBankMismatchError(f"expected the model's BN layers (got {difference})")
    bank.check_values()
