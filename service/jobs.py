"""Recalibration jobs: queued in the database, run in worker processes, finished here.

A job goes ``queued`` -> ``running`` -> one final state: ``succeeded``, ``failed``,
``cancelled`` or ``interrupted``. Each runs :func:`service.worker.run_job` in its own
process (``multiprocessing`` ``spawn`` context), at most ``Settings.job_workers`` at once;
the server's event loop only polls the process. When it exits, the server reads its
``result.json``, adds the new version to the registry from the job's output directory
(one rename, lineage recorded), and - if the job asked for it and the optional validation
passed - points ``production`` at it (:meth:`service.registry.Registry.set_alias`, which
has the runtime load it first).

* Cancel (``DELETE /v1/recalibrations/{id}``): a queued job ends at once; a running job's
  process is terminated (SIGTERM, then SIGKILL after 5 s); a cancel that arrives as the
  process exits on its own still cancels (its output is discarded); a job whose version is
  being registered cannot be cancelled (409).
* An unexpected error in the server while finishing a job fails the job (logged with its
  traceback) rather than leaving it ``running``.
* Timeout: a process running longer than ``Settings.job_timeout_seconds`` is terminated
  and the job fails.
* Restart: no process survives the server. At startup every job still ``queued`` or
  ``running`` (the previous server died) is marked ``interrupted`` and its work directory
  deleted; a clean shutdown does the same for the jobs it stops. A version only exists
  once the server registered it, so an interrupted job never leaves half a version.
* Validation failing: the new version is still created (its row records the validation),
  ``production`` is left alone, and the job ends ``failed`` saying why.
* Never promoted blindly: the worker chooses the adaptation plan (:mod:`recalib.plans`) by
  the validation set when the job has one, else by the label-free guard. A result the
  plan flags (no adapted plan beat the source, or the guard could not run) is created as a
  version but not promoted; a job that asked for ``promote`` then ends ``failed`` with the
  plan's reason. ``JobInfo.plan`` carries the candidates table.
* A stat bank instead of a version (``"output": {"bank": name}``): the worker writes the
  recalibrated statistics as a bank file stamped with the base version's weights digest,
  and the server stores it (:meth:`service.banks.BankStore.add_file`) instead of adding a
  version. The gate is stricter than for versions: a flagged plan or a failed validation
  saves nothing (the job fails "not saved: ..."), since a bank has no history to keep it
  in. The name must be free at submission (409) and still free when it is stored (else
  the job fails). ``promote`` does not combine with a bank (422). The stored bank is
  pushed to the runtime (:meth:`service.banks.BankStore.push`) before the job reports
  ``succeeded``; so is a new version (banks are valid for versions with their weights).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recalib.errors import DataError, RecalibError
from recalib.options import DEFAULTS

from .artifacts import ARTIFACT_FILES
from .banks import BankStore, check_bank_name
from .datasets import DatasetStore, input_array_name
from .db import Database, dumps, loads, utcnow
from .errors import Conflict, InvalidInput, NotFound, ServiceError
from .metrics import ServiceMetrics
from .names import check_name
from .registry import Registry
from .registry_models import PRODUCTION
from .settings import Settings
from .worker import BANK_FILE, OUT_DIR, RESULT_FILE, JobSpec, run_job

__all__ = [
    "FINAL_STATES",
    "BankOutput",
    "JobInfo",
    "JobList",
    "JobManager",
    "JobState",
    "RecalibrationRequest",
    "ValidationRequest",
    "WorkerTarget",
]

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")
_KILL_AFTER = 5.0
_POLL = 0.05

WorkerTarget = Callable[[JobSpec], None]


class ValidationRequest(BaseModel):
    """Accuracy check of the new version against its base before it may be promoted."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="id of a labeled data set with arrays x and y")
    max_accuracy_drop: float = Field(
        default=0.0,
        ge=-1.0,
        le=1.0,
        description="largest allowed base accuracy - new accuracy (negative: demand a gain)",
    )


class BankOutput(BaseModel):
    """Save the result as a stat bank of the model instead of a new version."""

    model_config = ConfigDict(extra="forbid")

    bank: str = Field(
        pattern=r"^(?:[0-9]*[A-Za-z]|[0-9]+[_.-])[A-Za-z0-9_.-]*$",
        max_length=64,
        description="name of the new bank (named like an alias; must be free)",
    )


