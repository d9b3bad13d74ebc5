"""``recalibrate``: re-estimate the running statistics of every BN / renorm layer.

How it works: each selected layer's ``forward`` is temporarily replaced (on the instance,
restored afterwards) by a tap that reduces the layer's input to per-channel moments
(:class:`~recalib.moments.ChannelMoments`, one ``var_mean`` per layer and batch) and then
normalises it:

* ``mode="train"`` - with the batch's own statistics, as BN does in training (AdaBN /
  ``update_bn``), one pass;
* ``mode="eval"``  - with the layer's current running statistics, as at inference. The
  first pass runs the batches in lockstep (:mod:`recalib.fixed_point`): at every layer
  all batches contribute their moments before any of them normalises, so that one pass
  reaches the eval-consistent fixed point of the data it holds (the *anchor* set, bounded
  by memory). Ordinary passes over all data follow, each normalising with the previous
  pass's estimates, until the largest relative change of any statistic is below ``tol``
  (one pass when the anchor set is all the data). Unconverged statistics are not written
  unless ``allow_unconverged=True``; a pass that blows up (NaN/Inf, overflow) is an error.

The rest of the model runs in eval mode (Dropout off), under ``torch.no_grad``. Buffers are
written only after every batch has been seen without error; on any error the original
statistics are restored (all-or-nothing).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

from .batches import Batch, ForwardFn, iterate_batches
from .distributed import all_gather_moments, distributed_active, global_counts
from .errors import (
    DataError,
    DivergedError,
    LayerMismatchError,
    NonFiniteError,
    NotConvergedError,
    RecalibError,
)
from .estimators import EmaEstimator, ExactEstimator, make_estimator
from .exported import resolve_model
from .fixed_point import (
    ControlFlowMismatch,
    anchor_items,
    lockstep_pass,
    peak_input_bytes,
)
from .layers import NormLayer, find_norm_layers, select_by_name
from .modes import eval_mode
from .options import DEFAULTS, RecalibOptions
from .report import LayerReport, RecalibrationReport, compare_stats
from .run_options import batch_total, progress_bar, relative_change
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


@dataclass(frozen=True)
class _Run:
    """What every pass of one call shares: the model, the data and how to read it."""

    net: nn.Module
    data: Any
    selected: list[NormLayer]
    make: Callable[[NormLayer], ExactEstimator]
    batch_size: int
    max_samples: int | None
    device: torch.device | None
    forward: ForwardFn | None
    bar: Any

    def batches(self) -> Iterator[Batch]:
        return iterate_batches(
            self.data,
            batch_size=self.batch_size,
            max_samples=self.max_samples,
            device=self.device,
            forward=self.forward,
        )

    def run_batch(self, batch: Batch) -> None:
        """The model's forward on one batch; its failures as :class:`DataError`."""
        try:
            batch.run(self.net, self.forward)
        except RecalibError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
            # AssertionError: an ExportedProgram's shape guard rejecting this batch.
            raise DataError(f"the model's forward failed on batch {batch.index}: {exc}") from exc

    def tick(self, batches: int) -> None:
        if self.bar is not None:
            self.bar.update(batches)


def _run_pass(run: _Run, taps: list[LayerTap]) -> tuple[int, int]:
    items = batches = 0
    with installed(taps):
        for batch in run.batches():
            for tap in taps:
                tap.batch_index = batch.index
            run.run_batch(batch)
            items += batch.items
            batches += 1
            run.tick(1)
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


def _checked(
    layer: NormLayer, est: ExactEstimator, *, diverging: int | None
) -> tuple[Tensor, Tensor]:
    """The estimator's statistics (variance clamped at 0), refused when the layer's buffers
    cannot hold them. ``diverging``: the pass number when the pass started from earlier
    estimates (then an overflow is the iteration blowing up, not the data)."""
    mean, var = est.finalize()
    var = var.clamp(min=0.0)
    buf = layer.module.running_var
    top = torch.finfo(buf.dtype if buf is not None else torch.float32).max
    ok = torch.isfinite(mean) & torch.isfinite(var) & (mean.abs() <= top) & (var <= top)
    if bool(ok.all()):
        return mean, var
    what = (
        f"the new statistics of layer {layer.name!r} overflow its buffers (|mean| up to "
        f"{float(mean.abs().max()):.3g}, var up to {float(var.max()):.3g})"
    )
    if diverging is None:
        raise DataError(f"{what}; the model's statistics were left untouched")
    raise DivergedError(
        f"mode='eval' diverged in pass {diverging}: {what}. {_DIVERGED_HINT}",
        layer=layer.name,
        passes=diverging,
    )


