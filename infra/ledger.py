"""The append-only ledger in PostgreSQL: idempotent writes keyed by a 16-byte event key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from infra.instrument import postgres_timer

_INSERT: Final = """
INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, rate_ref, event_time,
                    source, event_id, fingerprint, included_s)
SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[],
                     $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::bytea[],
                     $12::int[])
ON CONFLICT (event_key) DO NOTHING
"""


COLUMNS: Final = (
    "event_key",
    "account_id",
    "kind",
    "amount",
    "quantity",
    "ref",
    "rate_ref",
    "event_time",
    "source",
    "event_id",
    "fingerprint",
    "included_s",
)


#: A usage row in ``COLUMNS`` order (the last: seconds drawn from included minutes).
UsageRow = tuple[bytes, str, str, int, int, str, str, datetime, str, str, bytes, int]


def _columns(rows: Sequence[UsageRow]) -> list[list[object]]:
    return [list(col) for col in zip(*rows, strict=True)]


def event_key(source: str, event_id: str) -> bytes:
    """The idempotency key of a CloudEvent: 16 bytes of BLAKE2b over ``(source, id)``."""
    return hashlib.blake2b(source.encode() + b"\x00" + event_id.encode(), digest_size=16).digest()


def credit_key(account_id: str, credit_id: str) -> bytes:
    return hashlib.blake2b(
        b"credit\x00" + account_id.encode() + b"\x00" + credit_id.encode(), digest_size=16
    ).digest()


@dataclass(frozen=True, slots=True)
class LedgerRow:
    event_key: bytes
    account_id: str
    kind: str
    amount: int  # signed micro-units: debits < 0
    quantity: int
    ref: str
    rate_ref: str
    event_time: datetime
    source: str
    event_id: str
    fingerprint: bytes | None

    def values(self) -> tuple[object, ...]:
        """The row in the order of the first eleven ``COLUMNS``."""
        return (
            self.event_key,
            self.account_id,
            self.kind,
            self.amount,
            self.quantity,
            self.ref,
            self.rate_ref,
            self.event_time,
            self.source,
            self.event_id,
            self.fingerprint,
        )


class Ledger:
    """Writes and reads of the book of record. Every write is idempotent on ``event_key``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def write_usage(
        self,
        fresh: Sequence[UsageRow],
        replayed: Sequence[UsageRow] = (),
        signals: Sequence[SignalRow] = (),
    ) -> set[bytes]:
        """Write a batch's usage rows (tuples in ``COLUMNS`` order) in one transaction.

        ``fresh`` are rows of events Redis applied for the first time: normally the ledger
        cannot have them, so they go in by COPY (several times cheaper than an upsert). If it
        does have some (Redis lost its memory), the COPY fails whole on the primary key and
        the rows are upserted instead; the keys the ledger already had are returned, and the
        caller must undo those debits. ``replayed`` rows (Redis saw the event before) are
        upserted: their row may or may not have been written before a crash.
        """
        already: set[bytes] = set()
        async with self._pool.acquire() as conn, conn.transaction():
            if fresh:
                try:
                    async with conn.transaction():  # a savepoint: a failed COPY leaves no trace
                        with postgres_timer("copy"):  # asyncpg tells query loggers nothing of COPY
                            await conn.copy_records_to_table(
                                "ledger", records=fresh, columns=COLUMNS
                            )
                except asyncpg.UniqueViolationError:
                    inserted = await conn.fetch(_INSERT + " RETURNING event_key", *_columns(fresh))
                    already = {r[0] for r in fresh} - {r[0] for r in inserted}
            if replayed:
                await conn.execute(_INSERT, *_columns(replayed))
            if signals:
                await conn.executemany(
                    "INSERT INTO signals (account_id, seq, type, reason) VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT DO NOTHING",
                    [(s.account_id, s.seq, s.type, s.reason) for s in signals],
                )
        return already

    async def existing(self, keys: Iterable[bytes]) -> dict[bytes, bytes | None]:
        """The event keys the ledger already holds, with their fingerprints."""
        ks = list(keys)
        if not ks:
            return {}
        rows = await self._pool.fetch(
            "SELECT event_key, fingerprint FROM ledger WHERE event_key = ANY($1::bytea[])", ks
        )
        return {r[0]: r[1] for r in rows}

    async def balances(self, account_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Sum of ledger amounts per account: what the Redis balance must equal, drained."""
        if account_ids is None:
            rows = await self._pool.fetch(
                "SELECT account_id, sum(amount)::bigint AS total FROM ledger GROUP BY account_id"
            )
        else:
            rows = await self._pool.fetch(
                "SELECT account_id, sum(amount)::bigint AS total FROM ledger"
                " WHERE account_id = ANY($1::text[]) GROUP BY account_id",
                list(account_ids),
            )
        return {r["account_id"]: r["total"] for r in rows}

    async def last_seq(self, account_ids: Sequence[str]) -> dict[str, int]:
        rows = await self._pool.fetch(
            "SELECT account_id, max(seq) AS seq FROM signals WHERE account_id = ANY($1::text[])"
            " GROUP BY account_id",
            list(account_ids),
        )
        return {r["account_id"]: r["seq"] for r in rows}


@dataclass(frozen=True, slots=True)
class SignalRow:
    account_id: str
    seq: int
    type: str
    reason: str
