"""Poison records: tell a failure that retrying cures from one it never will, and find the record.

A batch that fails because a service did not answer (Redis, PostgreSQL, the broker) is
rewound and retried whole: nothing after the last commit counts, and every step is idempotent.
A batch that fails for any other reason (a script error, a value the ledger refuses, a bug
that one record's bytes trigger) would fail the same way forever, holding up every partition
of the worker. Such a batch is re-read and processed by halves (``isolate``), in order, down to
the one record that fails on its own; that record is dead-lettered ``unprocessable`` with the
error, and everything around it is charged as usual. Validation is meant to make this
unreachable; this is the last line behind it, and ``meter_dead_letters_total{reason=
"unprocessable"}`` says when it was needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Final

import asyncpg
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balance.errors import OutcomeUnknown, StoreBusy
from metering.batch import BatchOutcome, Record
from metering.processor import MeteringProcessor

log = logging.getLogger(__name__)

#: Redis answers that mean "not now" rather than "never" (a script busy, a failover, memory).
_REDIS_TRANSIENT: Final = (
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "LOADING",
    "OOM",
    "NOREPLICAS",
)

#: PostgreSQL errors that retrying cures: connection (08), resources (53), operator
#: intervention such as a shutdown or a cancelled query (57), serialization / deadlock (40).
_PG_TRANSIENT: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.InterfaceError,  # the connection was closed under the query
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same records may succeed: a service that did not answer, or
    answered "not now". Anything else is taken as a property of the records."""
    if isinstance(exc, OutcomeUnknown | StoreBusy | RedisConnectionError | RedisTimeoutError):
        return True
    if isinstance(exc, ReadOnlyError | OutOfMemoryError | TryAgainError):
        return True  # redis-py's classes for READONLY, OOM, TRYAGAIN: the code is not in msg
    if isinstance(exc, ResponseError):
        msg = str(exc)
        return any(code in msg for code in _REDIS_TRANSIENT)
    if isinstance(exc, _PG_TRANSIENT):
        return True
    if isinstance(exc, KafkaError):
        return bool(
            isinstance(exc, KafkaConnectionError | KafkaTimeoutError)
            or getattr(exc, "retriable", False)
        )
    return isinstance(exc, OSError | TimeoutError)


async def _attempt(
    processor: MeteringProcessor,
    records: Sequence[Record],
    on_outcome: Callable[[BatchOutcome], None],
) -> Exception | None:
    """Process ``records``: None when it went through, the error when it failed for good.
    Raises a transient failure."""
    try:
        on_outcome(await processor.process(records))
        return None
    except Exception as exc:
        if is_transient(exc):
            raise
        return exc


async def isolate(
    processor: MeteringProcessor,
    records: Sequence[Record],
    on_outcome: Callable[[BatchOutcome], None],
    *,
    retry_pause_s: float = 0.2,
) -> int:
    """Process ``records`` in order, by halves wherever a part fails for good, and dead-letter
    each record that fails on its own (after one more try). Returns how many were. Raises the
    first transient failure met: the caller rewinds and retries, as for any batch.

    Processing a part again is safe: every step is idempotent (a debit Redis applied before the
    part failed is found by its event key, and still gets its ledger row)."""
    first = await _attempt(processor, records, on_outcome)
    if first is None:
        return 0
    if len(records) > 1:
        mid = len(records) // 2
        return await isolate(
            processor, records[:mid], on_outcome, retry_pause_s=retry_pause_s
        ) + await isolate(processor, records[mid:], on_outcome, retry_pause_s=retry_pause_s)
    # One record, failed for good once: one more try, so that a failure of the moment that
    # looks permanent does not cost a record that was fine.
    await asyncio.sleep(retry_pause_s)
    again = await _attempt(processor, records, on_outcome)
    if again is None:
        return 0
    rec = records[0]
    log.error(
        "record %s[%d]@%d cannot be processed; dead-lettered as unprocessable",
        rec.topic,
        rec.partition,
        rec.offset,
        exc_info=first,
    )
    on_outcome(await processor.dead_letter_unprocessable(rec, again))
    return 1