_DIVERGED_HINT = (
    "Each ordinary pass normalises with the previous pass's estimates, and they blew up; "
    "the model's statistics were left untouched. The lockstep pass (anchor=) reaches the "
    "fixed point without such intermediate states: cover more of the data with it (a larger "
    "anchor=, or less data)"
)


def _write_all(
    selected: list[NormLayer], finals: dict[str, ExactEstimator], *, diverging: int | None
) -> float:
    """Write every layer's new statistics (all checked first); the largest relative change
    of a stored value."""
    new = {
        lay.name: _checked(lay, finals[lay.name], diverging=diverging)
        for lay in selected
        if lay.name in finals
    }
    change = 0.0
    for lay in selected:
        if lay.name not in new:
            continue
        current = _stats_of(lay)
        if current is not None:
            # Compared as stored: a half-precision buffer cannot move by less than its ulp.
            mean, var = new[lay.name]
            stored = (mean.to(current[0].dtype), var.to(current[1].dtype))
            change = max(change, relative_change(current, stored, lay.module.eps))
        _write(lay, *new[lay.name])
    return change


def _restore(selected: list[NormLayer], backups: dict[str, tuple[Tensor, Tensor]]) -> None:
    for lay in selected:
        if lay.name in backups:
            _write(lay, *backups[lay.name])
        elif _stats_of(lay) is not None:
            # A lazy layer materialised by this call: back to its fresh 0/1 statistics.
            lay.module.reset_running_stats()


def _anchor_set(run: _Run, anchor: int | None) -> list[Batch]:
    """The first batches, up to ``anchor`` items (default: what fits, :func:`anchor_items`);
    always at least one batch."""
    it = run.batches()
    chosen = [next(it)]
    limit, total = anchor, chosen[0].items
    try:
        for batch in it:
            if limit is None:  # one batch's forward measures what an item costs
                peak, where = peak_input_bytes(run.selected, lambda: run.run_batch(chosen[0]))
                limit = anchor_items(peak, chosen[0].items, where)
            if total + batch.items > limit:
                break
            chosen.append(batch)
            total += batch.items
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return chosen


