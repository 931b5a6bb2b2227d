"""``meter run api``: the HTTP API under uvicorn (uvloop, httptools), one process.

The one API is composed here, at the top, since its rooms may not import each other: the
enforcement app (``enforcement.http``: authorizations, balances, bundles, suspend / resume)
with payments' router (``recharge.routes``) included, on ``ServedServices``, both rooms'
services in one (``connect_api``), behind the authorization fast path (``asgi_app``).

Where ``METER_REDIS_URL`` / ``METER_DATABASE_URL`` are empty, an embedded ``redis-server`` and
PostgreSQL are started under ``data_dir/embedded-api`` (their own folder: a metering worker
running embedded services beside it owns ``data_dir/embedded``) and stopped on exit. The API
needs no broker for its signals (they wait in Redis outboxes for the outbox relay); only
``POST /v1/events`` produces, to ``METER_KAFKA_BOOTSTRAP`` (no embedded one is started for it:
without it, that route answers 503 ``broker_unavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from enforcement.http import app as enforcement_app
from enforcement.http import services as enforcement_services
from enforcement.http.fastpath import AuthorizeFastPath
from enforcement.http.fastproto import authorize_protocol
from enforcement.http.services import ApiServices
from infra.settings import Settings
from infra.stack import running_stack
from portal import routes as portal_routes
from portal.web import Host as PortalHost
from recharge import refund_routes
from recharge import routes as payment_routes
from recharge.service import LogNotifier, PaymentService
from recharge.worker import make_gateway

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ServedServices(ApiServices):
    """What the one API runs on: the enforcement routes' services, and what payments' routes
    need besides (``recharge.routes.PaymentsHost``): the ``PaymentService`` and the API's
    own checks of an account, so that they answer as every other route does."""

    #: top-ups, the saved method and auto-recharge settings; None: the payment routes 503
    payments: PaymentService | None = None

    async def known(self, account_id: str) -> str:
        return await enforcement_services.known(self, account_id)

    async def loaded(self, account_id: str) -> None:
        await enforcement_services.account_state(self, account_id)


@contextlib.asynccontextmanager
async def connect_api(settings: Settings) -> AsyncIterator[ServedServices]:
    """Connections and caches for one API process, payments' included; closed on exit."""
    async with enforcement_app.connect_api(settings) as core:
        gateway = make_gateway(settings)
        try:
            payments = PaymentService(
                core.pool,
                core.balances,
                gateway,
                LogNotifier(),
                backoff_s=settings.backoff(),
                max_declines=settings.recharge_max_declines,
                charge_timeout_s=settings.payment_timeout_s,
            )
            shared = {f.name: getattr(core, f.name) for f in dataclasses.fields(core)}
            yield ServedServices(**shared, payments=payments)
        finally:
            await gateway.close()


def create_app(settings: Settings, services: ServedServices | None = None) -> FastAPI:
    """The one API on ``services``; without them it connects (``connect_api``) at startup and
    closes at shutdown. Serve it behind ``AuthorizeFastPath`` (``asgi_app``)."""
    return enforcement_app.create_app(
        settings,
        services,
        connect=connect_api,
        routers=(payment_routes.router, refund_routes.router, portal_routes.router(settings)),
    )


def _payments_host(services: ServedServices) -> payment_routes.PaymentsHost:
    # Never called: mypy checks here that ServedServices is what payments' routes read.
    return services


def _portal_host(services: ServedServices) -> PortalHost:
    # Never called: mypy checks here that ServedServices is what the portal's pages read.
    return services


def asgi_app(settings: Settings, services: ServedServices | None = None) -> AuthorizeFastPath:
    """What ``meter run api`` serves: ``create_app``'s API behind ``AuthorizeFastPath``."""
    return AuthorizeFastPath(create_app(settings, services))


class ApiServer(uvicorn.Server):
    """uvicorn's server without its own signal handling: whoever runs it decides when it stops
    (``should_exit``). uvicorn would re-raise a caught SIGTERM after shutting down, killing the
    process before the embedded services it started could be stopped."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); only once ``started``."""
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port


def server_for(app: ASGIApp, host: str, port: int) -> ApiServer:
    """uvicorn (httptools) serving ``app``; an ``AuthorizeFastPath`` gets the protocol that
    answers its route below ASGI (``enforcement.http.fastproto``)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=authorize_protocol(app) if isinstance(app, AuthorizeFastPath) else "httptools",
        lifespan="on",
        access_log=False,  # one log line per authorization would cost more than the answer
        log_config=None,  # keep the process's own logging setup
        server_header=False,
        # No X-Forwarded-* rewriting: nothing here reads the client's address, and it is one
        # more layer around every request.
        proxy_headers=False,
        timeout_keep_alive=30,  # call-control keeps its connections; do not close them idle
    )
    return ApiServer(config)


@contextlib.asynccontextmanager
async def running_stores(settings: Settings, root: Path | None = None) -> AsyncIterator[Settings]:
    """Yield settings whose Redis and PostgreSQL are set, reachable and migrated."""
    async with running_stack(
        settings, root or settings.data_dir / "embedded-api", kafka_needed=False
    ) as s:
        yield s


async def serve_api(settings: Settings, stop: asyncio.Event) -> int:
    """Serve until ``stop`` is set, then finish the requests in flight. Returns an exit code."""
    async with running_stores(settings) as s:
        server = server_for(asgi_app(s), s.api_host, s.api_port)

        async def stop_when_told() -> None:
            await stop.wait()
            server.should_exit = True

        watcher = asyncio.create_task(stop_when_told())
        try:
            await server.serve()
        finally:
            watcher.cancel()
        return 0 if server.started else 1
