"""One round trip of many commands (a redis-py pipeline), errors mapped by ``balance.errors``.

On a Redis Cluster the pipeline is redis-py's cluster pipeline (``infra.redisclient``): it sends
each node its commands in one round trip, all nodes at once, so a batch across slots is still
one round trip's time; each command (each script call) must keep to one slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio.client import Pipeline

from balance.errors import call
from infra.redisclient import RedisClient


async def execute(pipe: Pipeline) -> list[Any]:
    """``pipe.execute()``, always giving the connection back: redis-py checks scripts
    (SCRIPT EXISTS) before its own cleanup, so an error or a cancellation there (a deadline)
    would otherwise leak the connection, and a few hundred leaks empty the pool."""
    try:
        return await pipe.execute()
    finally:
        await pipe.reset()  # type: ignore[no-untyped-call]


async def round_trip(
    client: RedisClient, what: str, build: Callable[[Pipeline], Awaitable[None]]
) -> list[Any]:
    """The replies of the commands ``build`` queues on a fresh pipeline, in one round trip
    (not a transaction). ``build`` runs again if the round trip is sent again (``NOSCRIPT``,
    see ``balance.errors.call``), so it must only queue commands."""

    async def send() -> list[Any]:
        # A cluster's pipeline is typed as a single node's for ``build``: it queues the same
        # commands, and redis-py types ``AsyncScript(client=...)`` to take a Redis (a
        # Pipeline) only, though all it does with it is queue EVALSHA.
        pipe = cast(Pipeline, client.pipeline(transaction=False))
        await build(pipe)
        return await execute(pipe)

    return await call(what, send)
