"""The append-only ledger in PostgreSQL, the book of record: idempotent writes keyed by a
16-byte event key.

``Ledger`` is the one seam every writer of the ``ledger`` table goes through (usage rows and
number fees from the metering processor, bundle purchases, payments' credits, opening
balances, refunds), and ``PostgresLedger`` its one implementation: no other module issues
an INSERT on ``ledger`` (a test greps the packages for one). Invariant 2 (the Redis balance
equals the sum of an account's ledger rows, drained) rests on this table alone.

Every write is idempotent on its event key: writing the same event twice leaves one row, and
a retry after a crash or an unclear outcome is always safe. Writes that must land in the same
transaction as a caller's own row (a bundle purchase, an account, a settled payment) take the
caller's connection and never commit on their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple, Protocol, TypeAlias

import asyncpg

from contracts.payments import PAYMENTS_SOURCE
from infra.instrument import postgres_timer

#: A connection a caller holds, normally inside its own ``conn.transaction()``.
Conn: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

#: The ``source`` of the ledger rows of bundle purchases.
BUNDLE_SOURCE: Final = "urn:meter:bundles"
#: The ``source`` of opening balances.
ACCOUNTS_SOURCE: Final = "urn:meter:accounts"
#: The ``source`` of number renewals the billing worker charges (enforcement/numbers.py).
NUMBERS_SOURCE: Final = "urn:meter:numbers"
#: The ``source`` of provisional charges (a call swept without its hangup) and of their
#: settlement by a late hangup.
PROVISIONAL_SOURCE: Final = "urn:meter:provisional"
#: The ``source`` of refunds: to the card (amount < 0) and as credit (amount > 0).
REFUNDS_SOURCE: Final = "urn:meter:refunds"

_INSERT: Final = """
INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, rate_ref, event_time,
                    source, event_id, fingerprint, included_s, billing_group_id, direction,
                    from_party, to_party)
SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::text[],
                     $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::bytea[],
                     $12::int[], $13::text[], $14::text[], $15::text[], $16::text[])
ON CONFLICT (event_key) DO NOTHING
"""

# One row that is not usage: a bundle, a payment's credit, an opening balance.
_INSERT_ONE: Final = """
INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, rate_ref, event_time,
                    source, event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
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
    "billing_group_id",
    "direction",
    "from_party",
    "to_party",
)


#: A usage row in ``COLUMNS`` order (then: seconds drawn from included minutes, the billing
#: group decided at rating ("" for none), a call's direction ("" for other kinds), and who
#: called whom: from and to of a call or message, a fee's number as to; the fingerprint is
#: None for a row that is not a CloudEvent's, e.g. a provisional charge).
UsageRow = tuple[
    bytes, str, str, int, int, str, str, datetime, str, str, bytes | None, int, str, str, str, str
]


def _columns(rows: Sequence[UsageRow]) -> list[list[object]]:
    return [list(col) for col in zip(*rows, strict=True)]


def event_key(source: str, event_id: str) -> bytes:
    """The idempotency key of a CloudEvent: 16 bytes of BLAKE2b over ``(source, id)``."""
    return hashlib.blake2b(source.encode() + b"\x00" + event_id.encode(), digest_size=16).digest()


def credit_key(account_id: str, credit_id: str) -> bytes:
    """The event key of a row that is not a CloudEvent (``credit_id``: ``opening``,
    ``bundle:<purchase id>``, ``payment:<payment id>``), unique per account."""
    return hashlib.blake2b(
        b"credit\x00" + account_id.encode() + b"\x00" + credit_id.encode(), digest_size=16
    ).digest()


def _provisional_key(account_id: str, call_id: str, *, settle: bool) -> bytes:
    step = "settle:" if settle else "charge:"
    return credit_key(account_id, "provisional:" + step + call_id)


def provisional_row(
    account_id: str, call_id: str, *, charged: int, held_s: int, at: datetime, settle: bool
) -> UsageRow:
    """A usage row of kind ``provisional`` for a call: the sweep's charge of ``charged``
    micro-units (amount ``-charged``, quantity the bucket seconds it held), or with ``settle``
    its give-back by the late hangup (amount ``+charged``; the hangup's own ``call`` row has
    the rated amount). Keyed by ``(account_id, call_id)`` and which of the two it is, so each
    is written once, whoever writes it first (the sweep, its retry, or the hangup's batch)."""
    step = "settle:" if settle else "charge:"
    return (
        _provisional_key(account_id, call_id, settle=settle),
        account_id,
        "provisional",
        charged if settle else -charged,
        0 if settle else held_s,
        call_id,
        "",
        at,
        PROVISIONAL_SOURCE,
        step + call_id,
        None,  # not a CloudEvent: no fingerprint
        0,
        "",  # the charge and its give-back net to 0: the call's own row carries its group
        "",
        "",
        "",
    )


