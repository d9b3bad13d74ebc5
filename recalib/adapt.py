"""``adapt`` / ``adapt_onnx``: recalibrate, then deploy the plan the evidence supports.

:func:`recalib.recalibrate` and :func:`recalib.recalibrate_onnx` estimate new statistics
for every selected layer. These two functions run them once, build the candidate plans of
:mod:`recalib.plans` from the result (source, full, first ``k`` layers, prior mixes), score
the candidates - on a labeled validation set when one is given, else with the label-free
confident-agreement guard - and deploy the chosen one. The report carries every candidate
and the choice in ``report.plan``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from .batches import Batch, ForwardFn, iterate_batches
from .errors import DataError, OptionsError
from .exported import resolve_model
from .layers import NormLayer, current_stats, find_norm_layers
from .modes import eval_mode
from .onnx.graph import ORT_NUMPY_TYPES, GraphIndex
from .onnx.names import bn_nodes, read_bn_map, set_bn_node_stats
from .onnx.recalibrate import load_onnx_model, ort_errors, recalibrate_onnx
from .options import RecalibOptions
from .plans import FloatArray, Metric, Stats, check_plan_args, class_rows, select_plan
from .recalibrate import recalibrate
from .report import RecalibrationReport, compare_stats

__all__ = ["GUARD_ITEMS", "adapt", "adapt_onnx", "data_flow_order"]

GUARD_ITEMS = 256
"""Calibration items the label-free guard scores each candidate on (the first ones)."""

Validation = tuple[Any, Any]


def _labels(validation: Validation | None) -> tuple[Any, np.ndarray] | None:
    if validation is None:
        return None
    if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
        raise OptionsError(
            f"expected validation=(inputs, labels) (got {type(validation).__name__})"
        )
    x, y = validation
    labels = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise OptionsError(
            f"expected integer class labels for validation (got {labels.dtype}, "
            f"{labels.size} values)"
        )
    if labels.min() < 0:
        raise OptionsError(f"expected class labels >= 0 (got min {labels.min()})")
    items = len(x) if isinstance(x, (Tensor, np.ndarray)) else None
    if items is not None and (labels.ndim == 0 or labels.shape[0] != items):
        raise OptionsError(
            f"expected one label per validation input ({items}) (got labels of shape "
            f"{tuple(labels.shape)})"
        )
    return x, labels


def _checked_call(
    data: Any,
    validation: Validation | None,
    plan: tuple[str, float, float, float],
    guard_items: int,
    batch_size: int,
    options: dict[str, Any],
) -> tuple[Any, np.ndarray] | None:
    """What :func:`adapt` and :func:`adapt_onnx` check before any work: the recalibration
    options, the plan, the guard's size, re-iterable data when candidates are scored; the
    validation pair."""
    fields = {f.name for f in dataclasses.fields(RecalibOptions)}
    RecalibOptions(batch_size=batch_size, **{k: v for k, v in options.items() if k in fields})
    check_plan_args(*plan)  # ``(plan, z, confidence, tolerance)``
    if isinstance(guard_items, bool) or not isinstance(guard_items, int) or guard_items < 1:
        raise OptionsError(f"expected guard_items >= 1 (got {guard_items!r})")
    if plan[0] == "auto" and _one_shot(data):
        raise DataError(
            "plan='auto' reads the calibration data again to score candidates; expected a "
            f"re-iterable (tensor, array, list, DataLoader) (got a one-shot {type(data).__name__})"
        )
    return _labels(validation)


def _one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False


def _report_for(
    report: RecalibrationReport, source: Stats, deployed: Stats, eps: dict[str, float]
) -> None:
    """Rewrite the per-layer comparison for the deployed statistics, in place.

    ``source`` / ``deployed`` / ``eps`` are keyed by the report's layer names.
    """
    rows = []
    for row in report.layers:
        if row.name not in deployed or row.name not in source:
            rows.append(row)
            continue
        old = (torch.from_numpy(source[row.name][0]), torch.from_numpy(source[row.name][1]))
        new = (torch.from_numpy(deployed[row.name][0]), torch.from_numpy(deployed[row.name][1]))
        changes: dict[str, Any] = compare_stats(old, new, eps.get(row.name, 1e-5))
        rows.append(dataclasses.replace(row, **changes))
    report.layers = rows


# --------------------------------------------------------------------------- torch


def _torch_layers(model: Any, layers: Any) -> tuple[nn.Module, list[NormLayer]]:
    net, pre = resolve_model(model)
    return net, pre if pre is not None else find_norm_layers(net, layers)[0]


def _stats(layer: NormLayer) -> tuple[FloatArray, FloatArray] | None:
    m = layer.module
    mean, var = m.running_mean, m.running_var
    if mean is None or var is None or isinstance(mean, nn.parameter.UninitializedBuffer):
        return None
    mean64, var64 = current_stats(layer)
    return mean64.cpu().numpy(), var64.cpu().numpy()


def _write(layer: NormLayer, stats: tuple[FloatArray, FloatArray]) -> None:
    m = layer.module
    assert m.running_mean is not None and m.running_var is not None  # noqa: S101
    m.running_mean.copy_(torch.from_numpy(stats[0]).to(m.running_mean))
    m.running_var.copy_(torch.from_numpy(stats[1]).to(m.running_var))


@contextlib.contextmanager
def _call_order(layers: Sequence[NormLayer]) -> Iterator[list[str]]:
    """Record the order in which ``layers`` are first called (data-flow order)."""
    order: list[str] = []
    handles = []
    for lay in layers:

        def hook(_m: nn.Module, _args: Any, name: str = lay.name) -> None:
            if name not in order:
                order.append(name)

        handles.append(lay.module.register_forward_pre_hook(hook))
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def data_flow_order(
    model: nn.Module | torch.export.ExportedProgram,
    data: Any,
    *,
    layers: str | Sequence[str] | None = None,
    forward: ForwardFn | None = None,
) -> list[str]:
    """The BN layers of ``model`` in the order its forward first calls them on the first
    batch of ``data`` (layers never called come last, in module order)."""
    net, selected = _torch_layers(model, layers)
    first = list(iterate_batches(data, max_samples=2, forward=forward))
    with _call_order(selected) as order:
        _run_rows(net, first[:1], forward, scores=False)
    return order + [lay.name for lay in selected if lay.name not in order]


def _run_rows(
    net: nn.Module, batches: Sequence[Batch], forward: ForwardFn | None, *, scores: bool = True
) -> FloatArray:
    """Class scores of ``net`` on ``batches`` (with ``scores=False`` only run them)."""
    rows = []
    with torch.no_grad(), eval_mode(net):
        for batch in batches:
            try:
                out = batch.run(net, forward)
            # AssertionError: an ExportedProgram's shape guard rejecting this batch.
            except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
                raise DataError(
                    f"the model's forward failed on batch {batch.index}: {exc}"
                ) from exc
            if scores:
                rows.append(class_rows(out))
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def adapt(
    model: nn.Module | torch.export.ExportedProgram,
    data: Any,
    *,
    validation: Validation | None = None,
    metric: Metric | None = None,
    plan: str = "auto",
    z: float = 1.0,
    confidence: float = 0.8,
    tolerance: float = 0.1,
    guard_items: int = GUARD_ITEMS,
    batch_size: int = 64,
    layers: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
    **options: Any,
) -> RecalibrationReport:
    """Recalibrate ``model`` and deploy the plan the evidence supports, in place.

    Args:
        model: an ``nn.Module`` or ``torch.export.ExportedProgram`` whose outputs are
            class scores ``(N, classes, *)`` (first item of a tuple/dict output).
        data: unlabeled calibration data, as for :func:`recalib.recalibrate`; it is read
            again to score the candidates, so it must be re-iterable.
        validation: ``(inputs, labels)`` from the new domain: candidates are scored by
            accuracy (or ``metric``) on it. Without it the label-free guard decides.
        metric: ``metric(scores, labels) -> float``, higher is better; scores are
            ``(rows, classes)`` and labels ``(rows,)``.
        plan: ``"auto"`` (choose), ``"full"`` (every selected layer) or ``"source"``.
        z: standard errors of the paired difference an adapted plan must beat the source
            by on the validation set.
        confidence: source probability counted as confident by the label-free guard.
        tolerance: the guard's budget (see :mod:`recalib.plans`).
        guard_items: calibration items the guard scores candidates on.
        batch_size, layers, device, forward: as for :func:`recalib.recalibrate`.
        **options: passed to :func:`recalib.recalibrate` (``method``, ``mode``, ...).

    Returns:
        The :class:`~recalib.report.RecalibrationReport` of the deployed statistics, with
        ``report.plan`` (a :class:`~recalib.plans.PlanReport` as a dict).
    """
    checked = _checked_call(
        data, validation, (plan, z, confidence, tolerance), guard_items, batch_size, options
    )
    dev = torch.device(device) if device is not None else None
    net, selected = _torch_layers(model, layers)
    before = {lay.name: s for lay in selected if (s := _stats(lay)) is not None}
    scoring = plan == "auto"  # a forced plan needs no candidate scoring
    guard = (
        list(
            iterate_batches(
                data, batch_size=batch_size, max_samples=guard_items, device=dev, forward=forward
            )
        )
        if scoring
        else []
    )
    val_batches = (
        list(iterate_batches(checked[0], batch_size=batch_size, device=dev))
        if checked is not None and scoring
        else []
    )
    report = recalibrate(
        model,
        data,
        batch_size=batch_size,
        layers=layers,
        device=device,
        forward=forward,
        **options,
    )
    done = {row.name for row in report.layers}
    chosen_layers = [lay for lay in selected if lay.name in done]
    after = {lay.name: s for lay in chosen_layers if (s := _stats(lay)) is not None}
    for name, (mean, var) in after.items():
        # A lazy layer materialised by this call: its source is the fresh 0 / 1 it got.
        before.setdefault(name, (np.zeros_like(mean), np.ones_like(var)))
    try:
        with _call_order(chosen_layers) as order:
            if scoring:
                _run_rows(net, guard[:1], forward, scores=False)
        order += [lay.name for lay in chosen_layers if lay.name not in order]  # never called
        by_name = {lay.name: lay for lay in chosen_layers}

        def evaluate(stats: Stats) -> tuple[FloatArray, FloatArray | None]:
            for name, st in stats.items():
                _write(by_name[name], st)
            rows = _run_rows(net, guard, forward)
            val = _run_rows(net, val_batches, forward) if checked is not None else None
            return rows, val

        plan_report, deployed = select_plan(
            order,
            before,
            after,
            report.samples,
            evaluate,
            plan=plan,
            validation_labels=None if checked is None else checked[1],
            metric=metric,
            z=z,
            confidence=confidence,
            tolerance=tolerance,
            eps={lay.name: lay.module.eps for lay in chosen_layers},
        )
        for name, st in deployed.items():
            _write(by_name[name], st)
    except BaseException:
        for lay in chosen_layers:
            _write(lay, before[lay.name])
        raise
    _report_for(report, before, deployed, {lay.name: lay.module.eps for lay in chosen_layers})
    report.plan = plan_report.to_dict()
    return report


# --------------------------------------------------------------------------- ONNX


def _node_order(model: onnx.ModelProto) -> list[str]:
    return [key for key, _ in bn_nodes(GraphIndex(model.graph))]


def _stored_stats(model: onnx.ModelProto) -> Stats:
    """Float64 ``(mean, var)`` of every BN node whose statistics are stored (nodes whose
    statistics are graph inputs are left out: they cannot be recalibrated)."""
    index = GraphIndex(model.graph)
    out: Stats = {}
    for key, info in read_bn_map(model).items():
        mean, var = index.constant(info.mean), index.constant(info.var)
        if mean is not None and var is not None:
            out[key] = (mean, var)
    return out


class _OrtRunner:
    """Runs candidate models (statistics written into a copy) on fixed inputs."""

    def __init__(
        self,
        model: onnx.ModelProto,
        providers: Sequence[str] | None,
        input_name: str | None,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._model = model
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        inits = {i.name for i in model.graph.initializer}
        inputs = [v for v in model.graph.input if v.name not in inits]
        self._inputs = {v.name: v for v in inputs}
        if input_name is None and len(inputs) == 1:
            input_name = inputs[0].name
        self._input_name = input_name

    def _feed(self, payload: Any, dtypes: dict[str, np.dtype[Any]]) -> dict[str, np.ndarray]:
        def arr(v: Any, name: str) -> np.ndarray:
            a = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
            return a.astype(dtypes.get(name, a.dtype), copy=False)

        if isinstance(payload, dict):
            return {k: arr(v, k) for k, v in payload.items()}
        if self._input_name is None:
            raise DataError(
                f"expected dict batches naming the graph inputs {sorted(self._inputs)} "
                f"(got {type(payload).__name__})"
            )
        return {self._input_name: arr(payload, self._input_name)}

    def rows(
        self, stats: dict[str, tuple[np.ndarray, np.ndarray]], *batch_lists: list[Any]
    ) -> list[FloatArray]:
        """Class scores of the model holding ``stats``, one array per list of batches (one
        copy of the model and one session for all of them)."""
        model = copy.deepcopy(self._model)
        set_bn_node_stats(model, stats)
        session = self._ort.InferenceSession(model.SerializeToString(), providers=self._providers)
        dtypes = {
            i.name: np.dtype(ORT_NUMPY_TYPES.get(i.type, np.float32)) for i in session.get_inputs()
        }
        return [self._scores(session, dtypes, batches) for batches in batch_lists]

    def _scores(self, session: Any, dtypes: dict[str, np.dtype[Any]], batches: list[Any]) -> Any:
        out = []
        for index, batch in enumerate(batches):
            feed = self._feed(batch, dtypes)
            try:
                result = session.run(None, feed)[0]
            except ort_errors() as exc:
                shapes = {k: v.shape for k, v in feed.items()}
                raise DataError(
                    f"ONNX Runtime failed on scoring batch {index} (inputs {shapes}): {exc}"
                ) from exc
            out.append(class_rows(result))
        return np.concatenate(out)


def adapt_onnx(
    model_or_path: onnx.ModelProto | str | Path,
    data: Any,
    *,
    validation: Validation | None = None,
    metric: Metric | None = None,
    plan: str = "auto",
    z: float = 1.0,
    confidence: float = 0.8,
    tolerance: float = 0.1,
    guard_items: int = GUARD_ITEMS,
    batch_size: int = 64,
    input_name: str | None = None,
    providers: Sequence[str] | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """:func:`adapt` for an ONNX model: ``recalibrate_onnx``, then the chosen plan.

    Args:
        model_or_path: the ONNX model (never modified) or its path.
        data, validation, metric, plan, z, confidence, tolerance, guard_items: as for
            :func:`adapt`; the first output of the graph must be class scores.
        batch_size, input_name, providers: as for :func:`recalib.recalibrate_onnx`.
        **options: passed to :func:`recalib.recalibrate_onnx` (``method``, ``mode``, ...).

    Returns:
        ``(model, report)``: a copy deploying the chosen plan, and its report with
        ``report.plan``.
    """
    checked = _checked_call(
        data, validation, (plan, z, confidence, tolerance), guard_items, batch_size, options
    )
    scoring = plan == "auto"  # a forced plan needs no candidate scoring
    # Read before recalibrating, so a progress counter ends on the recalibration's pass.
    guard = (
        [b.payload for b in iterate_batches(data, batch_size=batch_size, max_samples=guard_items)]
        if scoring
        else []
    )
    val = (
        [b.payload for b in iterate_batches(checked[0], batch_size=batch_size)]
        if checked is not None and scoring
        else []
    )
    base_model = load_onnx_model(model_or_path)  # read once, for the run and the source
    full_model, report = recalibrate_onnx(
        base_model,
        data,
        batch_size=batch_size,
        input_name=input_name,
        providers=providers,
        **options,
    )
    infos = read_bn_map(full_model)
    before_nodes, after_nodes = _stored_stats(base_model), _stored_stats(full_model)
    # Plans act on layers: the nodes of one torch layer (a layer called twice exports as
    # two nodes) always move together, as they share the layer's statistics.
    nodes_of: dict[str, list[str]] = {}
    for key in _node_order(full_model):
        if key in before_nodes and key in after_nodes and key in infos:
            (bm, bv), (am, av) = before_nodes[key], after_nodes[key]
            if not (np.array_equal(bm, am) and np.array_equal(bv, av)):
                nodes_of.setdefault(infos[key].layer, []).append(key)
    order = list(nodes_of)
    before = {lay: before_nodes[keys[0]] for lay, keys in nodes_of.items()}
    after = {lay: after_nodes[keys[0]] for lay, keys in nodes_of.items()}
    runner = _OrtRunner(full_model, providers, input_name)

    def per_node(stats: Stats) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {key: stats[lay] for lay, keys in nodes_of.items() for key in keys}

    def evaluate(stats: Stats) -> tuple[FloatArray, FloatArray | None]:
        if checked is None:
            return runner.rows(per_node(stats), guard)[0], None
        rows, val_rows = runner.rows(per_node(stats), guard, val)
        return rows, val_rows

    eps = {lay: infos[keys[0]].epsilon for lay, keys in nodes_of.items()}
    plan_report, deployed = select_plan(
        order,
        before,
        after,
        report.samples,
        evaluate,
        plan=plan,
        validation_labels=None if checked is None else checked[1],
        metric=metric,
        z=z,
        confidence=confidence,
        tolerance=tolerance,
        eps=eps,
    )
    out = copy.deepcopy(full_model)
    if deployed:
        set_bn_node_stats(out, per_node(deployed))  # cast to each stored dtype there
    _report_for(report, before, deployed, eps)
    report.plan = plan_report.to_dict()
    return out, report
