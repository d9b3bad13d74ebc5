"""Bearer-token authentication (``RECALIB_API_TOKEN``), compared in constant time.

With no token configured every call is allowed (the settings refuse that on a non-loopback
host unless ``allow_open`` is set). With one, the ``Authorization: Bearer <token>`` header
must carry exactly it; the comparison is :func:`hmac.compare_digest` over the UTF-8 bytes,
so its time does not depend on how many leading characters match.

:func:`bearer_token` reads the credentials out of an ``Authorization`` header value (as
FastAPI's ``HTTPBearer`` does), for the ASGI gate and the routes that check the token
without that dependency.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from .errors import Unauthorized

__all__ = ["bearer_token", "check_bearer"]


def check_bearer(expected: SecretStr | None, presented: str | None) -> None:
    """Allow the call if no token is configured or ``presented`` equals it.

    Args:
        expected: the configured token, or ``None`` (authentication off).
        presented: the credentials of the request's ``Bearer`` header, or ``None``.

    Raises:
        Unauthorized: a token is configured and ``presented`` is missing or different.
    """
    if expected is None:
        return
    if presented is None:
        raise Unauthorized("expected an 'Authorization: Bearer <token>' header (got none)")
    if not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("expected a valid bearer token (got a wrong one)")


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header value.

    Args:
        authorization: the header's value, ``None`` when absent.

    Returns:
        The token, or ``None`` when the header is absent, empty, of another scheme
        (the scheme is case-insensitive) or without credentials.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials
