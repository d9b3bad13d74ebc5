"""The path parameters and multipart fields of the ``/v1`` routes: the formats the server
enforces, declared.

Each path parameter is a ``fastapi.Path`` carrying the pattern and length of
:mod:`service.names`, so the OpenAPI document says what a model name, alias, version
reference, data set id or job id may look like. The value is checked by the same function
the domain code uses (:func:`service.names.check_name`, :func:`service.names.check_alias`)
before FastAPI's own constraints, so a malformed one is the usual 400 ``{"error": ...}``
with that function's message, as everywhere else in the service.

The ``*_FORM`` annotations document the multipart fields of the uploads the same way
(``WithJsonSchema``: the document only; the registry checks the values, 400). A form part
cannot carry ``null`` (an absent part is the default), so an optional field is documented
as its type alone, not ``anyOf [type, null]``: a client sending the text ``null`` sends a
string, and for ``version`` one that is not an integer (422).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Path
from pydantic import BeforeValidator, WithJsonSchema

from ..banks import check_bank_ref
from ..names import NAME_PATTERN, check_alias, check_name, is_number
from ..registry_models import MAX_VERSION

__all__ = [
    "ALIAS_FORM",
    "ALIAS_PATTERN",
    "METADATA_FORM",
    "NAME_FORM",
    "VERSION_FORM",
    "VERSION_PATTERN",
    "VERSION_REF_FORM",
    "AliasPath",
    "BankNamePath",
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
BankNamePath = Annotated[
    str,
    Path(
        pattern=ALIAS_PATTERN,
        max_length=_NAME_LENGTH,
        description="stat bank name (named like an alias: a name that is not a number)",
    ),
    _checked(check_bank_ref),  # reserved words are refused where banks are created
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


def _form(**schema: Any) -> WithJsonSchema:
    """A multipart field's documented schema (its ``Form`` description is added)."""
    return WithJsonSchema(schema)


NAME_FORM = _form(type="string", pattern=NAME_PATTERN, minLength=1, maxLength=_NAME_LENGTH)
"""A model name."""
ALIAS_FORM = _form(type="string", pattern=ALIAS_PATTERN, maxLength=_NAME_LENGTH)
"""A new alias: a name that is not a number."""
VERSION_FORM = _form(type="integer", minimum=1, maximum=MAX_VERSION)
"""A version number (optional: absent means the next one)."""
VERSION_REF_FORM = _form(type="string", pattern=VERSION_PATTERN)
"""A version number or alias."""
METADATA_FORM = _form(
    type="string", contentMediaType="application/json", contentSchema={"type": "object"}
)
"""JSON text of an object."""
