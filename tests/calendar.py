"""The calendar's edges every date-dependent test runs at, and the clocks they are read from.

``CALENDAR_EDGES``: the last seconds of a month, the first minutes of the next, 29 February,
31 December into 1 January, a date in the past and one in the future of the real clock, and the
real clock itself (tests in balance/, rating/ and metering/ parametrize over it). The servers'
own clocks are never faked (Debian's libfaketime cannot start Debian's redis-server): the code
takes ``now`` from ``infra.clock`` and the Lua scripts take it as an argument and set expiry
relative to it, so Redis behaves the same whatever its own clock says.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Final

import asyncpg
import pytest
import redis.asyncio as aioredis


def _utc(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


#: name -> unix seconds of each calendar edge
EDGES: Final = {
    "month_end": _utc("2027-01-31T23:59:58+00:00"),
    "month_start": _utc("2027-02-01T00:01:00+00:00"),
    "leap_day": _utc("2028-02-29T12:00:00+00:00"),
    "year_end": _utc("2026-12-31T23:59:59+00:00"),
    "year_start": _utc("2027-01-01T00:00:30+00:00"),
    "past": _utc("2025-03-01T00:00:00+00:00"),
    "future": _utc("2030-06-30T23:59:59+00:00"),
}

#: ``pytest.mark.parametrize`` / fixture params: each edge, and ``None`` for the real clock
CALENDAR_EDGES: Final = [
    *(pytest.param(t, id=name) for name, t in EDGES.items()),
    pytest.param(None, id="real_clock"),
]

#: the edges a month's (or a year's) end falls between, for the costlier end-to-end tests
BOUNDARY_EDGES: Final = [
    pytest.param(EDGES[name], id=name)
    for name in ("month_end", "month_start", "year_end", "year_start", "leap_day")
]


def at(param: int | None) -> int:
    """A ``CALENDAR_EDGES`` value as unix seconds (``None``: the real clock, now)."""
    return int(time.time()) if param is None else param


async def ttl(r: aioredis.Redis, name: str) -> int:
    """Redis's TTL of ``name`` in seconds (-1 none, -2 no such key)."""
    return int(await r.ttl(name))


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def ledger_clock(pool: asyncpg.Pool, t: float) -> None:
    """Make the ledger's ``recorded_at`` (``DEFAULT now()``: PostgreSQL's own clock) read the
    injected clock, as a PostgreSQL whose clock agrees with the workers' would write it.

    PostgreSQL's clock cannot be faked; ``recorded_at`` is the one value it decides that the
    rebuild reads (the period a plan's grant was created in). With a clock 2030 in the tests
    and 2026 in PostgreSQL the rebuild would look for the wrong months."""
    iso = _dt(int(t)).isoformat()
    await pool.execute(f"ALTER TABLE ledger ALTER COLUMN recorded_at SET DEFAULT '{iso}'")