class RecalibrationRequest(BaseModel):
    """Body of ``POST /v1/models/{name}/recalibrations``."""

    # The document says what _prior_needs_strength enforces: method "prior" needs a number.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"method": {"const": "prior"}}, "required": ["method"]},
            "then": {
                "properties": {"prior_strength": {"type": "number", "minimum": 0.0}},
                "required": ["prior_strength"],
            },
        },
    )

    dataset: str = Field(description="id of the calibration data set")
    key: str | None = Field(default=None, description="input array in the data set")
    base_version: int | str | None = Field(
        default=None, description="version number or alias (default: production)"
    )
    method: Literal["exact", "ema", "prior"] = DEFAULTS.method  # type: ignore[assignment]
    mode: Literal["train", "eval"] = DEFAULTS.mode  # type: ignore[assignment]
    prior_strength: float | None = Field(default=DEFAULTS.prior_strength, ge=0.0)
    momentum: float | None = Field(default=DEFAULTS.momentum, gt=0.0, le=1.0)
    max_passes: int = Field(default=DEFAULTS.max_passes, ge=1, le=1000)
    tol: float = Field(default=DEFAULTS.tol, ge=0.0)
    batch_size: int = Field(default=DEFAULTS.batch_size, ge=1, le=65536)
    max_samples: int | None = Field(default=DEFAULTS.max_samples, ge=1)
    anchor: int | None = Field(
        default=DEFAULTS.anchor,
        ge=0,
        description="mode eval: items of the lockstep first pass (null: what memory holds)",
    )
    allow_unconverged: bool = Field(
        default=DEFAULTS.allow_unconverged,
        description="mode eval: keep statistics that did not converge instead of failing",
    )
    layers: list[str] | None = Field(default=None, description="layer names or globs")
    plan: Literal["auto", "full", "source"] = Field(
        default="auto",
        description="auto: choose among source, full, first-k and prior-mix plans by the "
        "validation set, else by the label-free guard; full: every selected layer",
    )
    promote: bool = Field(default=False, description="point production at the new version")
    validation: ValidationRequest | None = None
    output: BankOutput | None = Field(
        default=None,
        description="null: a new version (default); {bank: name}: a stat bank of the model, "
        "stamped with the base version's weights (not with promote)",
    )

    @model_validator(mode="after")
    def _prior_needs_strength(self) -> RecalibrationRequest:
        if self.method == "prior" and self.prior_strength is None:
            raise ValueError("method 'prior' needs prior_strength (the source's sample size)")
        if self.output is not None and self.promote:
            raise ValueError("promote needs a version: a job with output bank cannot promote")
        return self


class JobInfo(BaseModel):
    id: str
    model: str
    state: JobState
    created_at: str
    started_at: str | None
    finished_at: str | None
    base_version: int
    dataset: str
    params: dict[str, Any] = Field(description="the request as submitted")
    progress: dict[str, Any] = Field(description="stage, pass, batches, batches_per_pass")
    error: str | None
    result_version: int | None
    promoted: bool
    validation: dict[str, Any] | None
    plan: dict[str, Any] | None = Field(
        default=None,
        description="the candidate plans, their scores and the chosen one (criterion, "
        "chosen, reason, flagged, candidates)",
    )
    output: BankOutput | None = Field(
        default=None, description="null: the job makes a version; else the bank it makes"
    )
    result_bank: str | None = Field(default=None, description="the bank it stored")


class JobList(BaseModel):
    jobs: list[JobInfo]


@dataclass
class _Handle:
    """A live job in this server process."""

    id: str
    model: str
    spec: JobSpec
    promote: bool
    base_version: int
    dataset: str
    params: dict[str, Any]
    validation_dataset: str | None
    recalibration: dict[str, Any]
    bank: str | None = None
    task: asyncio.Task[None] | None = None
    process: Any = None
    started: float | None = None
    cancel_requested: bool = False
    finalising: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _worker_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def _read_result(work: Path, exitcode: int | None) -> dict[str, Any] | str:
    """The worker's ``result.json`` in ``work``, or why there is none to read.

    Returns:
        The result object, or the job's error: the process died without writing one,
        or it is not a readable JSON object.
    """
    result_file = work / RESULT_FILE
    if not result_file.is_file():
        return f"the worker process died (exit code {exitcode})"
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {RESULT_FILE} from the worker: {exc}"
    if not isinstance(result, dict):
        return f"expected a JSON object in {RESULT_FILE} (got {type(result).__name__})"
    return result


