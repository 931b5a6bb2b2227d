"""What the enforcement routes run on (``ApiServices``, given to routes as ``Services``), the
Redis bound, and the two checks of an account before it is acted on (``known``,
``account_state``), which payments' routes are given as well (``meter.apiserver``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, TypeVar

import asyncpg
from fastapi import Depends, Request

from balance.protocol import BalanceStore
from balance.values import AccountState
from enforcement.account_admin import account_currency
from enforcement.authorize import (
    REDIS_DOWN,
    Authorizer,
    BalanceStoreUnavailable,
    DatabaseUnavailable,
)
from enforcement.ingest import NO_BROKER, EventSink
from infra.clock import Clock, system_clock
from infra.http import errors
from infra.http.access import Directory
from infra.http.api_keys import ApiKeys
from infra.http.bounds import DB_TIMEOUT_S, within_db
from infra.http.errors import ApiError
from rating.catalog import Catalog

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ApiServices:
    """What the API runs on; ``enforcement.http.app.connect_api`` makes them from settings."""

    pool: asyncpg.Pool
    balances: BalanceStore
    catalog: Catalog
    authorizer: Authorizer
    keys: ApiKeys
    directory: Directory
    #: where ``POST /v1/events`` produces (``KafkaEvents`` when a broker is configured)
    events: EventSink = NO_BROKER
    #: the one clock of what the routes decide by time (tests set it)
    clock: Clock = system_clock
    #: the service provider on its invoices (``Settings.invoice_issuer_name``, ``_logo_path``)
    issuer_name: str = "Meter"
    issuer_logo: str = ""


async def services_of(request: Request) -> ApiServices:
    """The services of the app serving the request (``create_app`` keeps them in its state).
    Async: FastAPI would run a plain function in a worker thread."""
    svc: ApiServices = request.app.state.services
    return svc


# Module level: FastAPI resolves the routes' (string) annotations in their module's namespace.
Services = Annotated[ApiServices, Depends(services_of)]


async def within_redis(work: Awaitable[_T], deadline_s: float) -> _T:
    """``work`` (Redis's) within ``deadline_s``, or 503 ``balance_store_unavailable``."""
    try:
        async with asyncio.timeout(deadline_s):
            return await work
    except (TimeoutError, *REDIS_DOWN) as exc:
        raise errors.balance_store_unavailable(
            f"the balance store did not answer within {deadline_s} s; retry"
        ) from exc


async def known(svc: ApiServices, account_id: str) -> str:
    """The account's currency; 404 ``account_not_found`` when there is no such account."""
    currency = await within_db(account_currency(svc.pool, account_id))
    if currency is None:
        raise ApiError(404, "account_not_found", f"no account {account_id!r}", "account_id")
    return currency


async def account_state(svc: ApiServices, account_id: str) -> AccountState:
    """The account's Redis state, rebuilt from PostgreSQL first if Redis lost it. Redis is
    bounded by the authorization deadline, the rebuild by ``DB_TIMEOUT_S``."""
    deadline = svc.authorizer.deadline_s
    loop = asyncio.get_running_loop()
    looked = loop.time()
    st = await within_redis(svc.balances.get(account_id), deadline)
    if st is None:
        # The authorizer's rebuild: one per account at a time, shared with the
        # authorizations that met the same loss.
        try:
            await svc.authorizer.restore(
                account_id, since=looked, deadline=loop.time() + DB_TIMEOUT_S
            )
        except DatabaseUnavailable as exc:
            raise errors.database_unavailable() from exc
        except BalanceStoreUnavailable as exc:
            raise errors.balance_store_unavailable(f"{exc}; retry") from exc
        st = await within_redis(svc.balances.get(account_id), deadline)
        if st is None:
            raise errors.balance_store_unavailable("account state missing; retry")
    return st
