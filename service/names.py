"""Validation of the names clients choose: model names, aliases, dataset and job ids.

Every such name matches :data:`NAME_PATTERN` (a letter or digit, then up to 63 letters,
digits, ``_``, ``.`` or ``-``): no ``/``, no leading ``.``, so no path traversal. Names are
still never used as paths: artifacts live under server-generated ids (see
:mod:`service.registry`).
"""

from __future__ import annotations

import re

from .errors import InvalidInput

__all__ = ["NAME_PATTERN", "check_name"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""What a model name, alias, dataset id or job id looks like."""

_NAME = re.compile(NAME_PATTERN)


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid ``what`` (e.g. ``"model name"``), else raise.

    Raises:
        InvalidInput: ``value`` does not match :data:`NAME_PATTERN`.
    """
    if not _NAME.fullmatch(value):
        raise InvalidInput(
            f"expected a {what} of 1-64 letters, digits, '_', '.' or '-' starting with a "
            f"letter or digit (got {value[:80]!r})"
        )
    return value
