"""Recalibration jobs: ``POST/GET /v1/models/{name}/recalibrations`` and
``GET/DELETE /v1/recalibrations/{id}`` (see :mod:`service.jobs`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from ..jobs import JobInfo, JobList, RecalibrationRequest
from .deps import (
    ERROR_RESPONSES,
    FORBIDDEN_RESPONSE,
    JobsDep,
    require_control_role,
    require_token,
)
from .params import JobIdPath, ModelNamePath

__all__ = ["router"]

router = APIRouter(
    prefix="/v1",
    tags=["recalibrations"],
    dependencies=[Depends(require_token)],
    responses=ERROR_RESPONSES,
)


@router.post(
    "/models/{name}/recalibrations",
    status_code=202,
    summary="Start a recalibration job (runs in a worker process)",
    dependencies=[Depends(require_control_role)],
    responses=FORBIDDEN_RESPONSE,
)
async def start_recalibration(
    jobs: JobsDep, name: ModelNamePath, body: RecalibrationRequest, response: Response
) -> JobInfo:
    job = await jobs.submit(name, body)
    response.headers["Location"] = f"/v1/recalibrations/{job.id}"
    return job


@router.get("/models/{name}/recalibrations", summary="List a model's recalibration jobs")
def list_recalibrations(jobs: JobsDep, name: ModelNamePath) -> JobList:
    return JobList(jobs=jobs.jobs(name))


@router.get("/recalibrations/{job_id}", summary="Get a job: state, progress, result")
def get_recalibration(jobs: JobsDep, job_id: JobIdPath) -> JobInfo:
    return jobs.get(job_id)


@router.delete(
    "/recalibrations/{job_id}", summary="Cancel a queued or running job (returns it, final)"
)
async def cancel_recalibration(jobs: JobsDep, job_id: JobIdPath) -> JobInfo:
    return await jobs.cancel(job_id)