def _job_info(row: sqlite3.Row, model: str) -> JobInfo:
    """A ``jobs`` row as the API shows it."""
    return JobInfo(
        id=row["id"],
        model=model,
        state=row["state"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        base_version=row["base_version"],
        dataset=row["dataset_id"],
        params=loads(row["params"]),
        progress=loads(row["progress"]),
        error=row["error"],
        result_version=row["result_version"],
        promoted=bool(row["promoted"]),
        validation=loads(row["validation"]),
        plan=loads(row["plan"]),
        output=loads(row["params"]).get("output"),
        result_bank=row["result_bank"],
    )


def _not_saved(plan: dict[str, Any] | None, validation: dict[str, Any] | None) -> str | None:
    """Why a bank job's result may not be stored (the plan gate, then validation)."""
    if plan is not None and plan.get("flagged"):
        return (
            f"not saved: {plan.get('reason')} (plan {plan.get('chosen')}, "
            f"{plan.get('criterion')}); no bank was stored"
        )
    if validation is not None and not validation["passed"]:
        return (
            f"not saved: validation failed: accuracy {validation['new_accuracy']:.4f} vs base "
            f"{validation['base_accuracy']:.4f} (drop {validation['accuracy_drop']:.4f} > max "
            f"{validation['max_accuracy_drop']:g}); no bank was stored"
        )
    return None


def _store_bank(
    banks: BankStore,
    handle: _Handle,
    bank: str,
    out: Path,
    validation: dict[str, Any] | None,
    plan: dict[str, Any] | None,
) -> str | None:
    """A bank job's end: the gate (:func:`_not_saved`), then the bank is stored from
    ``out``. Returns the job's error (``None``: stored)."""
    error = _not_saved(plan, validation)
    if error is not None:
        return error
    source = {"kind": "recalibration", "job": handle.id, "base_version": handle.base_version}
    source |= {"dataset": handle.dataset, "recalibration": handle.recalibration}
    try:
        banks.add_file(handle.model, bank, out / BANK_FILE, source)
    except (ServiceError, RecalibError, OSError, ValueError) as exc:
        return f"could not store the bank: {exc}"
    return None


async def _stop(proc: Any) -> None:
    """Terminate a worker process; kill it if it is still alive after a grace period."""
    proc.terminate()
    await asyncio.to_thread(proc.join, _KILL_AFTER)
    if proc.is_alive():
        proc.kill()
        await asyncio.to_thread(proc.join)


class JobManager:
    """Submits, runs, cancels and recovers recalibration jobs.

    Args:
        settings: ``home``, ``job_workers``, ``job_timeout_seconds``.
        db: the metadata store (the ``jobs`` table; workers report progress to it).
        registry: the model registry (versions; promotion).
        datasets: the data set store.
        metrics: counts finished jobs (``job_finished``).
        banks: where jobs with ``output.bank`` store their bank; told (``push``) after a
            job stored a bank or added a version (the versions a bank is valid for).
        target: the function the worker process runs (tests substitute slow or crashing
            ones; it must be importable by name, as ``spawn`` pickles it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        registry: Registry,
        datasets: DatasetStore,
        metrics: ServiceMetrics,
        banks: BankStore,
        target: WorkerTarget | None = None,
    ) -> None:
        self._settings = settings
        self._banks = banks
        self._db = db
        self._registry = registry
        self._datasets = datasets
        self._metrics = metrics
        self._target: WorkerTarget = target or run_job
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = asyncio.Semaphore(settings.job_workers)
        self._live: dict[str, _Handle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def work_root(self) -> Path:
        return self._settings.home / "work"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Mark jobs a previous process left unfinished ``interrupted``; clear work dirs."""
        self._closing = False
        self._slots = asyncio.Semaphore(self._settings.job_workers)  # this event loop's
        count = self._interrupt_unfinished("the service stopped while the job was {state}")
        shutil.rmtree(self.work_root, ignore_errors=True)
        if count:
            log.warning("%d recalibration job(s) from a previous run marked interrupted", count)

    async def close(self) -> None:
        """Stop every live job (marked ``interrupted``) and wait for their tasks."""
        self._closing = True
        for handle in list(self._live.values()):
            if handle.process is None and handle.task is not None:
                handle.task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._interrupt_unfinished("the service shut down while the job was {state}")

    def _interrupt_unfinished(self, reason: str) -> int:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, state FROM jobs WHERE state IN ('queued', 'running')"
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE jobs SET state = 'interrupted', error = ?, finished_at = ?, "
                    "progress = json_set(progress, '$.stage', 'interrupted') WHERE id = ?",
                    (reason.format(state=row["state"]), utcnow(), row["id"]),
                )
        for row in rows:
            shutil.rmtree(self.work_root / row["id"], ignore_errors=True)
            self._metrics.job_finished("interrupted", 0.0)
        return len(rows)

    # -- queries -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobInfo:
        """Raises: NotFound (InvalidInput for a malformed id)."""
        check_name(job_id, "job id")
        row = self._db.query_one(
            "SELECT jobs.*, models.name AS model_name FROM jobs JOIN models "
            "ON jobs.model_id = models.id WHERE jobs.id = ?",
            (job_id,),
        )
        if row is None:
            raise NotFound(f"recalibration job {job_id!r} not found")
        return _job_info(row, row["model_name"])

    def jobs(self, model: str) -> list[JobInfo]:
        """A model's jobs, oldest first."""
        info = self._registry.model(model)
        rows = self._db.query(
            "SELECT * FROM jobs WHERE model_id = ? ORDER BY created_at, id", (info.id,)
        )
        return [_job_info(r, model) for r in rows]

    # -- submit --------------------------------------------------------------------------

    def _check_shape(self, model: str, version: int, sample_shape: list[int]) -> None:
        inputs = self._registry.version(model, version).signature.inputs
        if len(inputs) != 1:
            return
        expected = inputs[0].shape[1:]
        fits = len(expected) == len(sample_shape) and all(
            not isinstance(e, int) or e == g for e, g in zip(expected, sample_shape, strict=True)
        )
        if not fits:
            raise InvalidInput(
                f"expected data samples of shape {tuple(expected)} for model {model!r} "
                f"version {version} (got samples of shape {tuple(sample_shape)})"
            )

    def _validation_spec(
        self, request: ValidationRequest, model: str, version: int
    ) -> dict[str, Any]:
        info = self._datasets.get(request.dataset)
        x, y = info.tensors.get("x"), info.tensors.get("y")
        if x is None or y is None or len(y.shape) != 1 or y.shape[0] != x.shape[0]:
            raise InvalidInput(
                f"expected a validation data set with arrays x (N, ...) and labels y (N,) "
                f"(got {{{', '.join(f'{k}: {v.shape}' for k, v in info.tensors.items())}}})"
            )
        if not (y.dtype.startswith("int") or y.dtype.startswith("uint")):
            raise InvalidInput(
                f"expected integer class labels y in validation data set {info.id} "
                f"(got dtype {y.dtype})"
            )
        self._check_shape(model, version, x.shape[1:])
        return {
            "dataset": str(self._datasets.path(info.id)),
            "max_accuracy_drop": request.max_accuracy_drop,
        }

    async def submit(self, model: str, request: RecalibrationRequest) -> JobInfo:
        """Queue a recalibration of ``model``; returns the job (``queued``).

        Raises:
            NotFound: unknown model, version, alias or data set.
            InvalidInput: data set without a usable input, of the wrong sample shape, or
                a validation set without ``x``/``y``.
            Conflict: the service is shutting down.
        """
        if self._closing:
            raise Conflict("the service is shutting down; submit the job again later")
        info = self._registry.model(model)
        base = self._registry.resolve_version(model, request.base_version)
        dataset = self._datasets.get(request.dataset)
        try:
            key = input_array_name(dataset.tensors, request.key)
        except DataError as exc:
            raise InvalidInput(f"data set {dataset.id}: {exc}") from exc
        self._check_shape(model, base, dataset.tensors[key].shape[1:])
        bank = None if request.output is None else check_bank_name(request.output.bank)
        if bank is not None:
            self._banks.check_free(model, bank)
        validation = (
            None
            if request.validation is None
            else self._validation_spec(request.validation, model, base)
        )
        job_id = uuid.uuid4().hex
        version_dir = self._registry.artifact(model, base, "onnx").parent
        pt2 = version_dir / ARTIFACT_FILES["pt2"]
        exclude = {"dataset", "key", "base_version", "promote", "validation", "output"}
        spec = JobSpec(
            job_id=job_id,
            db_path=str(self._db.path),
            work_dir=str(self.work_root / job_id),
            base_onnx=str(version_dir / ARTIFACT_FILES["onnx"]),
            base_pt2=str(pt2) if pt2.is_file() else None,
            dataset=str(self._datasets.path(dataset.id)),
            key=key,
            params=request.model_dump(exclude=exclude),
            validation=validation,
            threads=_worker_threads(),
            bank=bank,
        )
        handle = _Handle(
            id=job_id,
            model=model,
            spec=spec,
            promote=request.promote,
            base_version=base,
            dataset=dataset.id,
            params=request.model_dump(mode="json"),
            validation_dataset=None if request.validation is None else request.validation.dataset,
            recalibration=spec.params | {"key": key},
            bank=bank,
        )
        self._db.execute(
            "INSERT INTO jobs (id, model_id, state, base_version, dataset_id, "
            "validation_dataset_id, params, created_at, progress) "
            "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                info.id,
                base,
                dataset.id,
                handle.validation_dataset,
                dumps(handle.params),
                utcnow(),
                dumps({"stage": "queued"}),
            ),
        )
        self._live[job_id] = handle
        handle.task = asyncio.create_task(self._run(handle), name=job_id)
        self._tasks.add(handle.task)
        handle.task.add_done_callback(self._tasks.discard)
        log.info("job %s queued: recalibrate %s v%d on %s", job_id, model, base, dataset.id)
        return self.get(job_id)

    # -- cancel --------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> JobInfo:
        """Cancel a queued or running job; returns it in its final state.

        Raises:
            NotFound: no such job; Conflict: it has finished, or is being registered.
        """
        info = self.get(job_id)
        handle = self._live.get(job_id)
        if info.state in FINAL_STATES or handle is None:
            raise Conflict(f"job {job_id!r} has already finished ({info.state})")
        if handle.finalising:
            raise Conflict(f"job {job_id!r} is registering its version; it cannot be cancelled")
        handle.cancel_requested = True
        if handle.process is None and handle.task is not None:
            # Still waiting for a worker slot (no await lies between taking a slot and
            # starting the process, so "no process" means "queued").
            self._finish(handle, "cancelled", error="cancelled before it started")
            handle.task.cancel()
        await handle.done.wait()
        return self.get(job_id)

    # -- running -------------------------------------------------------------------------

    def _finish(
        self,
        handle: _Handle,
        state: JobState,
        *,
        error: str | None = None,
        version: int | None = None,
        promoted: bool = False,
        validation: dict[str, Any] | None = None,
        plan: dict[str, Any] | None = None,
        bank: str | None = None,
    ) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, error = ?, result_version = ?, result_bank = ?, "
            "promoted = ?, validation = ?, plan = ?, finished_at = ?, "
            "progress = json_set(progress, '$.stage', ?) "
            "WHERE id = ? AND state IN ('queued', 'running')",
            (
                state,
                error,
                version,
                bank,
                int(promoted),
                None if validation is None else dumps(validation),
                None if plan is None else dumps(plan),
                utcnow(),
                state,
                handle.id,
            ),
        )
        seconds = 0.0 if handle.started is None else time.monotonic() - handle.started
        self._metrics.job_finished(state, seconds)
        log.info("job %s %s%s", handle.id, state, f": {error}" if error else "")

    async def _run(self, handle: _Handle) -> None:
        try:
            async with self._slots:
                await self._execute(handle)
        except asyncio.CancelledError:
            pass  # cancel() or close() recorded the final state
        # A bug or an unforeseen failure here must not leave the job "running" for ever
        # (_finish changes only a job that is still queued or running).
        except Exception as exc:
            log.exception("job %s: unexpected error in the server", handle.id)
            self._finish(handle, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            proc = handle.process
            if proc is not None and proc.is_alive():  # cancelled mid-wait: never leave it
                proc.kill()
                proc.join(_KILL_AFTER)
            shutil.rmtree(handle.spec.work_dir, ignore_errors=True)
            self._live.pop(handle.id, None)
            handle.done.set()

    async def _execute(self, handle: _Handle) -> None:
        work = Path(handle.spec.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        self._db.execute(
            "UPDATE jobs SET state = 'running', started_at = ?, progress = ? WHERE id = ?",
            (utcnow(), dumps({"stage": "starting"}), handle.id),
        )
        handle.started = time.monotonic()
        handle.process = self._ctx.Process(
            target=self._target, args=(handle.spec,), name=f"recalib-job-{handle.id}", daemon=True
        )
        handle.process.start()
        why = await self._wait(handle)
        if why == "cancelled":
            self._finish(handle, "cancelled", error="cancelled while running")
        elif why == "timeout":
            limit = self._settings.job_timeout_seconds
            self._finish(
                handle, "failed", error=f"timed out after {limit:g} s (job_timeout_seconds)"
            )
        elif why == "shutdown":
            self._finish(
                handle, "interrupted", error="the service shut down while the job was running"
            )
        else:
            handle.finalising = True
            await self._register(handle, work)

    async def _wait(self, handle: _Handle) -> str:
        """Poll the process until it exits, or stop it: ``exited|cancelled|timeout|shutdown``."""
        proc = handle.process
        deadline = time.monotonic() + self._settings.job_timeout_seconds
        while proc.is_alive():
            why = (
                "cancelled"
                if handle.cancel_requested
                else "shutdown"
                if self._closing
                else "timeout"
                if time.monotonic() > deadline
                else None
            )
            if why is not None:
                await _stop(proc)
                return why
            await asyncio.sleep(_POLL)
        # A cancel that arrived while the process was exiting still wins: the caller of
        # cancel() is told "cancelled", so no version may appear.
        return "cancelled" if handle.cancel_requested else "exited"

    async def _register(self, handle: _Handle, work: Path) -> None:
        """Turn a finished worker's output into a version (and maybe promote it)."""
        result = _read_result(work, handle.process.exitcode)
        if isinstance(result, str):
            self._finish(handle, "failed", error=result)
            return
        if not result.get("ok"):
            if result.get("traceback"):
                log.error("job %s failed in its worker:\n%s", handle.id, result["traceback"])
            self._finish(handle, "failed", error=str(result.get("error")))
            return
        validation = result.get("validation")
        if validation is not None:
            validation = {
                "dataset": handle.validation_dataset,
                "base_version": handle.base_version,
            } | validation
        plan = result.get("plan") if isinstance(result.get("plan"), dict) else None
        if handle.bank is not None:
            error = await asyncio.to_thread(
                _store_bank, self._banks, handle, handle.bank, work / OUT_DIR, validation, plan
            )
            if error is None:  # before the job says so: the bank serves once it succeeded
                await self._banks.push(handle.model)
            state: JobState = "failed" if error else "succeeded"
            bank = None if error else handle.bank
            self._finish(handle, state, error=error, bank=bank, validation=validation, plan=plan)
            return
        try:
            version = await asyncio.to_thread(
                self._registry.add_version,
                handle.model,
                work / OUT_DIR,
                parent_version=handle.base_version,
                dataset=handle.dataset,
                job=handle.id,
                recalibration=handle.recalibration,
                validation=validation,
            )
        except (ServiceError, RecalibError, OSError, ValueError) as exc:
            self._finish(handle, "failed", error=f"could not register the new version: {exc}")
            return
        await self._banks.push(handle.model)  # the new version may take the model's banks
        await self._conclude(handle, version.version, validation, plan)

    async def _conclude(
        self,
        handle: _Handle,
        version: int,
        validation: dict[str, Any] | None,
        plan: dict[str, Any] | None = None,
    ) -> None:
        if handle.promote and plan is not None and plan.get("flagged"):
            error = (
                f"not promoted: {plan.get('reason')} (plan {plan.get('chosen')}, "
                f"{plan.get('criterion')}); version {version} was created but not promoted"
            )
            self._finish(
                handle, "failed", error=error, version=version, validation=validation, plan=plan
            )
            return
        if validation is not None and not validation["passed"]:
            error = (
                f"validation failed: accuracy {validation['new_accuracy']:.4f} vs base "
                f"{validation['base_accuracy']:.4f} (drop {validation['accuracy_drop']:.4f} > "
                f"max {validation['max_accuracy_drop']:g}); version {version} was created but "
                "not promoted"
            )
            self._finish(
                handle, "failed", error=error, version=version, validation=validation, plan=plan
            )
            return
        if handle.promote:
            try:
                await self._registry.set_alias(handle.model, PRODUCTION, version)
            # Whatever the runtime raised, the job must end; the version stays unpromoted.
            except Exception as exc:
                log.exception("job %s: promoting version %d failed", handle.id, version)
                error = f"version {version} was created but could not be promoted: {exc}"
                self._finish(
                    handle,
                    "failed",
                    error=error,
                    version=version,
                    validation=validation,
                    plan=plan,
                )
                return
        self._finish(
            handle,
            "succeeded",
            version=version,
            promoted=handle.promote,
            validation=validation,
            plan=plan,
        )
