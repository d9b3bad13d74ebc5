"""A stat bank's route limit from its own calibration data: no labels needed.

Routing (:mod:`recalib.onnx.banks`) sends a row to the nearest bank by ``d``, the Gaussian
KL of the row's stem BN-input moments from the bank's statistics, and a routed row farther
than ``min(recalib_route_threshold, recalib_route_limit[bank])`` from the bank it picked
falls back to bank 0. One global threshold does not fit: the scale of ``d`` differs ~8x
between models and between banks of one model (``docs/benchmarks.md``, "Stat banks on real
networks"). :func:`bank_route_limit` gives each bank its own: a high quantile (default
0.99) of the distance of the bank's *calibration* rows to the bank, measured by the bank
graph itself (ONNX Runtime, CPU; the bank at index 1, chosen explicitly), so it is the same
``d`` serving compares, in the same float32 arithmetic. A bank job computes it on the job's
data and stores it in the bank file (:data:`~recalib.onnx.bank_files.ROUTE_LIMIT_KEY`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from ..errors import DataError, OnnxModelError, OptionsError
from .banks import (
    BANK_METADATA_KEY,
    DISTANCE_OUTPUT,
    BankLike,
    BankTables,
    add_bank_inputs,
    read_bank_spec,
)
from .graph import ORT_NUMPY_TYPES

__all__ = ["DEFAULT_QUANTILE", "bank_route_limit", "route_distances"]

DEFAULT_QUANTILE = 0.99
"""The quantile of the calibration rows' distances that :func:`bank_route_limit` returns."""


def _bank_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it is a routed bank graph, else ``add_bank_inputs`` of it."""
    if any(p.key == BANK_METADATA_KEY for p in model.metadata_props):
        if not read_bank_spec(model).routed:
            raise OnnxModelError(
                "expected a bank graph with routing (add_bank_inputs(model, route_layers>=1)) "
                "(got one built with route_layers=0: it computes no distance)"
            )
        return model
    return add_bank_inputs(model, route_layers=1)


def _data_input(session: Any, fed: set[str]) -> tuple[str, np.dtype[Any]]:
    """The one input of the original model (the others are the tables' feed, ``fed``)."""
    inputs = [i for i in session.get_inputs() if i.name not in fed]
    if len(inputs) != 1:
        raise OnnxModelError(
            "expected a model with one data input to feed the calibration rows to "
            f"(got {len(inputs)}: {[i.name for i in inputs][:4]})"
        )
    return inputs[0].name, np.dtype(ORT_NUMPY_TYPES.get(inputs[0].type, np.float32))


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they derive from ``Exception`` only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "EPFail")
    return (*(getattr(state, n) for n in names if hasattr(state, n)), RuntimeError)


