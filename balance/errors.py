"""The balance store's errors, and the one place Redis errors become them.

Errors (httpx-style tree)::

    BalanceStoreError
    ├── OutcomeUnknown   the call may or may not have been applied (timeout, connection lost
    │   │                after send). Never retry blindly: a retried debit is only safe because
    │   │                debits are idempotent on their event key; a credit is idempotent on its
    │   │                credit id. Resolve by re-sending the same ids, never new ones.
    │   └── NotReplicated  Redis applied it, but fewer replicas than asked acknowledged it
    │                    (``WAIT``, ``balance.pipeline``): a failover may still lose it. Re-send
    │                    the same ids once the replicas have caught up, or a replica took over.
    └── NotApplied       Redis answered, and did not run the call: nothing of it changed.
        ├── StoreBusy    Redis said "not now" (BUSY, OOM, READONLY, a failover) or lost the
        │                script again after it was reloaded: retry later, the same ids.
        └── Refused      an error reply: a script refused its arguments, a key held the wrong
                         type. The same call fails the same way every time: a poison value or a
                         bug, not a retry. (Redis does not roll a script back: one failing after
                         a write, a bug, leaves that write; debit.lua decodes all its arguments
                         before writing anything.)

Every method of ``RedisBalances`` raises only these for what Redis did (a reply it could not
decode is a bug, and stays an ordinary exception). In a batch (many scripts in one round trip)
``NotApplied`` is about the script that failed: the others of the round trip may have run; every
batch is idempotent on its ids, so re-send the same batch. Reads raise the same errors; a read
is always safe to repeat.

Why a refused connection is ``OutcomeUnknown`` too (as is every redis-py ``ConnectionError``,
``LOADING`` included): the clients re-send once after a broken connection
(``infra.instrument.redis_retry``), and when the reconnect after a lost reply is refused redis-py
reports the refusal, not that the call had been sent. Only an error reply proves a call did not
run.

Scripts are loaded once (``register_script``). The one retry is on ``NOSCRIPT`` (Redis lost
its scripts between redis-py's check and the call, e.g. a ``SCRIPT FLUSH`` or a failover): the
round trip is sent again once, which reloads them; never after a timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeVar

from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")

#: Error replies by which Redis says "not now" rather than "never".
_BUSY_REPLIES: Final = (
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "LOADING",
    "OOM",
    "NOREPLICAS",
)


class BalanceStoreError(Exception):
    """Base class of balance-store failures."""


class OutcomeUnknown(BalanceStoreError):
    """The request may have been applied. Re-send the same idempotency keys to resolve it."""


class NotReplicated(OutcomeUnknown):
    """Applied on the primary, not yet acknowledged by enough replicas: it may be lost at a
    failover. Re-send the same idempotency keys (a replica that took over without it applies it
    then; otherwise the re-send only waits for the replicas again)."""


class NotApplied(BalanceStoreError):
    """Redis did not run the request (its own answer says so): nothing changed."""


class StoreBusy(NotApplied):
    """Redis refused to run the request now (busy, loading, out of memory, a failover)."""


class Refused(NotApplied):
    """Redis or a script answered with an error: sending the same request fails the same way."""


#: The replies of ``_BUSY_REPLIES`` that redis-py raises as classes of their own, with the code
#: taken out of the message (READONLY: a primary turned replica at a failover; OOM; TRYAGAIN).
_BUSY_CLASSES: Final = (ReadOnlyError, OutOfMemoryError, TryAgainError)


def _reply_code(exc: ResponseError) -> str:
    """The error code of a reply; a pipeline's replies come as ``Command # n (...) caused
    error: CODE ...``."""
    msg = str(exc)
    _, sep, tail = msg.partition("caused error: ")
    return (tail if sep else msg).split(" ", 1)[0]


def map_error(what: str, exc: Exception) -> Exception:
    """The store's error for a Redis error ``exc`` raised while doing ``what``; any other
    exception as it is."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return OutcomeUnknown(f"{what}: outcome unknown: {exc}")
    if isinstance(exc, ClusterDownError | SlotNotCoveredError):
        # A Redis Cluster between layouts (a failover): nothing ran; retry later.
        return StoreBusy(f"{what}: not applied, the cluster is not ready: {exc}")
    if isinstance(exc, RedisClusterException):
        # The cluster client gave up finding the node (its layout changing under it): the
        # command may have been sent before it did.
        return OutcomeUnknown(f"{what}: outcome unknown, cluster layout changing: {exc}")
    if isinstance(exc, _BUSY_CLASSES):
        # redis-py gives these replies classes of their own and strips their code from the
        # message, so the code test below never sees them.
        return StoreBusy(f"{what}: not applied, Redis is not ready ({type(exc).__name__}): {exc}")
    if isinstance(exc, NoScriptError):
        return StoreBusy(f"{what}: Redis lost its scripts again after a reload: {exc}")
    if isinstance(exc, ResponseError):
        if _reply_code(exc) in _BUSY_REPLIES:
            return StoreBusy(f"{what}: not applied, Redis is not ready: {exc}")
        return Refused(f"{what}: refused: {exc}")
    return exc


@contextlib.contextmanager
def mapped(what: str) -> Iterator[None]:
    """Raise the store's error (``map_error``) for a Redis error inside the block; ``what``
    names the call in its message. No retry: see ``call`` for scripts."""
    try:
        yield
    except (
        RedisConnectionError,
        RedisTimeoutError,
        ResponseError,
        ClusterDownError,
        SlotNotCoveredError,
        RedisClusterException,
    ) as exc:
        raise map_error(what, exc) from exc


async def call(what: str, send: Callable[[], Awaitable[T]]) -> T:
    """``await send()`` with its Redis errors mapped, for a round trip that runs scripts.

    ``send`` is the whole round trip, built anew on each call: on ``NOSCRIPT`` it is called
    once more (redis-py loads missing scripts before it sends them), never on anything else.
    """
    with mapped(what):
        try:
            return await send()
        except NoScriptError:
            return await send()
