"""One piece of work per key at a time, shared by every caller that asks for it meanwhile.

The API key lookup, the catalog's account lookup and the authorizer's rebuild of an account
Redis lost all need the same thing: however many requests ask at once, one query (one
connection) runs, in a task of its own, so that a caller that stops waiting (its deadline, a
client gone) cancels it for nobody else. Callers ``await asyncio.shield(flights.task(...))``
inside their own ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """``task(key, start)``: the task running for ``key``, or a new one from ``start()``.

    When a task ends it is forgotten (the next ``task`` starts anew) and ``on_done(key, task)``
    is called; without ``on_done`` a failure is logged as ``what`` failed. Either way the
    task's exception is retrieved, so a failure no caller waited for is not reported twice.
    """

    def __init__(
        self,
        what: str,
        on_done: Callable[[K, asyncio.Task[V]], None] | None = None,
    ) -> None:
        self._what = what
        self._on_done = on_done
        self._running: dict[K, asyncio.Task[V]] = {}

    def task(self, key: K, start: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(start())
            self._running[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return task

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        del self._running[key]
        if self._on_done is not None:
            self._on_done(key, task)
        elif not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("%s failed for %r: %r", self._what, key, exc)
