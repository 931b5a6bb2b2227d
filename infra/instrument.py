"""Call latency of Redis and PostgreSQL, as each process's clients see it.

- PostgreSQL: ``observe_queries`` is an asyncpg query logger; ``infra.db.create_pool`` adds it
  to every connection, so every pool of the service is measured without further wiring.
  asyncpg (0.32) does not report ``COPY`` to query loggers: time those with
  ``postgres_timer("copy")``.
- Redis: ``InstrumentedRedis`` is a ``redis.asyncio.Redis`` that times each command
  (``EVALSHA`` included) and each pipeline's ``execute()``; ``instrumented_redis(url, ...)``
  takes the arguments of ``Redis.from_url``.
- Anything else: ``redis_timer(name)`` / ``postgres_timer(name)`` around the call.

Every Redis client of the service is built with ``redis_retry()`` (``instrumented_redis`` sets
it; the API's and the recharge worker's plain clients pass it). redis-py 8's defaults differ by
constructor: ``Redis(...)`` re-sends a command up to 10 times with backoff after a *timeout* (a
blind retry of a write whose outcome is unknown, past any deadline its caller set), while
``Redis.from_url(...)`` gives its connections no retry at all, so a connection Redis closed
fails the next command. Neither may decide by accident. Ours re-sends once, at once,
only when the connection broke (a pooled connection Redis closed, a failover); a timeout
surfaces to the caller as it happened, and the balance store reports it as ``OutcomeUnknown``
(``balance.errors``). A re-send after a broken connection is safe for this service: every
script it runs is idempotent on the ids it carries.

The cost is one clock read and one histogram observation per round trip (about a microsecond):
noise next to a network round trip, and the hot path makes a handful per batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Final

from asyncpg.connection import LoggedQuery
from redis.asyncio.client import Pipeline, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from infra import metrics

#: Statement keywords reported as themselves; anything else is ``other`` (bounded label values).
_SQL_OPS: Final = frozenset(
    {"select", "insert", "update", "delete", "with", "copy", "begin", "commit", "rollback",
     "create", "alter", "drop", "set", "reset", "show", "lock", "call"}
)  # fmt: skip


def sql_op(query: str) -> str:
    """``select``, ``insert``, ... : the statement's first keyword, the label of its latency."""
    head = query.lstrip(" \t\r\n(").split(None, 1)
    op = head[0].lower() if head else ""
    return op if op in _SQL_OPS else "other"


def observe_queries(record: LoggedQuery) -> None:
    """asyncpg query logger (``conn.add_query_logger``): one observation per statement."""
    metrics.POSTGRES_SECONDS.labels(sql_op(record.query)).observe(record.elapsed)


@contextlib.contextmanager
def postgres_timer(op: str) -> Iterator[None]:
    """Time a PostgreSQL call the query logger does not see (``COPY``), labelled ``op``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics.POSTGRES_SECONDS.labels(op).observe(time.perf_counter() - t0)


@contextlib.contextmanager
def redis_timer(command: str) -> Iterator[None]:
    """Time a Redis round trip made through a client that is not an ``InstrumentedRedis``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        metrics.REDIS_SECONDS.labels(command).observe(time.perf_counter() - t0)


class InstrumentedPipeline(Pipeline):
    """A pipeline whose ``execute()`` is one observation labelled ``pipeline``."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        t0 = time.perf_counter()
        try:
            return await super().execute(raise_on_error)
        finally:
            metrics.REDIS_SECONDS.labels("pipeline").observe(time.perf_counter() - t0)


class InstrumentedRedis(Redis):
    """``redis.asyncio.Redis`` with each command's round trip in
    ``meter_redis_command_duration_seconds{command}`` (lower-case command name)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        t0 = time.perf_counter()
        try:
            # redis-py leaves execute_command unannotated.
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        finally:
            name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            metrics.REDIS_SECONDS.labels(name.lower()).observe(time.perf_counter() - t0)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return InstrumentedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


def redis_retry() -> Retry:
    """The retry policy of every Redis client: once, at once, on a broken connection only."""
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def instrumented_redis(url: str, **kwargs: Any) -> InstrumentedRedis:
    """``redis.asyncio.Redis.from_url(url, **kwargs)``, measured, with ``redis_retry()`` unless
    ``retry`` is given."""
    kwargs.setdefault("retry", redis_retry())
    client = InstrumentedRedis.from_url(url, **kwargs)
    assert isinstance(client, InstrumentedRedis)  # from_url builds cls(...)
    return client
