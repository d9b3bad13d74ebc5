"""``/v1/models/{name}/banks`` and ``/v1/models/{name}/default-bank``: a model's stat banks
and its default bank (see :mod:`service.banks`).

Upload (``PUT``, multipart ``file``), list (with the default), get, download and delete;
set (``PUT``, JSON ``{"bank": ...}``) and clear the default. Writes belong on the control
replica (403 with ``RECALIB_ROLE=inference``); a replica fed by the model store answers
403 to every route (it has no database).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, BeforeValidator, WithJsonSchema

from ..banks import BankInfo, BankList, BankStore, check_default_bank
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
from .params import ALIAS_PATTERN, BankNamePath, ModelNamePath

__all__ = ["BanksDep", "DefaultBank", "get_banks", "router"]


def _default_bank(value: Any) -> Any:
    """The domain's check first (400 with its message), as for path parameters; a value
    that is not a string is left to the schema (422)."""
    return check_default_bank(value) if isinstance(value, str) else value


class DefaultBank(BaseModel):
    """A model's default bank (``PUT /v1/models/{name}/default-bank``)."""

    bank: Annotated[
        str,
        BeforeValidator(_default_bank),
        WithJsonSchema(  # what the check enforces (the validator hides it from pydantic)
            {
                "type": "string",
                "pattern": ALIAS_PATTERN,
                "maxLength": 64,
                "description": "'auto' (each row to its nearest bank), 'none' (the "
                "version's own statistics) or the name of one of the model's banks",
            }
        ),
    ]


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
    prefix="/v1/models/{name}",
    tags=["banks"],
    dependencies=[Depends(require_token)],
    responses={**ERROR_RESPONSES, **FORBIDDEN_RESPONSE},
)


@router.get("/banks", summary="List a model's stat banks and its default bank")
def list_banks(banks: BanksDep, name: ModelNamePath) -> BankList:
    return banks.listing(name)


@router.put(
    "/banks/{bank}",
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
    other BN layers than the model's, or a name that is a number or ``auto``/``none``;
    409 if the name is taken (banks are immutable)."""
    info = await banks.put(name, bank, file, max_bytes=settings.max_request_bytes)
    response.headers["Location"] = f"/v1/models/{name}/banks/{bank}"
    return info


@router.get("/banks/{bank}", summary="Get a stat bank")
def get_bank(banks: BanksDep, name: ModelNamePath, bank: BankNamePath) -> BankInfo:
    return banks.bank(name, bank)


@router.get(
    "/banks/{bank}/file",
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
    "/banks/{bank}",
    status_code=204,
    summary="Delete a stat bank (409 while it is the model's default bank)",
    dependencies=[Depends(require_control_role)],
)
async def delete_bank(banks: BanksDep, name: ModelNamePath, bank: BankNamePath) -> Response:
    await banks.delete(name, bank)
    return Response(status_code=204)


@router.put(
    "/default-bank",
    summary="Set the model's default bank: 'auto', 'none' or one of its banks",
    dependencies=[Depends(require_control_role)],
)
async def put_default_bank(banks: BanksDep, name: ModelNamePath, body: DefaultBank) -> DefaultBank:
    """What requests naming no bank (``parameters.bank`` absent) use. 404 for a bank the
    model does not have; 400 for a malformed name."""
    await banks.set_default(name, body.bank)
    return body


@router.delete(
    "/default-bank",
    status_code=204,
    summary="Clear the model's default bank (requests naming none use the version's own "
    "statistics)",
    dependencies=[Depends(require_control_role)],
)
async def delete_default_bank(banks: BanksDep, name: ModelNamePath) -> Response:
    await banks.clear_default(name)
    return Response(status_code=204)