def _lockstep(run: _Run, anchor: int | None) -> tuple[dict[str, ExactEstimator], int, int] | None:
    """The anchor set's fixed point, written to the layers: ``(estimators, items, batches)``;
    ``None`` (after a warning) when the batches' control flow differs."""
    batches = _anchor_set(run, anchor)
    taps = [LayerTap(lay, False, run.make, strict_batch_stats=False) for lay in run.selected]

    def finish(tap: LayerTap) -> None:
        if tap.estimator is not None:
            _write(tap.layer, *_checked(tap.layer, tap.estimator, diverging=None))

    try:
        with installed(taps):
            lockstep_pass(batches, taps, run=run.run_batch, finish=finish)
    except ControlFlowMismatch as exc:
        warnings.warn(
            f"mode='eval': the lockstep pass needs every batch to call the same layers in the "
            f"same order, but {exc}; falling back to ordinary passes, which may need many "
            "passes on a deep network",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    run.tick(len(batches))
    return _finish_pass(taps, False), sum(b.items for b in batches), len(batches)


def recalibrate(
    model: nn.Module | torch.export.ExportedProgram,
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
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    init: str = "batch",
    anchor: int | None = None,
    allow_unconverged: bool = False,
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
        max_passes: the most passes ``mode="eval"`` makes (the lockstep pass included).
        tol: ``mode="eval"`` stops when no mean moved by more than ``tol`` old standard
            deviations and no variance changed by more than ``tol`` relatively.
        max_samples: stop after this many items (along the batch axis).
        batch_size: chunk size when ``data`` is one tensor or array.
        layers: names or globs of the layers to recalibrate (default: all).
        device: move the model's inputs to this device (the model must already be there).
        forward: ``forward(model, batch)`` for batches of any other shape.
        progress: show a progress bar on stderr.
        init: where ``mode="eval"``'s ordinary passes start when there is no lockstep pass
            (``anchor=0``, ``torch.distributed``, control flow differing between batches):
            ``"batch"`` (the first pass normalises by batch statistics, AdaBN-style,
            wherever a batch has more than one value per channel) or ``"source"`` (the
            model's current statistics).
        distributed: all-gather the sufficient statistics over ``torch.distributed``;
            default: when a process group of more than one rank is initialised.
        anchor: ``mode="eval"``: the most items the first, lockstep pass holds at once
            (whole batches, at least the first one). It reaches the fixed point of those
            items in one forward; the ordinary passes over all data start there. Default:
            as many as half the free memory holds, at most 1024; ``0``: no lockstep pass.
        allow_unconverged: ``mode="eval"``: write the statistics even when ``tol`` was not
            reached in ``max_passes`` (``report.converged`` is then ``False``) instead of
            raising :class:`~recalib.errors.NotConvergedError`.

    Returns:
        A :class:`~recalib.report.RecalibrationReport`.

    Raises:
        NoBatchNormError: no layer to recalibrate.
        DataError: empty data, unusable batches, NaN/Inf (:class:`NonFiniteError`).
        LayerMismatchError: a layer's input does not match its statistics.
        NotConvergedError: ``mode="eval"`` did not reach ``tol`` (statistics restored);
            :class:`~recalib.errors.DivergedError` when its passes blew up.

    Examples::

        >>> report = recalibrate(model, loader, method="exact", mode="eval")
        >>> report.layers[0].sym_kl
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
    net, pre = resolve_model(model)
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
    if mode == "eval" and iter(data) is data:
        raise DataError(
            "mode='eval' makes several passes over the data; expected a re-iterable "
            f"(tensor, list, DataLoader) (got a one-shot {type(data).__name__})"
        )
    converged = mode == "train"
    residual: float | None = None
    items = batches = passes_used = anchored = 0
    finals: dict[str, ExactEstimator] = {}
    # A total only for one pass: eval mode stops when it converges (2 passes, usually).
    total = batch_total(data, batch_size, max_samples) if mode == "train" else None
    bar = progress_bar(progress, f"recalibrate ({method}/{mode})", total=total)
    run = _Run(net, data, selected, make, batch_size, max_samples, dev, forward, bar)

    def report() -> RecalibrationReport:
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
                "anchor": anchor,
                "anchored_items": anchored,
            },
        )

    try:
        with torch.no_grad(), eval_mode(net):
            first = 0
            if mode == "eval" and anchor != 0 and not dist_on:
                done = _lockstep(run, anchor)
                if done is None:
                    _restore(selected, backups)
                else:
                    finals, items, batches = done
                    anchored, first = items, 1
                    passes_used = 1
                    residual = max(
                        (
                            relative_change(sources[n], s, lay.module.eps)
                            for lay in selected
                            if (n := lay.name) in sources and (s := _stats_of(lay)) is not None
                        ),
                        default=0.0,
                    )
            for p in range(first, passes):
                # Without a lockstep pass, eval mode's first pass normalises by batch
                # statistics where a batch has more than one value per channel (an AdaBN
                # start), later passes by the running estimates.
                warm = mode == "eval" and p == 0 and init == "batch"
                taps = [
                    LayerTap(lay, mode == "train" or warm, make, strict_batch_stats=mode == "train")
                    for lay in selected
                ]
                diverging = p + 1 if mode == "eval" and p > 0 else None
                try:
                    items, batches = _run_pass(run, taps)
                except NonFiniteError as exc:
                    if diverging is None or isinstance(exc, DivergedError):
                        raise
                    raise DivergedError(
                        f"mode='eval' diverged in pass {diverging}: NaN/Inf in the input of "
                        f"layer {exc.layer!r} at batch {exc.batch}, after the earlier passes "
                        f"were finite. {_DIVERGED_HINT}",
                        layer=exc.layer,
                        batch=exc.batch,
                        passes=diverging,
                    ) from exc
                finals = _finish_pass(taps, dist_on)
                change = _write_all(selected, finals, diverging=diverging)
                passes_used = p + 1
                if mode == "eval":
                    residual = change
                    log.debug("pass %d: max relative change %.3g", passes_used, change)
                    if change <= tol:
                        converged = True
                        break
            if not converged and not allow_unconverged:
                raise NotConvergedError(
                    f"mode='eval' did not converge in {passes_used} passes (largest relative "
                    f"change in the last pass {residual:.3g}, expected <= tol={tol}); the "
                    "model's statistics were restored. Allow more passes (max_passes=), or "
                    "pass allow_unconverged=True to write them anyway",
                    report(),
                )
    except BaseException:
        _restore(selected, backups)
        raise
    finally:
        if bar is not None:
            bar.close()
    if dist_on:
        items, batches = global_counts(items, batches)
    return report()


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
