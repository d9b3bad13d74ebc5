"""Validation of the names clients choose: model names, aliases, dataset and job ids.

Every such name matches :data:`NAME_PATTERN` (a letter or digit, then up to 63 letters,
digits, ``_``, ``.`` or ``-``): no ``/``, no leading ``.``, so no path traversal. Names are
still never used as paths: artifacts live under server-generated ids (see
:mod:`service.registry`).
"""

from __future__ import annotations

import re

from .errors import InvalidInput

__all__ = ["NAME_PATTERN", "check_alias", "check_name", "is_number"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""What a model name, alias, dataset id or job id looks like."""

_NAME = re.compile(NAME_PATTERN)
_NUMBER = re.compile(r"[0-9]+")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid ``what`` (e.g. ``"model name"``), else raise.

    Raises:
        InvalidInput: ``value`` does not match :data:`NAME_PATTERN`.
    """
    if not _NAME.fullmatch(value):
        article = "an" if what[:1] in "aeiou" else "a"
        raise InvalidInput(
            f"expected {article} {what} of 1-64 letters, digits, '_', '.' or '-' starting with a "
            f"letter or digit (got {value[:80]!r})"
        )
    return value


def is_number(value: str) -> bool:
    """Whether ``value`` is ASCII digits only: a version number rather than an alias.

    (Not ``str.isdigit``: it also takes ``"²"`` and other digits ``int()`` refuses.)
    """
    return _NUMBER.fullmatch(value) is not None


def check_alias(value: str) -> str:
    """Return ``value`` if it can name a new alias, else raise.

    An alias is a name (:func:`check_name`) that is not a number: wherever a version is
    referred to (``/versions/{version}``, ``base_version``) a number means that version, so
    an alias ``"2"`` could never be reached.

    Raises:
        InvalidInput: malformed, or made of digits only.
    """
    check_name(value, "alias")
    if is_number(value):
        raise InvalidInput(
            f"expected an alias that is not a number (got {value!r}: numbers name versions)"
        )
    return value
