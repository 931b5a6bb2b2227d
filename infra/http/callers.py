"""Who is calling: the ``Authorization: Bearer <api key>`` check every ``/v1`` route makes, and
the caller as a ``Principal`` that answers what it may do (``infra.http.access``); each route
names the permission it needs.

Routes take the caller as a ``Caller`` parameter (a FastAPI dependency): the key is looked up in
the ``ApiKeys`` of the app's services, ``request.app.state.services.keys`` (the app serving the
routes sets ``state.services`` to something ``KeyedServices``). Answers: 401 ``unauthorized``
without a valid key, 503 ``key_store_unavailable`` when it cannot be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from infra.http.access import Directory, Permission, Relation, allow, allow_anywhere, sees_prices
from infra.http.api_keys import ApiKey, ApiKeys, KeyStoreUnavailable
from infra.http.errors import RETRY_AFTER, ApiError


class KeyedServices(Protocol):
    """What an app serving ``Caller`` routes keeps as ``app.state.services``."""

    @property
    def keys(self) -> ApiKeys: ...

    @property
    def directory(self) -> Directory: ...


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


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a route: its key, and what it may do (``infra.http.access``)."""

    key: ApiKey
    directory: Directory

    async def on(self, account_id: str, permission: Permission) -> Relation:
        """How the caller may act on ``account_id`` for ``permission``; else 403."""
        return await allow(self.key, account_id, permission, self.directory)

    def anywhere(self, permission: Permission) -> Relation:
        """For routes with no account in the path (``access.allow_anywhere``)."""
        return allow_anywhere(self.key, permission)

    @property
    def sees_prices(self) -> bool:
        return sees_prices(self.key)


#: The security scheme of the OpenAPI document (``HTTPBearer``); the header itself is read by
#: ``bearer_token``, as the authorization fast path does.
bearer = HTTPBearer(auto_error=False, description="An API key: `mk_<key id>_<secret>`")


async def _caller(request: Request, _: Annotated[object, Security(bearer)]) -> Principal:
    services: KeyedServices = request.app.state.services
    key = await authenticate(services.keys, bearer_token(request.headers.get("authorization")))
    return Principal(key, services.directory)


# Module level: FastAPI resolves (string) annotations in the namespace of the route's module,
# which imports this name.
Caller = Annotated[Principal, Depends(_caller)]
