"""What a recalibration job's worker process runs (started by :mod:`service.jobs`).

The process is started with the ``spawn`` method, so it shares nothing with the server
but the files and the database: a crash, a hang or a memory blow-up in torch or ONNX
Runtime ends this process only. It runs at a lower CPU priority (``nice`` +10) with a
bounded thread count, so inference keeps its cores.

Steps (progress is written to the job's row as it goes, at most a few times a second):

1. load the base version: its ``model.pt2`` when it has one (recalibrated with
   :func:`recalib.recalibrate`, then exported with :func:`recalib.onnx.export.export_onnx`,
   parity-checked, and saved as ``model.pt2`` and a stat bank), else its ``model.onnx``
   (:func:`recalib.onnx.recalibrate.recalibrate_onnx`);
2. stream the data set's input array in ``batch_size`` chunks (``.npy`` is memory-mapped),
   counting batches and passes;
3. optionally validate: top-1 accuracy of the base and the new ONNX model (ONNX Runtime,
   CPU) on a labeled data set (arrays ``x`` and ``y``);
4. write ``out/`` (the new version's files and ``report.json``; for a job whose output is
   a stat bank also ``bank.safetensors``: the new statistics stamped with the *base*
   version's weights digest, :func:`recalib.onnx.bank_files.save_onnx_bank`, with its
   route limit in the metadata: :func:`recalib.onnx.bank_routing.bank_route_limit` of the
   job's calibration rows, ``route_limit`` / ``route_limit_quantile``) and then
   ``result.json`` (``{"ok": true, "validation": ...}`` or ``{"ok": false, "error": "..."}``).

The server adds the version (or the bank) to the registry from ``out/`` once the process
has exited;
this process never touches the registry's tables. Importing this module is cheap (no
torch): what a job needs is imported when it runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .db import Database, dumps, utcnow

__all__ = ["JobSpec", "run_job"]

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
OUT_DIR = "out"
BANK_FILE = "bank.safetensors"
LOG_FILE = "worker.log"


class JobError(Exception):
    """A job failed for a reason its message states (reported as the job's error)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs (picklable: it crosses the process boundary).

    Args:
        job_id: the job's id (its row in ``jobs``).
        db_path: the metadata store, for progress.
        work_dir: the job's private directory (``out/``, ``result.json``, ``worker.log``).
        base_onnx: the base version's ONNX file.
        base_pt2: the base version's ExportedProgram, if it has one.
        dataset: the calibration data file.
        key: the input array's name in it.
        params: keyword arguments of the recalibration (method, mode, prior_strength,
            momentum, max_passes, tol, max_samples, batch_size, layers, anchor,
            allow_unconverged, plan).
        validation: ``{"dataset": path, "max_accuracy_drop": float}`` or ``None``.
        threads: torch / ONNX Runtime threads.
        bank: the name of the stat bank to write instead of a version (``None``: a version).
    """

    job_id: str
    db_path: str
    work_dir: str
    base_onnx: str
    base_pt2: str | None
    dataset: str
    key: str | None
    params: dict[str, Any]
    validation: dict[str, Any] | None
    threads: int
    bank: str | None = None


class _Progress:
    """Writes the job's progress to its row, at most every ``interval`` seconds."""

    def __init__(self, spec: JobSpec, interval: float = 0.25) -> None:
        self._db = Database(spec.db_path)
        self._job = spec.job_id
        self._interval = interval
        self._last = 0.0
        self.state: dict[str, Any] = {}

    def update(self, fields: dict[str, Any], *, force: bool = False) -> None:
        self.state.update(fields)
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        self.state["updated_at"] = utcnow()
        self._db.execute(
            "UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running'",
            (dumps(self.state), self._job),
        )

    def stage(self, name: str) -> None:
        self.update({"stage": name}, force=True)
        log.info("stage: %s", name)

    def close(self) -> None:
        self._db.close()


class _Batches:
    """The input array in chunks, converted per chunk; re-iterable (one pass per ``iter``)."""

    def __init__(
        self,
        x: np.ndarray,
        *,
        batch_size: int,
        max_samples: int | None,
        convert: Callable[[np.ndarray], Any],
        progress: _Progress,
    ) -> None:
        self._x = x
        self._n = len(x) if max_samples is None else min(len(x), max_samples)
        self._size = batch_size
        self._convert = convert
        self._progress = progress
        self._pass = 0
        progress.update({"batches_per_pass": math.ceil(self._n / batch_size), "samples": self._n})

    def __iter__(self) -> Iterator[Any]:
        self._pass += 1
        for done, start in enumerate(range(0, self._n, self._size), start=1):
            yield self._convert(np.ascontiguousarray(self._x[start : start + self._size]))
            self._progress.update({"pass": self._pass, "batches": done})


def _setup(spec: JobSpec) -> None:
    logging.basicConfig(
        filename=str(Path(spec.work_dir) / LOG_FILE),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if hasattr(os, "nice"):
        os.nice(10)


def _program_dtype(program: Any) -> Any:
    import torch

    for t in program.state_dict.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _example(x: np.ndarray, convert: Callable[[np.ndarray], Any]) -> Any:
    """2 to 8 samples (repeated if there is only one) for the export's parity check."""
    rows = np.ascontiguousarray(x[: min(len(x), 8)])
    if len(rows) < 2:
        rows = np.concatenate([rows, rows])
    return convert(rows)


Labeled = tuple[np.ndarray, np.ndarray]


def _load_validation(spec: JobSpec) -> Labeled | None:
    """``(x, y)`` of the job's labeled validation set (read once: it chooses the plan and
    gates the result), or ``None``."""
    if spec.validation is None:
        return None
    from recalib.datafiles import load_arrays

    arrays = load_arrays(spec.validation["dataset"])
    return np.asarray(arrays["x"]), np.asarray(arrays["y"])


def _plan_validation(labeled: Labeled | None, convert: Callable[[np.ndarray], Any]) -> Any:
    """The validation pair in the model's input type, for choosing the plan."""
    if labeled is None:
        return None
    return convert(np.ascontiguousarray(labeled[0])), labeled[1]


def _recalibrate_pt2(
    spec: JobSpec, x: np.ndarray, labeled: Labeled | None, out: Path, progress: _Progress
) -> Any:
    import torch

    from recalib.adapt import adapt
    from recalib.onnx.export import export_onnx
    from recalib.statbank import save_stat_bank

    torch.set_num_threads(spec.threads)
    program = torch.export.load(str(spec.base_pt2))
    dtype = _program_dtype(program)

    def convert(a: np.ndarray) -> Any:
        return torch.from_numpy(a).to(dtype)

    params = dict(spec.params)
    batches = _Batches(
        x,
        batch_size=params.pop("batch_size"),
        max_samples=params.pop("max_samples"),
        convert=convert,
        progress=progress,
    )
    progress.stage("recalibrating")
    report = adapt(program, batches, validation=_plan_validation(labeled, convert), **params)
    progress.stage("exporting")
    export = export_onnx(program, _example(x, convert), out / "model.onnx")
    torch.export.save(program, str(out / "model.pt2"))
    save_stat_bank(program, out / "stats.safetensors", metadata={"job": spec.job_id})
    return report, export.to_dict() | {"path": "model.onnx"}


def _onnx_input_dtype(model: Any) -> np.dtype[Any]:
    import onnx

    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise JobError(
            f"expected an ONNX model with one input to feed the data set to (got {len(inputs)})"
        )
    elem = inputs[0].type.tensor_type.elem_type
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def _recalibrate_onnx(
    spec: JobSpec, x: np.ndarray, labeled: Labeled | None, out: Path, progress: _Progress
) -> Any:
    import onnx

    try:
        from recalib.adapt import adapt_onnx
    except ImportError as exc:
        raise JobError(
            "recalibrating a model registered as .onnx needs recalib.adapt, which "
            f"this installation lacks ({exc}); register the .pt2 ExportedProgram instead"
        ) from exc
    base = onnx.load(spec.base_onnx)
    dtype = _onnx_input_dtype(base)
    params = dict(spec.params)
    batches = _Batches(
        x,
        batch_size=params.pop("batch_size"),
        max_samples=params.pop("max_samples"),
        convert=lambda a: a.astype(dtype, copy=False),
        progress=progress,
    )
    progress.stage("recalibrating")
    validation = _plan_validation(labeled, lambda a: a.astype(dtype, copy=False))
    model, report = adapt_onnx(base, batches, validation=validation, **params)
    onnx.save(model, str(out / "model.onnx"))
    return report, None


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def _accuracy(path: Path | str, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    """Top-1 accuracy of an ONNX classifier (first output ``(N, classes)``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    dtype = _ORT_DTYPES.get(feed.type, np.float32)
    correct = 0
    for i in range(0, len(x), 256):
        logits = session.run(None, {feed.name: np.asarray(x[i : i + 256], dtype=dtype)})[0]
        if logits.ndim != 2:
            raise JobError(
                "validation needs a classifier whose first output is (N, classes) logits "
                f"(got shape {logits.shape})"
            )
        correct += int((logits.argmax(axis=1) == y[i : i + 256]).sum())
    return correct / len(x)


def _validate(spec: JobSpec, new_onnx: Path, labeled: Labeled | None) -> dict[str, Any]:
    if spec.validation is None or labeled is None:
        raise JobError("no validation was asked for")
    x, y = labeled
    base = _accuracy(spec.base_onnx, x, y, spec.threads)
    new = _accuracy(new_onnx, x, y, spec.threads)
    limit = float(spec.validation["max_accuracy_drop"])
    return {
        "samples": len(x),
        "base_accuracy": base,
        "new_accuracy": new,
        "accuracy_drop": base - new,
        "max_accuracy_drop": limit,
        "passed": bool(base - new <= limit),
    }


def _run(spec: JobSpec, progress: _Progress) -> dict[str, Any]:
    from recalib.datafiles import load_input_array

    out = Path(spec.work_dir) / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    progress.stage("loading")
    x = load_input_array(spec.dataset, spec.key)
    labeled = _load_validation(spec)
    if spec.base_pt2 is not None:
        report, export = _recalibrate_pt2(spec, x, labeled, out, progress)
    else:
        report, export = _recalibrate_onnx(spec, x, labeled, out, progress)
    validation = None
    if spec.validation is not None:
        progress.stage("validating")
        validation = _validate(spec, out / "model.onnx", labeled)
    payload = {
        "kind": "recalibration",
        "recalibration": report.to_dict(),
        "export": export,
        "validation": validation,
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    if spec.bank is not None:
        max_samples = spec.params.get("max_samples")
        rows = x if max_samples is None else x[:max_samples]
        _write_bank(spec, out, rows)
    progress.stage("registering")
    return {"ok": True, "error": None, "validation": validation, "plan": report.plan}


def _write_bank(spec: JobSpec, out: Path, rows: np.ndarray) -> None:
    """``out/bank.safetensors``: the new model's statistics (torch layer names), stamped
    with the base version's weights (recalibration changes no weight), and its route limit
    (the :data:`~recalib.onnx.bank_routing.DEFAULT_QUANTILE` of the distance of the job's
    calibration ``rows`` to the bank, in the base version's bank graph). A base model the
    bank graph cannot route (no BN layer fed by the input alone, ...) gets no limit: the
    bank is stored all the same (the runtime serves it with the global threshold only)."""
    import onnx

    from recalib.errors import RecalibError
    from recalib.onnx.bank_files import ROUTE_LIMIT_KEY, ROUTE_LIMIT_QUANTILE_KEY, save_onnx_bank
    from recalib.onnx.bank_routing import DEFAULT_QUANTILE, bank_route_limit
    from recalib.onnx.names import bn_node_stats, read_bn_map

    new = onnx.load(str(out / "model.onnx"))
    infos = read_bn_map(new)
    stats = {infos[key].layer: pair for key, pair in bn_node_stats(new).items()}
    base = onnx.load(spec.base_onnx)
    metadata: dict[str, Any] = {"job": spec.job_id}
    try:
        limit = bank_route_limit(
            base,
            stats,
            rows,
            quantile=DEFAULT_QUANTILE,
            batch_size=int(spec.params.get("batch_size") or 64),
            threads=spec.threads,
        )
    except RecalibError as exc:
        log.warning("stat bank %s: no route limit (%s)", spec.bank, exc)
    else:
        metadata |= {
            ROUTE_LIMIT_KEY: limit,
            ROUTE_LIMIT_QUANTILE_KEY: DEFAULT_QUANTILE,
            "route_limit_rows": len(rows),
        }
        log.info("stat bank %s: route limit %.6g (q=%g)", spec.bank, limit, DEFAULT_QUANTILE)
    save_onnx_bank(base, stats, out / BANK_FILE, name=spec.bank, metadata=metadata)


def _write_result(work: Path, result: dict[str, Any]) -> None:
    tmp = work / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(work / RESULT_FILE)


def run_job(spec: JobSpec) -> None:
    """The worker process's entry point: run the job, write ``result.json``.

    Every failure ends up in ``result.json`` as ``{"ok": false, "error": ...}``: the core's
    message for bad inputs (NaN data, layer mismatch ...), the exception type and message
    (and the traceback, which the server logs) for anything unexpected.
    """
    from recalib.errors import RecalibError  # here: importing recalib imports torch

    work = Path(spec.work_dir)
    _setup(spec)
    progress = _Progress(spec)
    start = time.perf_counter()
    try:
        result = _run(spec, progress)
    except (RecalibError, JobError) as exc:
        log.warning("job failed: %s", exc)
        result = {"ok": False, "error": str(exc)}
    # The process's last line of defence: whatever failed, report it rather than die silently.
    except Exception as exc:
        log.exception("job failed unexpectedly")
        error = f"{type(exc).__name__}: {exc}"
        result = {"ok": False, "error": error, "traceback": traceback.format_exc()}
    finally:
        progress.close()
    result["seconds"] = time.perf_counter() - start
    _write_result(work, result)
