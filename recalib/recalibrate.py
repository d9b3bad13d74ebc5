"""``recalibrate``: re-estimate the running statistics of every BN / renorm layer.

How it works: each selected layer's ``forward`` is temporarily replaced (on the instance,
restored afterwards) by a tap that reduces the layer's input to per-channel moments
(:class:`~recalib.moments.ChannelMoments`, one ``var_mean`` per layer and batch) and then
normalises it:

* ``mode="train"`` - with the batch's own statistics, as BN does in training (AdaBN /
  ``update_bn``), one pass;
* ``mode="eval"``  - with the layer's current running statistics, as at inference; passes
  repeat, each using the previous pass's estimates upstream, until the largest relative
  change of any statistic is below ``tol``. Layer ``k`` (in data-flow order) is exact after
  ``k`` passes, so the fixed point is reached in at most depth-many passes; ``tol`` stops
  earlier once upstream corrections no longer matter.

The rest of the model runs in eval mode (Dropout off), under ``torch.no_grad``. Buffers are
written only after every batch has been seen without error; on any error the original
statistics are restored (all-or-nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

from .batches import ForwardFn, iterate_batches
from .distributed import all_gather_moments, distributed_active, global_counts
from .errors import DataError, LayerMismatchError, RecalibError
from .estimators import EmaEstimator, ExactEstimator, make_estimator
from .exported import module_with_norm_layers
from .layers import NormLayer, find_norm_layers, select_by_name
from .modes import eval_mode
from .report import LayerReport, RecalibrationReport, compare_stats
from .run_options import check_run_args, progress_bar, relative_change
from .tapping import LayerTap, installed

__all__ = ["recalibrate"]

log = logging.getLogger(__name__)


def _stats_of(layer: NormLayer) -> tuple[Tensor, Tensor] | None:
    m = layer.module
    if isinstance(m.running_mean, UninitializedBuffer) or m.running_mean is None:
        return None
    if m.running_var is None:
        return None
    return m.running_mean.detach().clone(), m.running_var.detach().clone()


def _stats_device(layers: Sequence[NormLayer]) -> torch.device | None:
    """Where the first selected layer keeps its running statistics (the report's device
    when ``device=`` was not given)."""
    for layer in layers:
        mean = layer.module.running_mean
        if isinstance(mean, Tensor) and not isinstance(mean, UninitializedBuffer):
            return mean.device
    return None


def _write(layer: NormLayer, mean: Tensor, var: Tensor) -> None:
    m = layer.module
    if m.running_mean is None or m.running_var is None:
        raise LayerMismatchError(f"layer {layer.name!r} has no running statistics")
    m.running_mean.copy_(mean.to(m.running_mean.device, m.running_mean.dtype))
    m.running_var.copy_(var.to(m.running_var.device, m.running_var.dtype))


def _resolve_model(model: Any) -> tuple[nn.Module, list[NormLayer] | None]:
    if isinstance(model, torch.export.ExportedProgram):
        wrapped = module_with_norm_layers(model)
        named = wrapped.named_norm_layers()  # type: ignore[operator]
        return wrapped, [NormLayer(n, m) for n, m in named]
    if not isinstance(model, nn.Module):
        raise RecalibError(
            f"expected an nn.Module or torch.export.ExportedProgram (got {type(model).__name__})"
        )
    return model, None


def _run_pass(
    model: nn.Module,
    data: Any,
    taps: list[LayerTap],
    *,
    batch_size: int,
    max_samples: int | None,
    device: torch.device | None,
    forward: ForwardFn | None,
    bar: Any,
) -> tuple[int, int]:
    items = batches = 0
    with installed(taps):
        for batch in iterate_batches(
            data, batch_size=batch_size, max_samples=max_samples, device=device, forward=forward
        ):
            for tap in taps:
                tap.batch_index = batch.index
            try:
                batch.run(model, forward)
            except RecalibError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
                # AssertionError: an ExportedProgram's shape guard rejecting this batch.
                raise DataError(
                    f"the model's forward failed on batch {batch.index}: {exc}"
                ) from exc
            items += batch.items
            batches += 1
            if bar is not None:
                bar.update(1)
    return items, batches


def _finish_pass(taps: list[LayerTap], distributed: bool) -> dict[str, ExactEstimator]:
    done = {t.layer.name: t.estimator for t in taps if t.estimator is not None}
    if distributed:
        if any(isinstance(e, EmaEstimator) for e in done.values()):
            raise RecalibError(
                "method='ema' depends on the batch order and is not defined across processes; "
                "use method='exact' or 'prior' with torch.distributed"
            )
        names = [t.layer.name for t in taps]
        missing = [n for n in names if n not in done]
        if missing:
            raise DataError(f"layers {missing} saw no data on this rank; every rank needs data")
        merged = all_gather_moments([(done[n].moments, done[n].num_items) for n in names])
        for n, (mom, items) in zip(names, merged, strict=True):
            done[n].set_moments(mom, items)
    return done


def recalibrate(
    model: nn.Module | torch.export.ExportedProgram,
    data: Any,
    *,
    method: str = "exact",
    mode: str = "train",
    prior_strength: float | None = None,
    momentum: float | None = 0.1,
    max_passes: int = 10,
    tol: float = 1e-4,
    max_samples: int | None = None,
    batch_size: int = 64,
    layers: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    init: str = "batch",
) -> RecalibrationReport:
    """Re-estimate the running statistics of a model's BN / Batch Renorm layers in place.

    Args:
        model: an ``nn.Module``, or a ``torch.export.ExportedProgram`` (its buffers in
            ``program.state_dict`` are updated in place; the same program is returned
            by nothing: keep using it).
        data: calibration data: a tensor/array (cut into ``batch_size`` chunks) or an
            iterable of batches (tensor, array, tuple/list whose first item is the input,
            or dict of keyword arguments). ``mode="eval"`` iterates it several times, so it
            must be re-iterable (a list or ``DataLoader``, not a generator).
        method: ``"exact"``, ``"ema"`` or ``"prior"`` (see :mod:`recalib.estimators`).
        mode: ``"train"`` (normalise by batch statistics, one pass) or ``"eval"``
            (eval-consistent fixed point; any batch size, including 1).
        prior_strength: pseudo sample size ``N`` of the source statistics (``prior`` only).
        momentum: EMA weight of the new batch (``ema`` only); ``None`` for the cumulative
            average, like ``update_bn``.
        max_passes: the most passes ``mode="eval"`` makes.
        tol: ``mode="eval"`` stops when no mean moved by more than ``tol`` old standard
            deviations and no variance changed by more than ``tol`` relatively.
        max_samples: stop after this many items (along the batch axis).
        batch_size: chunk size when ``data`` is one tensor or array.
        layers: names or globs of the layers to recalibrate (default: all).
        device: move the model's inputs to this device (the model must already be there).
        forward: ``forward(model, batch)`` for batches of any other shape.
        progress: show a progress bar on stderr.
        init: where ``mode="eval"`` starts: ``"batch"`` (first pass normalises by batch
            statistics, AdaBN-style, wherever a batch has more than one value per
            channel) or ``"source"`` (the model's current statistics).
        distributed: all-gather the sufficient statistics over ``torch.distributed``;
            default: when a process group of more than one rank is initialised.

    Returns:
        A :class:`~recalib.report.RecalibrationReport`.

    Raises:
        NoBatchNormError: no layer to recalibrate.
        DataError: empty data, unusable batches, NaN/Inf (:class:`NonFiniteError`).
        LayerMismatchError: a layer's input does not match its statistics.

    Examples::

        >>> report = recalibrate(model, loader, method="exact", mode="eval")
        >>> report.layers[0].sym_kl
    """
    check_run_args(method, mode, max_passes, tol, momentum, prior_strength, init)
    start = time.perf_counter()
    net, pre = _resolve_model(model)
    if pre is None:
        selected, skipped = find_norm_layers(net, layers)
    else:
        selected, skipped = pre, []
        if layers is not None:
            selected = select_by_name(
                selected, layers, lambda lay: [lay.name], what="normalization layer"
            )
    dev = torch.device(device) if device is not None else None
    dist_on = distributed_active() if distributed is None else distributed
    sources: dict[str, tuple[Tensor, Tensor]] = {}
    backups = {lay.name: s for lay in selected if (s := _stats_of(lay)) is not None}

    def make(layer: NormLayer) -> ExactEstimator:
        if layer.name not in sources:
            st = _stats_of(layer)
            if st is None:
                raise LayerMismatchError(f"layer {layer.name!r} was not initialised by its input")
            sources[layer.name] = (st[0].double(), st[1].double())
        src_mean, src_var = sources[layer.name]
        return make_estimator(
            method,
            source_mean=src_mean,
            source_var=src_var,
            momentum=momentum,
            prior_strength=prior_strength,
        )

    passes = max_passes if mode == "eval" else 1
    if passes > 1 and iter(data) is data:
        raise DataError(
            "mode='eval' makes several passes over the data; expected a re-iterable "
            f"(tensor, list, DataLoader) (got a one-shot {type(data).__name__})"
        )
    converged = mode == "train"
    residual: float | None = None
    items = batches = 0
    finals: dict[str, ExactEstimator] = {}
    bar = progress_bar(progress, f"recalibrate ({method}/{mode})")
    try:
        with torch.no_grad(), eval_mode(net):
            for p in range(passes):
                # eval mode's first pass normalises by batch statistics where a batch has
                # more than one value per channel (an AdaBN start), later passes by the
                # running estimates; starting there instead of at the source statistics
                # cuts the passes needed on deep networks.
                warm = mode == "eval" and p == 0 and init == "batch"
                taps = [
                    LayerTap(lay, mode == "train" or warm, make, strict_batch_stats=mode == "train")
                    for lay in selected
                ]
                items, batches = _run_pass(
                    net,
                    data,
                    taps,
                    batch_size=batch_size,
                    max_samples=max_samples,
                    device=dev,
                    forward=forward,
                    bar=bar,
                )
                finals = _finish_pass(taps, dist_on)
                change = 0.0
                for lay in selected:
                    est = finals.get(lay.name)
                    if est is None:
                        continue
                    new_mean, new_var = est.finalize()
                    new_var = new_var.clamp(min=0.0)
                    current = _stats_of(lay)
                    if current is not None:
                        change = max(
                            change, relative_change(current, (new_mean, new_var), lay.module.eps)
                        )
                    _write(lay, new_mean, new_var)
                passes_used = p + 1
                if mode == "eval":
                    residual = change
                    log.debug("pass %d: max relative change %.3g", passes_used, change)
                    if change <= tol:
                        converged = True
                        break
    except BaseException:
        for lay in selected:
            if lay.name in backups:
                _write(lay, *backups[lay.name])
            elif _stats_of(lay) is not None:
                # A lazy layer materialised by this call: back to its fresh 0/1 statistics.
                lay.module.reset_running_stats()
        raise
    finally:
        if bar is not None:
            bar.close()
    if dist_on:
        items, batches = global_counts(items, batches)
    return _build_report(
        selected,
        skipped,
        sources,
        finals,
        method=method,
        mode=mode,
        passes=passes_used,
        converged=converged,
        residual=residual,
        items=items,
        batches=batches,
        seconds=time.perf_counter() - start,
        device=dev if dev is not None else _stats_device(selected),
        params={
            "prior_strength": prior_strength,
            "momentum": momentum,
            "tol": tol,
            "max_passes": max_passes,
            "init": init,
            "max_samples": max_samples,
            "layers": layers,
            "distributed": dist_on,
        },
    )


def _build_report(
    selected: list[NormLayer],
    skipped: list[tuple[str, str]],
    sources: dict[str, tuple[Tensor, Tensor]],
    finals: dict[str, ExactEstimator],
    *,
    method: str,
    mode: str,
    passes: int,
    converged: bool,
    residual: float | None,
    items: int,
    batches: int,
    seconds: float,
    device: torch.device | None,
    params: dict[str, Any],
) -> RecalibrationReport:
    rows: list[LayerReport] = []
    skip = [{"layer": n, "reason": r} for n, r in skipped]
    for lay in selected:
        est = finals.get(lay.name)
        new = _stats_of(lay)
        if est is None or new is None or lay.name not in sources:
            log.warning("layer %s received no input; its statistics are unchanged", lay.name)
            skip.append({"layer": lay.name, "reason": "received no input: statistics unchanged"})
            continue
        eps = lay.module.eps
        cmp = compare_stats(sources[lay.name], (new[0].double(), new[1].double()), eps)
        rows.append(
            LayerReport(
                name=lay.name,
                kind=lay.kind,
                channels=lay.num_features,
                samples=int(est.moments.count.item()),
                items=est.num_items,
                degenerate_channels=int((new[1].double() <= eps).sum()),
                **cmp,
            )
        )
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    return RecalibrationReport(
        method=method,
        mode=mode,
        layers=rows,
        skipped=skip,
        passes=passes,
        converged=converged,
        residual=residual,
        samples=items,
        batches=batches,
        seconds=seconds,
        device=str(device) if device is not None else "cpu",  # no layer has statistics
        params=params,
    )
