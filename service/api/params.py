"""The path parameters of the ``/v1`` routes: the formats the server enforces, declared.

Each is a ``fastapi.Path`` carrying the pattern and length of :mod:`service.names`, so
the OpenAPI document says what a model name, alias, version reference, data set id or job
id may look like. The value is checked by the same function the domain code uses
(:func:`service.names.check_name`, :func:`service.names.check_alias`) before FastAPI's
own constraints, so a malformed one is the usual 400 ``{"error": ...}`` with that
function's message, as everywhere else in the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Path
from pydantic import BeforeValidator

from ..names import NAME_PATTERN, check_alias, check_name, is_number

__all__ = [
    "ALIAS_PATTERN",
    "VERSION_PATTERN",
    "AliasPath",
    "DatasetIdPath",
    "JobIdPath",
    "ModelNamePath",
    "NewAliasPath",
    "VersionPath",
]

_NAME_LENGTH = 64

ALIAS_PATTERN = r"^(?:[0-9]*[A-Za-z]|[0-9]+[_.-])[A-Za-z0-9_.-]*$"
"""A name (:data:`~service.names.NAME_PATTERN`, at most 64 characters) that is not a
number: what :func:`~service.names.check_alias` accepts, without look-ahead."""

VERSION_PATTERN = r"^(?:[0-9]+|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
"""A version number (ASCII digits, any length: one above every version names none, 404)
or an alias."""


def _checked(check: Callable[[str], object]) -> BeforeValidator:
    def validate(value: str) -> str:
        check(value)
        return value

    return BeforeValidator(validate)


def _version_ref(value: str) -> object:
    return value if is_number(value) else check_name(value, "version number or alias")


ModelNamePath = Annotated[
    str,
    Path(pattern=NAME_PATTERN, max_length=_NAME_LENGTH, description="model name"),
    _checked(lambda v: check_name(v, "model name")),
]
AliasPath = Annotated[
    str,
    Path(pattern=NAME_PATTERN, max_length=_NAME_LENGTH, description="alias"),
    _checked(lambda v: check_name(v, "alias")),
]
NewAliasPath = Annotated[
    str,
    Path(
        pattern=ALIAS_PATTERN,
        max_length=_NAME_LENGTH,
        description="alias (a name that is not a number: numbers name versions)",
    ),
    _checked(check_alias),
]
VersionPath = Annotated[
    str,
    Path(pattern=VERSION_PATTERN, description="version number or alias"),
    _checked(_version_ref),
]
DatasetIdPath = Annotated[
    str,
    Path(pattern=NAME_PATTERN, max_length=_NAME_LENGTH, description="data set id"),
    _checked(lambda v: check_name(v, "dataset id")),
]
JobIdPath = Annotated[
    str,
    Path(pattern=NAME_PATTERN, max_length=_NAME_LENGTH, description="recalibration job id"),
    _checked(lambda v: check_name(v, "job id")),
]
