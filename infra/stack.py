"""Bring up what the service needs: configured endpoints as they are, embedded ones otherwise.

Where ``METER_KAFKA_BOOTSTRAP`` / ``METER_REDIS_URL`` / ``METER_DATABASE_URL`` are empty, the
embedded Tansu broker, ``redis-server`` and PostgreSQL are started under ``data_dir`` and stopped
when the context exits. Topics are created if missing and migrations applied in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from contracts.topics import ALL
from infra.db import migrate
from infra.settings import Settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings, root: Path | None = None, *, kafka_needed: bool = True
) -> AsyncIterator[Settings]:
    """Yield settings whose endpoints are all set and reachable (the broker only when
    ``kafka_needed``: the API process has no use for one)."""
    from infra import embedded  # heavy imports only when something is embedded

    # Absolute: redis-server resolves its log file after changing into --dir.
    root = (root or settings.data_dir / "embedded").resolve()
    handles: list[embedded._Stoppable] = []
    kafka, redis_url, dsn = settings.kafka_bootstrap, settings.redis_url, settings.database_url
    try:
        if not kafka and kafka_needed:
            k = await asyncio.to_thread(embedded.start_kafka, root)
            handles.append(k)
            kafka = k.bootstrap
            log.info("started embedded Tansu broker at %s", kafka)
        if not redis_url:
            r = await asyncio.to_thread(embedded.start_redis, root)
            handles.append(r)
            redis_url = r.url
            log.info("started embedded redis-server at %s", redis_url)
        if not dsn:
            p = await asyncio.to_thread(embedded.start_postgres, root)
            handles.append(p)
            dsn = p.url
            log.info("started embedded PostgreSQL at %s", dsn)
        resolved = settings.with_endpoints(kafka, redis_url, dsn)
        await prepare(resolved, topics=kafka_needed)
        yield resolved
    finally:
        for h in reversed(handles):
            await asyncio.to_thread(h.stop)


async def prepare(settings: Settings, *, topics: bool = True) -> None:
    """Create missing topics and apply pending migrations (both idempotent)."""
    from infra.embedded import create_topics

    if topics:
        await create_topics(settings.kafka_bootstrap, {t: settings.partitions for t in ALL})
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
    finally:
        await conn.close()
