"""``/v1/models/{name}/banks``: a model's stat banks (see :mod:`service.banks`).

Upload (``PUT``, multipart ``file``), list, get, download and delete. Writes belong on the
control replica (403 with ``RECALIB_ROLE=inference``); a replica fed by the model store
answers 403 to every route (it has no database).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, Response, UploadFile
from fastapi.responses import FileResponse

from ..banks import BankInfo, BankList, BankStore
from ..errors import Forbidden
from .deps import (
    ERROR_RESPONSES,
    FORBIDDEN_RESPONSE,
    ErrorBody,
    SettingsDep,
    get_settings,
    require_database,
    require_token,
)
from .params import BankNamePath, ModelNamePath

__all__ = ["BanksDep", "get_banks", "router"]


def get_banks(request: Request) -> BankStore:
    banks: BankStore = request.app.state.banks
    return banks


async def _banks(request: Request) -> BankStore:
    require_database(request)
    return get_banks(request)


async def require_control_role(request: Request) -> None:
    """Refuse bank writes when ``role`` is ``inference``: banks are registered on the
    control replica."""
    if get_settings(request).role == "inference":
        raise Forbidden(
            f"this replica runs with RECALIB_ROLE=inference: {request.method} "
            f"{request.url.path} (stat bank writes) belongs on the control replica "
            "(RECALIB_ROLE=all)"
        )


BanksDep = Annotated[BankStore, Depends(_banks)]

router = APIRouter(
    prefix="/v1/models/{name}/banks",
    tags=["banks"],
    dependencies=[Depends(require_token)],
    responses={**ERROR_RESPONSES, **FORBIDDEN_RESPONSE},
)


@router.get("", summary="List a model's stat banks")
def list_banks(banks: BanksDep, name: ModelNamePath) -> BankList:
    return BankList(banks=banks.banks(name))


@router.put(
    "/{bank}",
    status_code=201,
    summary="Store a stat bank (immutable; its weights digest must match a version's)",
    dependencies=[Depends(require_control_role)],
    responses={
        422: {
            "model": ErrorBody,
            "description": "Malformed request (fields, types), or a bank computed with "
            "weights that no version of the model has",
        }
    },
)
async def put_bank(
    banks: BanksDep,
    settings: SettingsDep,
    response: Response,
    name: ModelNamePath,
    bank: BankNamePath,
    file: Annotated[
        UploadFile,
        File(
            description="stat bank (.safetensors, recalib.statbank/1) stamped with the "
            "weights digest of the version it was computed on (recalib.onnx.save_onnx_bank)"
        ),
    ],
) -> BankInfo:
    """400 for a file that is not a bank, has no ``weights_digest``, non-finite values or
    other BN layers than the model's; 409 if the name is taken (banks are immutable)."""
    info = await banks.put(name, bank, file, max_bytes=settings.max_request_bytes)
    response.headers["Location"] = f"/v1/models/{name}/banks/{bank}"
    return info


@router.get("/{bank}", summary="Get a stat bank")
def get_bank(banks: BanksDep, name: ModelNamePath, bank: BankNamePath) -> BankInfo:
    return banks.bank(name, bank)


@router.get(
    "/{bank}/file",
    summary="Download a stat bank's file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_bank_file(banks: BanksDep, name: ModelNamePath, bank: BankNamePath) -> FileResponse:
    return FileResponse(
        banks.file(name, bank),
        media_type="application/octet-stream",
        filename=f"{name}-{bank}.safetensors",
    )


@router.delete(
    "/{bank}",
    status_code=204,
    summary="Delete a stat bank",
    dependencies=[Depends(require_control_role)],
)
def delete_bank(banks: BanksDep, name: ModelNamePath, bank: BankNamePath) -> Response:
    banks.delete(name, bank)
    return Response(status_code=204)
