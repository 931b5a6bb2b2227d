"""The one harness the tests share above conftest's services: the hot path as the worker builds
it, and the real metering worker running in this process.

``conftest.py`` brings up the services (the session's own redis-server and PostgreSQL, a fresh
Tansu broker per test) and the connections; this module runs the service's code on them, so
that a test states only what differs from the worker (a clock, a ledger that fails, no
rebuild)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from balance.accounts import load_into_redis
from infra.clock import Clock, system_clock
from infra.ledger import Ledger, PostgresLedger
from infra.settings import Settings
from metering.processor import BatchOutcome, MeteringProcessor
from metering.publish import SignalPublisher
from metering.worker import Connections, run_metering
from rating.catalog import Catalog


def processor(
    conns: Connections,
    catalog: Catalog,
    *,
    clock: Clock = system_clock,
    ledger: Ledger | None = None,
    publisher: SignalPublisher | None = None,
    rebuild: bool = False,
) -> MeteringProcessor:
    """The processor on ``conns``. ``rebuild``: accounts Redis lost are rebuilt from the ledger
    as the worker does (``metering.worker.build_processor``); otherwise they are unknown."""

    async def from_ledger(ids: Sequence[str]) -> list[str]:
        if not rebuild:
            return []
        return await load_into_redis(conns.pool, conns.balances, ids, clock=clock)

    return MeteringProcessor(
        balances=conns.balances,
        ledger=ledger or PostgresLedger(conns.pool),
        catalog=catalog,
        publisher=publisher or conns.publisher,
        rebuild=from_ledger,
        clock=clock,
    )


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, conns: Connections
) -> AsyncIterator[list[BatchOutcome]]:
    """The real metering worker (``meter run metering``) in this process, on ``conns``; yields
    the outcomes of its batches as they come, stops it on exit (within 30 s, or the test
    fails)."""
    outcomes: list[BatchOutcome] = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_metering(settings, stop, on_batch=outcomes.append, conns=conns))
    try:
        yield outcomes
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
