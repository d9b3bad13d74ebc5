"""The lockstep pass of ``mode="eval"``: the eval-consistent fixed point in one forward.

In the fixed point every BN layer stores the population statistics of its input over the
calibration set when every upstream BN normalises with *its* stored statistics. That is
one forward of the whole calibration set as a single batch in which each BN, in turn,
normalises with the population statistics of its own input. The lockstep pass computes
exactly that without concatenating the batches (they may differ in shape):

* the forward of every batch runs in its own thread, and the threads take turns: one
  runs at a time, in batch order, so the model never runs concurrently with itself and
  the merges happen in a fixed order (results do not depend on thread timing);
* at each call of a selected layer (the tap's ``synchronise`` hook, after the call's
  moments reached the layer's estimator) a batch hands over to the next one; when the last
  batch arrives, the estimator holds the moments of every batch, its statistics are
  written to the layer, and batch 0 resumes, normalising with them;
* the turn is keyed by ``(layer, call index)``, so a layer called twice in one forward
  synchronises per call. Its first call then normalises with the statistics of the first
  call alone, so shared layers are exact only after the ordinary passes that follow.

Every batch must reach the same layers in the same order. A batch that reaches another
layer, or finishes while the others wait, raises :class:`ControlFlowMismatch` (so does a
layer called from a thread that is not a batch's, or no progress for ``stall_seconds``),
and the caller falls back to ordinary passes. Any other error in a batch stops every
thread and is raised in the caller's thread, unchanged.

Memory: the activations of every batch at one point of the forward are alive at once, so
the pass covers an *anchor* set (the first batches, up to a budget of items) and the
ordinary passes over all data start from its fixed point (:func:`anchor_items`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batch
from .layers import NormLayer
from .tapping import LayerTap

__all__ = [
    "ANCHOR_MAX_ITEMS",
    "ControlFlowMismatch",
    "anchor_items",
    "lockstep_pass",
    "peak_input_bytes",
]

log = logging.getLogger(__name__)

ANCHOR_MAX_ITEMS = 1024
"""Most items (and batches, i.e. threads) the automatic anchor set holds."""

STALL_SECONDS = 300.0
"""A lockstep pass with no batch reaching its next layer for this long is given up."""

_LIVE_FACTOR = 4
"""Live activation bytes per item, in multiples of the largest normalization input: the
input itself, the tensor it came from, a residual branch and the output being made."""

_FALLBACK_BUDGET = 4 << 30
_DONE = ("", -1)  # the key of a finished forward


class ControlFlowMismatch(RuntimeError):
    """The batches did not call the same layers in the same order (no fixed order to wait in)."""


class _Abort(BaseException):
    """Unwinds a batch's forward when another batch failed (never reaches user code's
    ``except Exception``)."""


class _Mismatch(BaseException):
    """Unwinds a batch's forward on a control-flow mismatch (raised to the caller as
    :class:`ControlFlowMismatch`)."""


def _describe(key: tuple[str, int]) -> str:
    if key == _DONE:
        return "the end of its forward"
    return f"call {key[1] + 1} of layer {key[0]!r}"


class _Lockstep:
    """The turn-taking of one lockstep pass (see the module docstring)."""

    def __init__(
        self,
        batches: Sequence[Batch],
        taps: Sequence[LayerTap],
        run: Callable[[Batch], Any],
        finish: Callable[[LayerTap], None],
    ) -> None:
        self.batches = list(batches)
        self.taps = list(taps)
        self.run = run
        self.finish = finish
        self.turns = [threading.Event() for _ in self.batches]
        self.calls: list[Counter[str]] = [Counter() for _ in self.batches]
        self.local = threading.local()
        self.key = _DONE
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.progress = 0

    # ------------------------------------------------------------------ in the batches
    def synchronise(self, tap: LayerTap) -> None:
        """The taps' hook: this batch is at ``tap``'s next call; wait for the others."""
        i: int | None = getattr(self.local, "worker", None)
        if i is None:
            raise _Mismatch(
                f"layer {tap.layer.name!r} was called from a thread of the model's own "
                "(expected every layer to run in the batch's forward)"
            )
        name = tap.layer.name
        self.calls[i][name] += 1
        self.arrive(i, (name, self.calls[i][name] - 1), tap)

    def arrive(self, i: int, key: tuple[str, int], tap: LayerTap | None) -> None:
        if self.error is not None:
            raise _Abort
        self.progress += 1
        if i == 0:
            self.key = key
        elif key != self.key:
            raise _Mismatch(
                f"batch {self.batches[i].index} reached {_describe(key)} where batch "
                f"{self.batches[0].index} reached {_describe(self.key)}"
            )
        last = i == len(self.batches) - 1
        if key == _DONE:
            if last:
                self.done.set()
            else:
                self.hand_to(i + 1)
            return
        if last and tap is not None:
            self.finish(tap)
        self.hand_to(0 if last else i + 1)
        self.wait_turn(i)

    def hand_to(self, j: int) -> None:
        for tap in self.taps:  # a NonFiniteError names the batch that hit it
            tap.batch_index = self.batches[j].index
        self.turns[j].set()

    def wait_turn(self, i: int) -> None:
        self.turns[i].wait()
        self.turns[i].clear()
        if self.error is not None:
            raise _Abort

    def work(self, i: int, context: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        self.local.worker = i
        try:
            self.wait_turn(i)
            with context():
                self.run(self.batches[i])
            self.arrive(i, _DONE, None)
        except _Abort:
            pass
        except BaseException as exc:  # carried to the caller's thread
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        for turn in self.turns:
            turn.set()
        self.done.set()

    # ------------------------------------------------------------------ in the caller
    def __call__(self, stall_seconds: float) -> None:
        context = _thread_context()
        threads = [
            threading.Thread(
                target=self.work, args=(i, context), name=f"recalib-lockstep-{i}", daemon=True
            )
            for i in range(len(self.batches))
        ]
        for t in threads:
            t.start()
        try:
            self.hand_to(0)
            self.watch(stall_seconds)
        except BaseException as exc:  # KeyboardInterrupt: stop the batches, then re-raise
            self.fail(exc)
            raise
        finally:
            for t in threads:
                t.join(stall_seconds)
            if any(t.is_alive() for t in threads):
                raise RuntimeError(  # the model cannot be used safely any more
                    f"a batch's forward did not return within {stall_seconds} s of the "
                    "lockstep pass being stopped"
                )
        if isinstance(self.error, _Mismatch):
            raise ControlFlowMismatch(str(self.error)) from None
        if self.error is not None:
            raise self.error

    def watch(self, stall_seconds: float) -> None:
        seen, since = -1, time.monotonic()
        while not self.done.wait(min(1.0, stall_seconds)):
            now = time.monotonic()
            if self.progress != seen:
                seen, since = self.progress, now
            elif now - since > stall_seconds:
                self.fail(
                    _Mismatch(
                        f"no batch reached its next normalization layer for {stall_seconds} s "
                        "(a forward waiting for another batch's?)"
                    )
                )


def _thread_context() -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """What a batch's thread needs of the caller's thread-local torch state."""
    cuda_device = stream = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        cuda_device = torch.cuda.current_device()
        stream = torch.cuda.current_stream(cuda_device)

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if cuda_device is not None and stream is not None:
                torch.cuda.set_device(cuda_device)
                stack.enter_context(torch.cuda.stream(stream))
            yield

    return context


def lockstep_pass(
    batches: Sequence[Batch],
    taps: Sequence[LayerTap],
    *,
    run: Callable[[Batch], Any],
    finish: Callable[[LayerTap], None],
    stall_seconds: float | None = None,
) -> None:
    """Run ``run(batch)`` for every batch in lockstep at the taps (module docstring).

    Args:
        batches: the anchor set, in order.
        taps: the installed taps (their ``synchronise`` hook is set here, and cleared).
        run: one batch's forward, raising what an ordinary pass would raise.
        finish: writes a tap's statistics to its layer once every batch has added its
            moments of the current call.
        stall_seconds: give up after this long without progress (default
            :data:`STALL_SECONDS`).

    Raises:
        ControlFlowMismatch: the batches called different layers (nothing was raised by
            the model; the caller may fall back to ordinary passes).
        Exception: whatever a batch's forward raised first (the others are stopped).
    """
    step = _Lockstep(batches, taps, run, finish)
    for tap in taps:
        tap.synchronise = step.synchronise
    try:
        step(STALL_SECONDS if stall_seconds is None else stall_seconds)
    finally:
        for tap in taps:
            tap.synchronise = None


# --------------------------------------------------------------------------- anchor size
def peak_input_bytes(
    layers: Sequence[NormLayer], run: Callable[[], Any]
) -> tuple[int, torch.device | None]:
    """The largest input (bytes) any of ``layers`` sees during ``run()``, and its device."""
    peak: list[int] = [0]
    where: list[torch.device | None] = [None]

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor):
            size = args[0].numel() * args[0].element_size()
            if size > peak[0]:
                peak[0], where[0] = size, args[0].device

    handles = [lay.module.register_forward_pre_hook(hook) for lay in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return peak[0], where[0]


def _memory_budget(device: torch.device | None) -> int:
    """Half of the memory free on ``device`` now (host memory for the CPU)."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    return _FALLBACK_BUDGET


def anchor_items(peak_bytes: int, items: int, device: torch.device | None) -> int:
    """How many items the lockstep pass may hold, from one batch's largest layer input.

    ``peak_bytes`` was measured on a batch of ``items`` items. The live activations per
    item are estimated at :data:`_LIVE_FACTOR` times that input's share, and the anchor set
    gets half the free memory, at most :data:`ANCHOR_MAX_ITEMS` items.
    """
    per_item = max(1, _LIVE_FACTOR * peak_bytes // max(items, 1))
    return int(max(1, min(ANCHOR_MAX_ITEMS, _memory_budget(device) // per_item)))
