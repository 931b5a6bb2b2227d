"""One round trip of many commands (a redis-py pipeline), errors mapped by ``balance.errors``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from balance.errors import call


async def execute(pipe: Pipeline) -> list[Any]:
    """``pipe.execute()``, always giving the connection back: redis-py checks scripts
    (SCRIPT EXISTS) before its own cleanup, so an error or a cancellation there (a deadline)
    would otherwise leak the connection, and a few hundred leaks empty the pool."""
    try:
        return await pipe.execute()
    finally:
        await pipe.reset()  # type: ignore[no-untyped-call]


async def round_trip(
    client: aioredis.Redis, what: str, build: Callable[[Pipeline], Awaitable[None]]
) -> list[Any]:
    """The replies of the commands ``build`` queues on a fresh pipeline, in one round trip
    (not a transaction). ``build`` runs again if the round trip is sent again (``NOSCRIPT``,
    see ``balance.errors.call``), so it must only queue commands."""

    async def send() -> list[Any]:
        pipe = client.pipeline(transaction=False)
        await build(pipe)
        return await execute(pipe)

    return await call(what, send)
