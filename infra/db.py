"""PostgreSQL connections and versioned migrations (``infra/migrations/NNNN_name.sql``)."""

from __future__ import annotations

import importlib.resources
import re
from typing import Final

import asyncpg
import asyncpg.pool

from infra.instrument import observe_queries

_MIGRATION_RE: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any fixed number: serialises concurrent migrators (several processors starting together).
_MIGRATION_LOCK: Final = 0x6D65746572
#: What PostgreSQL being away looks like (not a bug in a query: those stay errors of their own).
POSTGRES_DOWN: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # includes a statement cancelled by a timeout
)


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every migration shipped in the package, in order."""
    out = []
    for entry in importlib.resources.files("infra").joinpath("migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry.name, entry.read_text("utf-8")))
    out.sort()
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return out


async def migrate(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction. Returns their names."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def _instrument(conn: asyncpg.Connection) -> None:
    # Every statement's latency into meter_postgres_query_duration_seconds (infra.instrument).
    conn.add_query_logger(observe_queries)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """A pool whose connections report each statement's latency to Prometheus."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=60, init=_instrument
    )
    assert pool is not None
    return pool