class Unsettled(NamedTuple):
    """A provisional charge the ledger has and no settlement of: the sweep charged
    ``charged`` micro-units for ``call_id`` at ``charged_at`` (unix s) and no hangup has given
    it back yet. Redis gets its marker back from this when it has lost it
    (``balance.reservations.ReservationStore.restore_provisional``)."""

    account_id: str
    call_id: str
    charged: int
    charged_at: int


@dataclass(frozen=True, slots=True)
class SignalRow:
    account_id: str
    seq: int
    type: str
    reason: str


class Ledger(Protocol):
    """The book of record. Every write is idempotent on its event key; every amount is signed
    micro-units (credits > 0, debits < 0)."""

    async def write_usage(
        self,
        fresh: Sequence[UsageRow],
        replayed: Sequence[UsageRow] = (),
        signals: Sequence[SignalRow] = (),
    ) -> set[bytes]:
        """Write a batch's usage rows (calls, messages, number fees: tuples in ``COLUMNS``
        order) and the control signals it raised, in one transaction.

        ``fresh`` are rows of events Redis applied for the first time: normally the ledger
        cannot have them. The keys of those it already had (Redis lost its memory) are
        returned, and the caller must undo those debits. ``replayed`` rows (Redis saw the
        event before) are written if missing: their row may or may not have been written
        before a crash.
        """
        ...

    async def record_openings(self, conn: Conn, openings: Mapping[str, int], at: datetime) -> int:
        """The opening balance (micro-units, by account id) of new accounts, in the caller's
        transaction (with the account rows). Idempotent per account: an account has one
        opening row. Returns the number of rows written."""
        ...

    async def record_bundle(
        self,
        conn: Conn,
        *,
        account_id: str,
        purchase_id: str,
        bundle_id: str,
        price: int,
        seconds: int,
        valid_from: datetime,
    ) -> bool:
        """A bundle purchase's debit of ``price`` (>= 0, recorded as ``-price``) for
        ``seconds`` of minutes, in the caller's transaction (with the purchase row).
        Idempotent per ``(account_id, purchase_id)``; False: the row was there already."""
        ...

    async def record_payment(
        self,
        conn: Conn,
        *,
        account_id: str,
        payment_id: str,
        captured: int,
        gateway_ref: str,
        at: datetime,
    ) -> bool:
        """A settled payment's credit of what the gateway ``captured`` (never the amount
        asked), in the caller's transaction (with the payment's settlement). ``gateway_ref``:
        ``<gateway>:<its charge id>``. Idempotent per ``(account_id, payment_id)``; False: the
        row was there already."""
        ...

    async def record_refund(
        self,
        conn: Conn,
        *,
        account_id: str,
        refund_id: str,
        amount: int,
        ref: str,
        refund_ref: str,
        at: datetime,
    ) -> bool:
        """A refund, kind ``refund``, in the caller's transaction (with the refund's own row):
        ``amount`` signed, ``-refunded`` for money given back to the card (``ref``: the
        payment's id) or ``+credited`` for a refund as credit (``ref``: the refund's id);
        ``refund_ref``: ``card:<gateway>:<its refund id>`` or ``credit``. The row's
        ``event_id`` is the refund's id, so an invoice finds the refund by
        ``(account_id, event_id)``. Idempotent per ``(account_id, refund_id)``; False: the row
        was there already."""
        ...

    async def record_fee(self, conn: Conn, row: UsageRow) -> bool:
        """One usage row that is no event's (a number's renewal by the billing worker: kind
        ``fee``), in the caller's transaction. Idempotent on its event key; False: the row was
        there already."""
        ...

    async def existing(self, keys: Iterable[bytes]) -> dict[bytes, bytes | None]:
        """The event keys the ledger already holds, with their fingerprints."""
        ...

    async def unsettled(self, calls: Sequence[tuple[str, str]]) -> list[Unsettled]:
        """The provisional charges of these ``(account_id, call_id)`` that have no settlement
        row (by event key: two primary-key lookups per call)."""
        ...

    async def unsettled_since(self, account_ids: Sequence[str], since: datetime) -> list[Unsettled]:
        """The provisional charges of these accounts made at or after ``since`` that have no
        settlement row (a rebuild puts their markers back)."""
        ...

    async def balances(self, account_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Sum of ledger amounts per account (all accounts if ``None``; an account without
        rows is absent): what the Redis balance must equal, drained."""
        ...

    async def last_seq(self, account_ids: Sequence[str]) -> dict[str, int]:
        """The last control-signal ``seq`` recorded per account (absent: none yet)."""
        ...


class PostgresLedger:
    """The ``Ledger`` on PostgreSQL: the one implementation every caller uses."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def write_usage(
        self,
        fresh: Sequence[UsageRow],
        replayed: Sequence[UsageRow] = (),
        signals: Sequence[SignalRow] = (),
    ) -> set[bytes]:
        """See ``Ledger.write_usage``. ``fresh`` rows go in by COPY (several times cheaper than
        an upsert); if the ledger has some of them, the COPY fails whole on the primary key and
        the rows are upserted instead. ``replayed`` rows are upserted."""
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

    async def record_openings(self, conn: Conn, openings: Mapping[str, int], at: datetime) -> int:
        if not openings:
            return 0
        written = await conn.fetch(
            _INSERT + " RETURNING event_key",
            [credit_key(a, "opening") for a in openings],
            list(openings),
            ["opening"] * len(openings),
            list(openings.values()),
            [0] * len(openings),
            ["opening"] * len(openings),
            [""] * len(openings),
            [at] * len(openings),
            [ACCOUNTS_SOURCE] * len(openings),
            ["opening"] * len(openings),
            [None] * len(openings),
            [0] * len(openings),
            [""] * len(openings),
            [""] * len(openings),
            [""] * len(openings),
            [""] * len(openings),
        )
        return len(written)

    async def record_bundle(
        self,
        conn: Conn,
        *,
        account_id: str,
        purchase_id: str,
        bundle_id: str,
        price: int,
        seconds: int,
        valid_from: datetime,
    ) -> bool:
        return await _insert_one(
            conn,
            credit_key(account_id, "bundle:" + purchase_id),
            account_id,
            "bundle",
            -price,
            seconds,
            purchase_id,
            bundle_id,
            valid_from,
            BUNDLE_SOURCE,
            purchase_id,
        )

    async def record_payment(
        self,
        conn: Conn,
        *,
        account_id: str,
        payment_id: str,
        captured: int,
        gateway_ref: str,
        at: datetime,
    ) -> bool:
        return await _insert_one(
            conn,
            credit_key(account_id, "payment:" + payment_id),
            account_id,
            "credit",
            captured,
            0,
            payment_id,
            gateway_ref,
            at,
            PAYMENTS_SOURCE,
            payment_id,
        )

    async def record_refund(
        self,
        conn: Conn,
        *,
        account_id: str,
        refund_id: str,
        amount: int,
        ref: str,
        refund_ref: str,
        at: datetime,
    ) -> bool:
        if amount == 0:
            raise ValueError(f"refund {refund_id!r} of {account_id!r} moves no money")
        return await _insert_one(
            conn,
            credit_key(account_id, "refund:" + refund_id),
            account_id,
            "refund",
            amount,
            0,
            ref,
            refund_ref,
            at,
            REFUNDS_SOURCE,
            refund_id,
        )

    async def record_fee(self, conn: Conn, row: UsageRow) -> bool:
        written = await conn.fetch(_INSERT + " RETURNING 1", *_columns([row]))
        return bool(written)

    async def existing(self, keys: Iterable[bytes]) -> dict[bytes, bytes | None]:
        ks = list(keys)
        if not ks:
            return {}
        rows = await self._pool.fetch(
            "SELECT event_key, fingerprint FROM ledger WHERE event_key = ANY($1::bytea[])", ks
        )
        return {r[0]: r[1] for r in rows}

    async def unsettled(self, calls: Sequence[tuple[str, str]]) -> list[Unsettled]:
        pairs = list(dict.fromkeys(calls))
        if not pairs:
            return []
        charge = [_provisional_key(a, c, settle=False) for a, c in pairs]
        settle = [_provisional_key(a, c, settle=True) for a, c in pairs]
        rows = await self._pool.fetch(
            "SELECT event_key, amount, event_time FROM ledger WHERE event_key = ANY($1::bytea[])",
            charge + settle,
        )
        found = {r["event_key"]: r for r in rows}
        return [
            Unsettled(a, c, -found[k]["amount"], int(found[k]["event_time"].timestamp()))
            for (a, c), k, s in zip(pairs, charge, settle, strict=True)
            if k in found and s not in found
        ]

    async def unsettled_since(self, account_ids: Sequence[str], since: datetime) -> list[Unsettled]:
        if not account_ids:
            return []
        rows = await self._pool.fetch(
            "SELECT account_id, ref, amount, event_time FROM ledger WHERE account_id = ANY($1)"
            " AND event_time >= $2 AND kind = 'provisional' AND source = $3 AND amount < 0",
            list(account_ids),
            since,
            PROVISIONAL_SOURCE,
        )
        if not rows:
            return []
        return await self.unsettled([(r["account_id"], r["ref"]) for r in rows])

    async def balances(self, account_ids: Sequence[str] | None = None) -> dict[str, int]:
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


async def _insert_one(conn: Conn, *values: object) -> bool:
    return await conn.fetchval(_INSERT_ONE + " RETURNING true", *values) is not None
