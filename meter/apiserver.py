"""``meter run api``: the HTTP API under uvicorn (uvloop, httptools), one process.

Where ``METER_REDIS_URL`` / ``METER_DATABASE_URL`` are empty, an embedded ``redis-server`` and
PostgreSQL are started under ``data_dir/embedded-api`` (their own folder: a metering worker
running embedded services beside it owns ``data_dir/embedded``) and stopped on exit. The API
needs no broker: the signals it causes wait in Redis outboxes for the outbox relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from enforcement.http.app import asgi_app
from infra.settings import Settings
from infra.stack import running_stack

log = logging.getLogger(__name__)


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
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
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
