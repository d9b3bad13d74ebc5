"""``/v1/datasets``: upload (streamed to disk, size-limited), list, get, delete data sets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Response, UploadFile

from ..datasets import DatasetInfo, DatasetList
from .deps import (
    ERROR_RESPONSES,
    FORBIDDEN_RESPONSE,
    DatasetsDep,
    SettingsDep,
    require_control_role,
    require_token,
)
from .params import DatasetIdPath

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[Depends(require_token)],
    responses=ERROR_RESPONSES,
)


@router.post(
    "",
    status_code=201,
    summary="Upload a data set (.npz, .npy or .safetensors)",
    dependencies=[Depends(require_control_role)],
    responses=FORBIDDEN_RESPONSE,
)
async def upload_dataset(
    datasets: DatasetsDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="the data file; nothing is unpickled")],
) -> DatasetInfo:
    return await datasets.create(
        file,
        max_bytes=settings.max_upload_bytes,
        max_uncompressed_bytes=settings.max_dataset_uncompressed_bytes,
    )


@router.get("", summary="List data sets")
def list_datasets(datasets: DatasetsDep) -> DatasetList:
    return DatasetList(datasets=datasets.datasets())


@router.get("/{dataset_id}", summary="Get a data set")
def get_dataset(datasets: DatasetsDep, dataset_id: DatasetIdPath) -> DatasetInfo:
    return datasets.get(dataset_id)


@router.delete("/{dataset_id}", status_code=204, summary="Delete a data set")
def delete_dataset(datasets: DatasetsDep, dataset_id: DatasetIdPath) -> Response:
    datasets.delete(dataset_id)
    return Response(status_code=204)
