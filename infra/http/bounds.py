"""The bound on a request's PostgreSQL work: past ``DB_TIMEOUT_S``, or when PostgreSQL is away,
a request answers 503 ``database_unavailable`` (nothing applied; retry) rather than hang."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from infra.db import POSTGRES_DOWN
from infra.http import errors

_T = TypeVar("_T")

#: Bound on any PostgreSQL work of one request.
DB_TIMEOUT_S: Final = 2.0
#: PostgreSQL work a request stopped waiting for, finishing its cancellation (see ``within_db``).
_LET_GO: Final[set[asyncio.Future[Any]]] = set()


async def within_db(work: Awaitable[_T]) -> _T:
    """``work`` (PostgreSQL's) within ``DB_TIMEOUT_S``, or 503 ``database_unavailable``."""
    # In a task of its own: a query cancelled by the bound waits for the server to confirm the
    # cancel (asyncpg), which a stalled server never does; the request answers at the bound,
    # and the task finishes its cancellation in the background.
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(DB_TIMEOUT_S):
            return await asyncio.shield(task)
    except (TimeoutError, *POSTGRES_DOWN) as exc:
        raise errors.database_unavailable() from exc
    finally:
        if not task.done():
            task.cancel()
            _LET_GO.add(task)
            task.add_done_callback(_let_go)


def _let_go(task: asyncio.Future[Any]) -> None:
    _LET_GO.discard(task)
    if not task.cancelled():
        task.exception()  # seen: the request that wanted it has answered already
