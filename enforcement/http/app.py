"""The HTTP API (FastAPI, OpenAPI at ``/openapi.json``): call authorization, balances, bundles
and suspend / resume; ``create_app`` builds it, ``connect_api`` what it runs on.
Payments' routes are ``recharge.routes``'; ``meter.apiserver`` serves both as one API.

Modules: ``authorizations`` (the route and the answer), ``fastpath`` (the same, in plain ASGI),
``accounts`` (balance, suspend, resume), ``tenants`` (accounts as operators and managers see
them), ``bundles``, ``groups`` (billing groups, outbound profiles, the month's ledger records),
``numbers`` (the numbers inventory, auto-pay, release), ``invoices`` (invoices, their PDF, Pay
Now, cancellation), ``subscriptions`` (plans on sale, the
account's subscription and its period), ``people`` (users, access groups, keys,
``/v1/me``; bodies in ``people_models``), ``events``
(``POST /v1/events``, on a Kafka producer of the process's own when a broker is configured),
``services`` (what routes run on and the account checks they share), ``models`` (the bodies).

Every ``/v1`` endpoint needs ``Authorization: Bearer <api key>`` (``infra.http.callers``), and
what each caller may do on which account is one table, ``infra.http.access.RULES``
(docs/design/access.md): operators on every account, service keys (call-control) for
authorizations and balance reads of every account, an account's admins and users on their own
(billing is admin only, or a user's Edit Billing privilege), a manager's admin on the accounts
it manages. Suspend and resume record and lift by origin (``tenant``, ``manager``,
``operator``): each caller lifts only what it may, 403 ``lift_not_permitted`` otherwise
(``enforcement.account_admin``, docs/design/status-origins.md).

Failure policy: every answer comes within a bounded time, never a hang. An authorization, the
API key check included, answers within ``authorize_deadline_s`` (0.5 s by default). Past it,
or when a store refuses connections, the answer is a 503 with ``Retry-After: 1`` naming the
store that was waited for: ``balance_store_unavailable`` for Redis, ``database_unavailable`` for
PostgreSQL (an account the process has not cached, or one Redis lost and that must be rebuilt
from the ledger), ``key_store_unavailable`` for a key not cached. The call was then neither
allowed nor denied: call-control retries with the *same* ``call_id`` (reservations are
idempotent per call, so a retry never reserves twice) and applies its own fail-open or
fail-closed rule when retries run out. An account and a key already cached are answered while
PostgreSQL is away. Other PostgreSQL work is bounded by ``infra.http.bounds.DB_TIMEOUT_S`` (503
``database_unavailable``). Errors have one shape, see ``infra.http.errors``.

Speed (``meter bench authorize``): ``POST /v1/authorizations`` is answered by a plain ASGI
handler in front of FastAPI (``enforcement.http.fastpath.AuthorizeFastPath``) with the same
functions as the FastAPI route that documents it, since the framework's layers cost more than
the authorization itself; under ``meter run api`` it is answered below ASGI, in uvicorn's
protocol (``enforcement.http.fastproto``); and concurrent reservations share Redis round trips
(``balance.coalesce``) on a connection of their own (``balance.wire``).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, FastAPI

from balance.accounts import load_into_redis
from balance.coalesce import CoalescingBalances
from enforcement.authorize import Authorizer
from enforcement.http import (
    accounts,
    authorizations,
    bundles,
    events,
    groups,
    invoices,
    numbers,
    people,
    subscriptions,
    tenants,
)
from enforcement.http.services import ApiServices
from enforcement.ingest import BrokerUnavailable, KafkaEvents, NoBroker
from infra.db import create_pool
from infra.http import errors
from infra.http.access import Directory
from infra.http.api_keys import ApiKeys
from infra.http.bounds import DB_TIMEOUT_S
from infra.redisclient import RedisClient, redis_client, warm_up
from infra.settings import Settings
from rating.catalog import Catalog

#: How an app without services given makes them at startup (``connect_api``, or one whose
#: services extend ``ApiServices`` for routers of other rooms).
Connect = Callable[[Settings], AbstractAsyncContextManager[ApiServices]]


def api_redis_client(settings: Settings) -> RedisClient:
    """Redis for the API.

    No socket read timeout: every call is already bounded by ``authorize_deadline_s``, and
    redis-py would wrap each send in a task of its own to time it. No bound on the pool either:
    reservations reach Redis through ``CoalescingBalances`` (one round trip at a time), and a
    bounded pool would turn each connection redis-py fails to give back (a pipeline cancelled
    or failing while it checks its scripts) into one slot lost for good, then into an outage.
    """
    return redis_client(  # one node or a cluster, by the URL (infra.redisclient)
        settings.redis_url,
        socket_timeout=None,
        socket_connect_timeout=settings.redis_timeout_s,
        measured=False,
    )


@contextlib.asynccontextmanager
async def connect_api(settings: Settings) -> AsyncIterator[ApiServices]:
    """Connections and caches for one API process; closed on exit."""
    pool = await create_pool(settings.database_url, max_size=4)
    r = api_redis_client(settings)
    # ``POST /v1/events`` produces here; without a broker configured it answers 503.
    sink: KafkaEvents | NoBroker = NoBroker()
    if settings.kafka_bootstrap:
        sink = KafkaEvents(settings.kafka_bootstrap)
    balances: CoalescingBalances | None = None
    try:
        await warm_up(r)  # a cluster's layout before the first burst of authorizations
        if isinstance(sink, KafkaEvents):
            # Unreachable: the API serves the rest meanwhile; ingest retries on a request.
            with contextlib.suppress(BrokerUnavailable):
                await sink.connect()
        balances = CoalescingBalances(
            r,
            max_accounts_per_call=settings.redis_accounts_per_call,
            timeout_s=settings.authorize_deadline_s,
            wait_replicas=settings.redis_wait_replicas,  # for credits: top-ups, refunds
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        catalog = Catalog(pool, lookup_timeout_s=DB_TIMEOUT_S)
        await catalog.refresh()
        # The same reservation rules as the metering worker's live-call extensions.
        cc = settings.call_control()
        authorizer = Authorizer(
            balances,
            catalog,
            grant_s=cc.grant_s,
            grace_s=cc.grace_s,
            max_s=cc.max_s,
            deadline_s=settings.authorize_deadline_s,
            db_timeout_s=DB_TIMEOUT_S,
            rebuild=lambda ids: load_into_redis(pool, balances, ids),
        )
        keys = ApiKeys(pool, ttl_s=settings.api_key_cache_s)
        directory = Directory(pool, timeout_s=DB_TIMEOUT_S)
        yield ApiServices(
            pool,
            balances,
            catalog,
            authorizer,
            keys,
            directory,
            sink,
            issuer_name=settings.invoice_issuer_name,
            issuer_logo=settings.invoice_logo_path,
        )
    finally:
        await sink.close()
        if balances is not None:
            await balances.aclose()
        await r.aclose()
        await pool.close()


def create_app(
    settings: Settings,
    services: ApiServices | None = None,
    *,
    connect: Connect = connect_api,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The API on ``services``; without them it connects with ``connect(settings)`` at startup
    and closes at shutdown (the lifespan). ``routers`` (other rooms' routes, e.g. payments')
    are served after the API's own, with ``services`` as their ``app.state.services``. Serve it
    behind ``AuthorizeFastPath``."""

    @contextlib.asynccontextmanager
    async def lifespan(started: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            yield
            return
        async with connect(settings) as made:
            started.state.services = made
            # A process of its own (``meter run api``): as in the metering worker, what startup
            # built is frozen out of the collector's sight and young collections are rarer.
            # Each request's garbage dies by reference count; walking the whole heap every few
            # hundred requests showed up as tail latency.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
            yield

    app = FastAPI(
        title="meter",
        summary="Real-time metering and prepaid balance enforcement",
        version="1",
        lifespan=lifespan,
    )
    errors.install(app)
    app.state.services = services  # set by the lifespan when None
    own = (authorizations.router, accounts.router, tenants.router, bundles.router, events.router)
    for router in (
        *own,
        groups.router,
        numbers.router,
        subscriptions.router,
        invoices.router,
        people.router,
        *routers,
    ):
        app.include_router(router)
    return app