def route_distances(
    model: onnx.ModelProto,
    bank: BankLike,
    data: npt.ArrayLike,
    *,
    batch_size: int = 64,
    threads: int = 1,
) -> npt.NDArray[np.float64]:
    """``d`` of every row of ``data`` to ``bank``, as the bank graph computes it.

    Args:
        model: the model the bank is for (its bank graph is built with
            ``add_bank_inputs(model, route_layers=1)``), or a routed bank graph already.
        bank: the bank's statistics (a :class:`~recalib.statbank.StatBank`, a bank file's
            ``stats`` or ``{layer or node key: (mean, var)}``).
        data: rows of the model's input, ``(N, ...)`` (a memory-mapped array is read one
            batch at a time), cast to the input's dtype.
        batch_size: rows per ONNX Runtime run (``d`` is per row: it does not change ``d``).
        threads: ONNX Runtime intra-op threads.

    Returns:
        ``[N]`` float64 (the graph's float32 values).

    Raises:
        DataError: ``data`` has no rows or is not at least 1-D; ONNX Runtime refused a
            batch (shape, dtype); a distance is NaN or infinite (NaN/Inf in the data).
        OptionsError: ``batch_size`` or ``threads`` < 1.
        OnnxModelError: the model cannot be rewritten with routing (see
            :func:`~recalib.onnx.banks.add_bank_inputs`) or has more than one data input.
        StatBankMismatchError: the bank does not fit the model.
    """
    import onnxruntime as ort  # lazily: importing recalib.onnx does not need it

    if batch_size < 1 or threads < 1:
        raise OptionsError(
            f"expected batch_size >= 1 and threads >= 1 (got {batch_size} and {threads})"
        )
    rows = data if isinstance(data, np.ndarray) else np.asarray(data)
    if rows.ndim < 1 or len(rows) == 0:
        raise DataError(f"expected calibration rows (N, ...) with N >= 1 (got shape {rows.shape})")
    graph = _bank_graph(model)
    tables = BankTables(graph, [bank])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        graph.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    name, dtype = _data_input(session, set(tables.feed([1])))
    errors = _ort_errors()
    out = []
    for start in range(0, len(rows), batch_size):
        x = np.ascontiguousarray(rows[start : start + batch_size], dtype=dtype)
        feed = {name: x, **tables.feed(np.ones(len(x), dtype=np.int64))}
        try:
            got = session.run([DISTANCE_OUTPUT], feed)[0]
        except errors as exc:
            raise DataError(
                f"expected calibration rows the model accepts (ONNX Runtime failed on rows "
                f"{start}..{start + len(x) - 1}, shape {x.shape}: {exc})"
            ) from exc
        out.append(np.asarray(got, dtype=np.float64))
    dist = np.concatenate(out)
    bad = ~np.isfinite(dist)
    if bad.any():
        raise DataError(
            f"expected finite distances of the calibration rows to the bank (got {int(bad.sum())} "
            f"of {len(dist)} NaN/Inf, first at row {int(np.flatnonzero(bad)[0])}: NaN/Inf in the "
            "data?)"
        )
    return dist


def bank_route_limit(
    model: onnx.ModelProto,
    bank: BankLike,
    data: npt.ArrayLike,
    *,
    quantile: float = DEFAULT_QUANTILE,
    batch_size: int = 64,
    threads: int = 1,
) -> float:
    """The route limit of ``bank``: the ``quantile`` of its calibration rows' distance to it.

    Feed it to :meth:`BankTables.add(..., route_limit=...) <recalib.onnx.banks.BankTables.add>`
    (or store it in the bank file under :data:`~recalib.onnx.bank_files.ROUTE_LIMIT_KEY`): a
    routed row farther from the bank than its own domain's rows typically are falls back to
    bank 0. Label-free; computed on the data the bank was computed from.

    Args:
        model: as :func:`route_distances` (the model, or its routed bank graph).
        bank: the bank's statistics.
        data: the bank's calibration rows ``(N, ...)``.
        quantile: in ``(0, 1]``; ``1`` is the largest distance.
        batch_size: rows per ONNX Runtime run.
        threads: ONNX Runtime intra-op threads.

    Returns:
        The limit (``np.quantile``, linear), rounded up to the next float32 when it is not
        one, so that every row at or below it in float64 stays at or below it in the graph.

    Raises:
        OptionsError: ``quantile`` not in ``(0, 1]``, or ``batch_size`` / ``threads`` < 1.
        DataError: fewer rows than ``1 / (1 - quantile)`` (100 for 0.99); and as
            :func:`route_distances`.
        OnnxModelError, StatBankMismatchError: as :func:`route_distances`.
    """
    if isinstance(quantile, bool) or not (isinstance(quantile, (int, float)) and 0 < quantile <= 1):
        raise OptionsError(f"expected a quantile in (0, 1] (got {quantile!r})")
    dist = route_distances(model, bank, data, batch_size=batch_size, threads=threads)
    needed = math.ceil(1.0 / (1.0 - float(quantile)) - 1e-9) if quantile < 1 else 1
    if dist.size < needed:
        raise DataError(
            f"expected at least {needed} calibration rows for a {quantile} quantile of the "
            f"route distance (got {dist.size}): a limit from fewer would send most of the "
            "bank's own domain to bank 0"
        )
    # the graph's distance is a difference of float32 sums: a row equal to the bank comes
    # out a few ulps below 0, and the limit of a KL is never negative
    limit = max(float(np.quantile(dist, float(quantile))), 0.0)
    f32 = np.float32(limit)
    if float(f32) < limit:
        f32 = np.nextafter(f32, np.float32(math.inf))
    return float(f32)
