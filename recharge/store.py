"""The payments' tables in PostgreSQL: the one writer of ``payments``, ``payment_methods``,
``auto_recharge`` and ``recharge_triggers`` (a test greps the packages for any other writer),
and of an account's payment hold, ``accounts.hold_reason``, which besides a payment only an
operator's resume lifts (``enforcement.account_admin``).

The store keeps no rules: what to write, and in which order, is ``recharge.service``'s (its
numbered order of writes); the store makes each write one statement, guarded so that a late
or repeated one changes nothing (a payment leaves ``pending`` once; a trigger is counted once
per attempt). Methods that take ``conn`` run in the caller's transaction, normally one opened
by ``locked`` or ``transaction``, and never commit on their own.

A payment is named by ``(account_id, payment_id)``, never by its id alone: ids are the
accounts' own idempotency keys, and two accounts may each have a payment ``p1``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Literal

import asyncpg

from infra.ledger import Conn
from recharge.gateway import SavedMethod, expiry_of
from recharge.payments import NewPayment, Payment, RechargeSettings, Trigger
from recharge.policy import AccountTerms

__all__ = ["PaymentStore"]


class PaymentStore:
    """Reads and writes of the payments' tables. Safe to share between tasks and processes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def locked(self, account_id: str) -> AsyncIterator[Conn]:
        """A transaction holding the account's payment lock: serialises every payment
        decision of one account (API processes and recharge workers) until it ends."""
        async with self.transaction() as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('payments:' || $1, 0))", account_id
            )
            yield conn

    # -- the account ---------------------------------------------------------------------------

    async def account_exists(self, account_id: str) -> bool:
        return bool(await self._pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id))

    async def terms(self, conn: Conn, account_id: str) -> AccountTerms:
        a = await conn.fetchrow(
            "SELECT created_at, verification_level FROM accounts WHERE id = $1", account_id
        )
        assert a is not None, account_id
        return AccountTerms(a["created_at"], a["verification_level"])

    async def set_hold(self, conn: Conn, account_id: str, reason: str | None) -> None:
        """Pin (``recharge_cap``) or lift (None) the hold payments put on an account, so a
        rebuild of its Redis state keeps it."""
        await conn.execute("UPDATE accounts SET hold_reason = $2 WHERE id = $1", account_id, reason)

    # -- auto-recharge settings ----------------------------------------------------------------

    async def put_settings(
        self, account_id: str, enabled: bool, threshold: int, amount: int
    ) -> None:
        """Create or replace the settings; clears a ``disabled_reason``."""
        await self._pool.execute(
            "INSERT INTO auto_recharge (account_id, enabled, threshold_amount, recharge_amount)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO UPDATE SET"
            " enabled = $2, threshold_amount = $3, recharge_amount = $4, disabled_reason = NULL,"
            " updated_at = now()",
            account_id,
            enabled,
            threshold,
            amount,
        )

    async def settings(self, account_id: str, conn: Conn | None = None) -> RechargeSettings | None:
        r = await (conn or self._pool).fetchrow(
            "SELECT * FROM auto_recharge WHERE account_id = $1", account_id
        )
        if r is None:
            return None
        return RechargeSettings(
            r["enabled"], r["threshold_amount"], r["recharge_amount"], r["disabled_reason"]
        )

    async def disable(self, conn: Conn, account_id: str, reason: str) -> None:
        await conn.execute(
            "UPDATE auto_recharge SET enabled = false, disabled_reason = $2, updated_at = now()"
            " WHERE account_id = $1",
            account_id,
            reason,
        )

    # -- the saved method ----------------------------------------------------------------------

    async def method(self, account_id: str, conn: Conn | None = None) -> SavedMethod | None:
        r = await (conn or self._pool).fetchrow(
            "SELECT * FROM payment_methods WHERE account_id = $1", account_id
        )
        if r is None:
            return None
        return SavedMethod(
            r["customer_ref"],
            r["method_ref"],
            r["brand"],
            r["last4"],
            r["exp_month"],
            r["exp_year"],
        )

    async def add_method(self, account_id: str, gateway: str, m: SavedMethod) -> bool:
        """Save the account's one method; False: it has one already (nothing written)."""
        inserted = await self._pool.fetchval(
            "INSERT INTO payment_methods (account_id, gateway, customer_ref, method_ref, brand,"
            " last4, exp_month, exp_year) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            account_id,
            gateway,
            m.customer_ref,
            m.method_ref,
            m.brand,
            m.last4,
            *(expiry_of(m.exp_month, m.exp_year)),
        )
        return bool(inserted)

    async def remove_method(self, account_id: str) -> None:
        await self._pool.execute("DELETE FROM payment_methods WHERE account_id = $1", account_id)

    # -- payments ------------------------------------------------------------------------------

    async def payment(
        self, account_id: str, payment_id: str, conn: Conn | None = None
    ) -> Payment | None:
        r = await (conn or self._pool).fetchrow(
            "SELECT * FROM payments WHERE account_id = $1 AND id = $2", account_id, payment_id
        )
        return None if r is None else Payment.of(r)

    async def current(self, account_id: str, payment_id: str) -> Payment:
        """The payment as it stands now; it must exist."""
        p = await self.payment(account_id, payment_id)
        assert p is not None, (account_id, payment_id)
        return p

    async def payments(self, account_id: str, limit: int = 100) -> list[Payment]:
        """The account's payments, newest first."""
        rows = await self._pool.fetch(
            "SELECT * FROM payments WHERE account_id = $1 ORDER BY created_at DESC, id LIMIT $2",
            account_id,
            limit,
        )
        return [Payment.of(r) for r in rows]

    async def invoices_paid(self, account_id: str) -> dict[str, str]:
        """Payment id -> the invoice it paid, for the account's payments made for invoices
        (``invoice_payments``, written by ``enforcement.invoices``: read here only)."""
        rows = await self._pool.fetch(
            "SELECT payment_id, invoice_id FROM invoice_payments WHERE account_id = $1",
            account_id,
        )
        return {r[0]: r[1] for r in rows}

    async def add_payment(self, conn: Conn, p: NewPayment) -> Payment | None:
        """Record a payment in the account's currency; None: there is no such account."""
        r = await conn.fetchrow(
            "INSERT INTO payments (id, account_id, kind, trigger_seq, amount, currency, status,"
            " reason, message, gateway, method, created_at, updated_at, gateway_key)"
            " SELECT $1, $2, $3, $4, $5, currency, $6, $7, $8, $9, $10, $11, $11, $12"
            " FROM accounts WHERE id = $2 RETURNING *",
            p.id,
            p.account_id,
            p.kind,
            p.trigger_seq,
            p.amount,
            p.status,
            p.reason,
            p.message,
            p.gateway,
            p.method,
            p.created_at,
            p.gateway_key,
        )
        return None if r is None else Payment.of(r)

    async def pending_of(self, conn: Conn, account_id: str, seq: int) -> Payment | None:
        """The trigger's payment still ``pending`` (charged or not), if any."""
        r = await conn.fetchrow(
            "SELECT * FROM payments WHERE account_id = $1 AND trigger_seq = $2"
            " AND status = 'pending'",
            account_id,
            seq,
        )
        return None if r is None else Payment.of(r)

    async def paid_during(self, conn: Conn, account_id: str, start: datetime, end: datetime) -> int:
        """What the account paid, or may have (pending: the amount asked), in ``[start, end)``."""
        paid = await conn.fetchval(
            "SELECT coalesce(sum(CASE WHEN status = 'succeeded' THEN captured ELSE amount END), 0)"
            " FROM payments WHERE account_id = $1 AND status IN ('pending', 'succeeded')"
            " AND created_at >= $2 AND created_at < $3",
            account_id,
            start,
            end,
        )
        return int(paid)

    async def auto_since(self, conn: Conn, account_id: str, since: datetime) -> list[datetime]:
        """When the account's automatic payments that may have charged were made, after
        ``since``."""
        rows = await conn.fetch(
            "SELECT created_at FROM payments WHERE account_id = $1 AND kind = 'auto'"
            " AND status IN ('pending', 'succeeded') AND created_at > $2",
            account_id,
            since,
        )
        return [r["created_at"] for r in rows]

    async def note_unknown(
        self, account_id: str, payment_id: str, at: datetime, message: str
    ) -> None:
        """A pending payment's charge had no clear answer; ``at`` paces ``recover``'s retries."""
        await self._pool.execute(
            "UPDATE payments SET updated_at = $3, message = $4"
            " WHERE account_id = $1 AND id = $2 AND status = 'pending'",
            account_id,
            payment_id,
            at,
            message,
        )

    async def settle(
        self,
        conn: Conn,
        account_id: str,
        payment_id: str,
        captured: int,
        gateway_ref: str,
        at: datetime,
    ) -> Payment | None:
        """A pending payment ``succeeded`` with what was ``captured``; None: it was not pending
        (settled by another process meanwhile)."""
        r = await conn.fetchrow(
            "UPDATE payments SET status = 'succeeded', captured = $3, gateway_ref = $4,"
            " reason = '', message = '', updated_at = $5"
            " WHERE account_id = $1 AND id = $2 AND status = 'pending' RETURNING *",
            account_id,
            payment_id,
            captured,
            gateway_ref,
            at,
        )
        return None if r is None else Payment.of(r)

    async def mark_credited(self, account_id: str, payment_id: str) -> None:
        """The Redis balance has the payment's credit (once: the first time stays)."""
        await self._pool.execute(
            "UPDATE payments SET credited_at = now()"
            " WHERE account_id = $1 AND id = $2 AND credited_at IS NULL",
            account_id,
            payment_id,
        )

    async def end_payment(
        self,
        conn: Conn,
        account_id: str,
        payment_id: str,
        status: Literal["declined", "failed"],
        reason: str,
        message: str,
        at: datetime | None,
        gateway_ref: str | None = None,
    ) -> None:
        """A pending payment that charged nothing; ``at`` None: the database's now,
        ``gateway_ref`` None keeps the one it has."""
        await conn.execute(
            "UPDATE payments SET status = $3, reason = $4, message = $5,"
            " gateway_ref = coalesce($6, gateway_ref), updated_at = coalesce($7, now())"
            " WHERE account_id = $1 AND id = $2 AND status = 'pending'",
            account_id,
            payment_id,
            status,
            reason,
            message,
            gateway_ref,
            at,
        )

    async def unsettled(self, pending_before: datetime, limit: int) -> list[Payment]:
        """Pending payments not touched since ``pending_before``, and succeeded ones not yet
        credited, oldest first."""
        rows = await self._pool.fetch(
            "SELECT * FROM payments WHERE (status = 'pending' AND updated_at < $1)"
            " OR (status = 'succeeded' AND credited_at IS NULL) ORDER BY updated_at LIMIT $2",
            pending_before,
            limit,
        )
        return [Payment.of(r) for r in rows]

    # -- triggers ------------------------------------------------------------------------------

    async def add_trigger(self, account_id: str, seq: int, due: datetime) -> None:
        """Record a trigger, open and due at ``due``; a redelivered one changes nothing."""
        await self._pool.execute(
            "INSERT INTO recharge_triggers (account_id, seq, next_attempt_at) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            account_id,
            seq,
            due,
        )

    async def trigger(self, conn: Conn, account_id: str, seq: int) -> Trigger | None:
        r = await conn.fetchrow(
            "SELECT * FROM recharge_triggers WHERE account_id = $1 AND seq = $2", account_id, seq
        )
        if r is None:
            return None
        return Trigger(
            r["account_id"],
            r["seq"],
            r["status"],
            r["attempts"],
            r["declines"],
            r["next_attempt_at"],
        )

    async def cancel_open_triggers(self, account_id: str, outcome: str) -> None:
        await self._pool.execute(
            "UPDATE recharge_triggers SET status = 'cancelled', last_outcome = $2,"
            " updated_at = now() WHERE account_id = $1 AND status = 'open'",
            account_id,
            outcome,
        )

    async def end_trigger(
        self,
        conn: Conn,
        account_id: str,
        seq: int,
        status: Literal["done", "cancelled"],
        outcome: str,
    ) -> None:
        await conn.execute(
            "UPDATE recharge_triggers SET status = $3, last_outcome = $4, updated_at = now()"
            " WHERE account_id = $1 AND seq = $2",
            account_id,
            seq,
            status,
            outcome,
        )

    async def count_attempt(
        self, conn: Conn, account_id: str, seq: int, attempts: int, outcome: str, due: datetime
    ) -> None:
        await conn.execute(
            "UPDATE recharge_triggers SET attempts = $3, last_outcome = $4,"
            " next_attempt_at = $5, updated_at = now() WHERE account_id = $1 AND seq = $2",
            account_id,
            seq,
            attempts,
            outcome,
            due,
        )

    async def count_decline(self, conn: Conn, account_id: str, seq: int) -> int | None:
        """One more decline in a row; returns how many (None: no such trigger)."""
        n = await conn.fetchval(
            "UPDATE recharge_triggers SET declines = declines + 1, updated_at = now()"
            " WHERE account_id = $1 AND seq = $2 RETURNING declines",
            account_id,
            seq,
        )
        return None if n is None else int(n)

    async def retry_at(
        self, conn: Conn, account_id: str, seq: int, due: datetime, outcome: str
    ) -> None:
        await conn.execute(
            "UPDATE recharge_triggers SET next_attempt_at = $3, last_outcome = $4"
            " WHERE account_id = $1 AND seq = $2",
            account_id,
            seq,
            due,
            outcome,
        )

    async def due_triggers(self, now: datetime, limit: int) -> Sequence[tuple[str, int]]:
        """Open triggers due by ``now`` as ``(account_id, seq)``, the longest due first."""
        rows = await self._pool.fetch(
            "SELECT account_id, seq FROM recharge_triggers WHERE status = 'open'"
            " AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2",
            now,
            limit,
        )
        return [(r["account_id"], r["seq"]) for r in rows]
