"""The ``refunds`` table in PostgreSQL: its one writer (a test greps the packages for any
other), and the records it holds.

The store keeps no rules but one, the cap, because only the database can keep it across
processes: ``add_card`` inserts a card refund only while the payment's refunds that are
pending or succeeded, with this one, stay within what it captured, under a row lock of the
payment (``SELECT ... FOR UPDATE``) held until the caller's transaction ends, so two refunds
of one payment decided at once are decided one after the other. What to write, and in which
order, is ``recharge.refunds``'s. Methods that take ``conn`` run in the caller's transaction
and never commit on their own.

A refund is named by ``(account_id, refund_id)``: ids are the operator's idempotency keys,
scoped to the account as payment ids are; card refunds and credits share the id space.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from infra.ledger import Conn
from recharge.gateway import refund_key

__all__ = ["CapExceeded", "PaymentToRefund", "Refund", "RefundStore"]

#: ``card``: given back to the card the payment was charged to; ``credit``: given back as
#: account credit (the refunds table's CHECK allows these).
RefundKind = Literal["card", "credit"]
#: ``pending``: to be sent, or its outcome unknown; ``succeeded``: the gateway took it (a
#: credit is succeeded when recorded); ``failed``: nothing was given back.
RefundStatus = Literal["pending", "succeeded", "failed"]


@dataclass(frozen=True, slots=True)
class Refund:
    """A refund, known by ``(account_id, id)``; amounts in micro-units, always > 0 (the
    ledger row's sign says which way the money went)."""

    account_id: str
    id: str
    kind: RefundKind
    payment_id: str | None  # the payment refunded (card); None for a credit
    amount: int
    currency: str
    status: RefundStatus
    reason: str  # the operator's words
    outcome: str  # the gateway's word, or why it failed ("gateway_refused", ...)
    message: str
    gateway: str
    charge_ref: str  # the payment's charge at the gateway; "" for a credit
    gateway_key: str | None  # the idempotency key it is sent with, on every retry
    gateway_ref: str  # the gateway's refund (Stripe: re_...)
    created_at: datetime
    updated_at: datetime
    applied_at: datetime | None  # the Redis balance has it

    @property
    def signed(self) -> int:
        """What the refund does to the balance: ``-amount`` to the card, ``+amount`` as credit."""
        return -self.amount if self.kind == "card" else self.amount

    @classmethod
    def of(cls, r: asyncpg.Record) -> Refund:
        # kind and status are not checked here: the table's CHECKs hold them to the Literals.
        return cls(
            r["account_id"],
            r["id"],
            r["kind"],
            r["payment_id"],
            r["amount"],
            r["currency"],
            r["status"],
            r["reason"],
            r["outcome"],
            r["message"],
            r["gateway"],
            r["charge_ref"],
            r["gateway_key"],
            r["gateway_ref"],
            r["created_at"],
            r["updated_at"],
            r["applied_at"],
        )


@dataclass(frozen=True, slots=True)
class PaymentToRefund:
    """What a card refund needs of its payment, read under the payment's row lock."""

    status: str
    captured: int
    currency: str
    gateway: str
    gateway_ref: str
    refunded: int  # its refunds pending or succeeded, micro-units


class CapExceeded(Exception):
    """More than is left of the payment's capture; nothing was written."""

    def __init__(self, left: int) -> None:
        super().__init__(f"{left} micro-units are left to refund")
        self.left = left


class RefundStore:
    """Reads and writes of ``refunds``. Safe to share between tasks and processes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def refund(
        self, account_id: str, refund_id: str, conn: Conn | None = None
    ) -> Refund | None:
        r = await (conn or self._pool).fetchrow(
            "SELECT * FROM refunds WHERE account_id = $1 AND id = $2", account_id, refund_id
        )
        return None if r is None else Refund.of(r)

    async def current(self, account_id: str, refund_id: str) -> Refund:
        """The refund as it stands now; it must exist."""
        r = await self.refund(account_id, refund_id)
        assert r is not None, (account_id, refund_id)
        return r

    async def refunds(self, account_id: str, limit: int = 100) -> list[Refund]:
        """The account's refunds and credits, newest first."""
        rows = await self._pool.fetch(
            "SELECT * FROM refunds WHERE account_id = $1 ORDER BY created_at DESC, id LIMIT $2",
            account_id,
            limit,
        )
        return [Refund.of(r) for r in rows]

    async def refunded(self, account_id: str) -> Mapping[str, int]:
        """What went back to the card per payment of the account (succeeded refunds only)."""
        rows = await self._pool.fetch(
            "SELECT payment_id, sum(amount)::bigint AS total FROM refunds"
            " WHERE account_id = $1 AND kind = 'card' AND status = 'succeeded'"
            " GROUP BY payment_id",
            account_id,
        )
        return {r["payment_id"]: r["total"] for r in rows}

    async def lock_payment(
        self, conn: Conn, account_id: str, payment_id: str
    ) -> PaymentToRefund | None:
        """The payment, its row locked until the caller's transaction ends (every card refund
        of it waits here), and what its refunds pending or succeeded already hold of it."""
        p = await conn.fetchrow(
            "SELECT status, captured, currency, gateway, gateway_ref FROM payments"
            " WHERE account_id = $1 AND id = $2 FOR UPDATE",
            account_id,
            payment_id,
        )
        if p is None:
            return None
        refunded = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0)::bigint FROM refunds WHERE account_id = $1"
            " AND payment_id = $2 AND status IN ('pending', 'succeeded')",
            account_id,
            payment_id,
        )
        return PaymentToRefund(
            p["status"], p["captured"], p["currency"], p["gateway"], p["gateway_ref"], refunded
        )

    async def add_card(
        self,
        conn: Conn,
        *,
        account_id: str,
        refund_id: str,
        payment_id: str,
        payment: PaymentToRefund,
        amount: int,
        reason: str,
        at: datetime,
    ) -> Refund | None:
        """Record a card refund ``pending``, read by ``lock_payment`` in this transaction.
        Raises ``CapExceeded`` (nothing written) when ``amount`` is more than is left of the
        capture. None: the id is taken in the account (by a refund decided meanwhile)."""
        left = payment.captured - payment.refunded
        if amount > left:
            raise CapExceeded(left)
        r = await conn.fetchrow(
            "INSERT INTO refunds (account_id, id, kind, payment_id, amount, currency, status,"
            " reason, gateway, charge_ref, gateway_key, created_at, updated_at)"
            " VALUES ($1, $2, 'card', $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $10)"
            " ON CONFLICT DO NOTHING RETURNING *",
            account_id,
            refund_id,
            payment_id,
            amount,
            payment.currency,
            reason,
            payment.gateway,
            payment.gateway_ref,
            refund_key(account_id, refund_id),
            at,
        )
        return None if r is None else Refund.of(r)

    async def add_credit(
        self, conn: Conn, *, account_id: str, refund_id: str, amount: int, reason: str, at: datetime
    ) -> Refund | None:
        """Record a refund as credit, ``succeeded`` (nothing to send), in the account's
        currency. None: the id is taken in the account, or there is no such account."""
        r = await conn.fetchrow(
            "INSERT INTO refunds (account_id, id, kind, amount, currency, status, reason,"
            " created_at, updated_at)"
            " SELECT id, $2, 'credit', $3, currency, 'succeeded', $4, $5, $5"
            " FROM accounts WHERE id = $1 ON CONFLICT DO NOTHING RETURNING *",
            account_id,
            refund_id,
            amount,
            reason,
            at,
        )
        return None if r is None else Refund.of(r)

    async def settle(
        self,
        conn: Conn,
        account_id: str,
        refund_id: str,
        gateway_ref: str,
        outcome: str,
        message: str,
        at: datetime,
    ) -> Refund | None:
        """A pending refund ``succeeded`` at the gateway; None: it was not pending (settled by
        another process meanwhile)."""
        r = await conn.fetchrow(
            "UPDATE refunds SET status = 'succeeded', gateway_ref = $3, outcome = $4,"
            " message = $5, updated_at = $6"
            " WHERE account_id = $1 AND id = $2 AND status = 'pending' RETURNING *",
            account_id,
            refund_id,
            gateway_ref,
            outcome,
            message,
            at,
        )
        return None if r is None else Refund.of(r)

    async def fail(
        self,
        account_id: str,
        refund_id: str,
        outcome: str,
        message: str,
        at: datetime,
        gateway_ref: str = "",
    ) -> None:
        """A pending refund that gave nothing back: it no longer counts against the cap."""
        await self._pool.execute(
            "UPDATE refunds SET status = 'failed', outcome = $3, message = $4, updated_at = $5,"
            " gateway_ref = CASE WHEN $6 = '' THEN gateway_ref ELSE $6 END"
            " WHERE account_id = $1 AND id = $2 AND status = 'pending'",
            account_id,
            refund_id,
            outcome,
            message[:500],
            at,
            gateway_ref,
        )

    async def note_unknown(
        self, account_id: str, refund_id: str, at: datetime, message: str
    ) -> None:
        """A pending refund had no clear answer; ``at`` paces ``recover``'s retries."""
        await self._pool.execute(
            "UPDATE refunds SET updated_at = $3, message = $4"
            " WHERE account_id = $1 AND id = $2 AND status = 'pending'",
            account_id,
            refund_id,
            at,
            message[:500],
        )

    async def mark_applied(self, account_id: str, refund_id: str, at: datetime) -> None:
        """The Redis balance has the refund (once: the first time stays)."""
        await self._pool.execute(
            "UPDATE refunds SET applied_at = $3"
            " WHERE account_id = $1 AND id = $2 AND applied_at IS NULL",
            account_id,
            refund_id,
            at,
        )

    async def unsettled(self, pending_before: datetime, limit: int) -> list[Refund]:
        """Pending refunds not touched since ``pending_before``, and succeeded ones not yet in
        Redis, oldest first."""
        rows = await self._pool.fetch(
            "SELECT * FROM refunds WHERE (status = 'pending' AND updated_at < $1)"
            " OR (status = 'succeeded' AND applied_at IS NULL) ORDER BY updated_at LIMIT $2",
            pending_before,
            limit,
        )
        return [Refund.of(r) for r in rows]
