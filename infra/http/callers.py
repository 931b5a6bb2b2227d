"""Who is calling: the ``Authorization: Bearer <api key>`` check every ``/v1`` route makes, and
the rule of what a key may act on (``may_act``: its role, and its own account but for
``service`` keys); each route says which roles it takes.

Routes take the caller as a ``Caller`` parameter (a FastAPI dependency): the key is looked up in
the ``ApiKeys`` of the app's services, ``request.app.state.services.keys`` (the app serving the
routes sets ``state.services`` to something ``KeyedServices``). Answers: 401 ``unauthorized``
without a valid key, 503 ``key_store_unavailable`` when it cannot be checked.
"""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from infra.http.api_keys import ApiKey, ApiKeys, KeyStoreUnavailable, Role
from infra.http.errors import RETRY_AFTER, ApiError


class KeyedServices(Protocol):
    """What an app serving ``Caller`` routes keeps as ``app.state.services``."""

    @property
    def keys(self) -> ApiKeys: ...


def bearer_token(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def authenticate(
    keys: ApiKeys, token: str | None, *, timeout_s: float | None = None
) -> ApiKey:
    """The caller's key: 401 without a valid one, 503 when it cannot be checked (within
    ``timeout_s`` when given)."""
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "send an API key as `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        key = await keys.authenticate(token, timeout_s=timeout_s)
    except KeyStoreUnavailable as exc:
        raise ApiError(
            503,
            "key_store_unavailable",
            "the API key could not be checked; retry",
            None,
            RETRY_AFTER,
        ) from exc
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "unknown or revoked API key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return key


def may_act(key: ApiKey, account_id: str, roles: tuple[Role, ...]) -> None:
    """403 unless the key's role is one of ``roles`` and, but for ``service``, the account is
    the key's own."""
    if key.role not in roles:
        raise ApiError(403, "forbidden", f"a {key.role} key may not do this")
    if key.role != "service" and key.account_id != account_id:
        raise ApiError(403, "forbidden", "this key may only act on its own account")


#: The security scheme of the OpenAPI document (``HTTPBearer``); the header itself is read by
#: ``bearer_token``, as the authorization fast path does.
bearer = HTTPBearer(auto_error=False, description="An API key: `mk_<key id>_<secret>`")


async def _caller(request: Request, _: Annotated[object, Security(bearer)]) -> ApiKey:
    services: KeyedServices = request.app.state.services
    return await authenticate(services.keys, bearer_token(request.headers.get("authorization")))


# Module level: FastAPI resolves (string) annotations in the namespace of the route's module,
# which imports this name.
Caller = Annotated[ApiKey, Depends(_caller)]
