"""Settling a recorded payment: steps 2 to 4 of ``recharge.service``'s order of writes.

2. Charge the gateway with the payment's own idempotency key, made of its account and its id
   (an unknown outcome is retried with the same key, here and then by ``recover``).
3. Settle in one PostgreSQL transaction: the payment ``succeeded`` with what was captured, the
   ledger's credit row, the trigger done, a payments' hold lifted. A decline or a refusal
   before the processor is recorded instead, and its trigger scheduled for a retry.
4. Credit the Redis balance (idempotent on the payment id), then mark the payment credited.

Every step is safe to repeat after a crash: a payment leaves ``pending`` once, the ledger row
and the Redis credit are idempotent on the payment id in its account (the ledger's
``credit_key`` and the Redis credits hash are both the account's own).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from balance.accounts import load_into_redis
from balance.protocol import BalanceStore
from infra import metrics
from infra.ledger import Ledger
from recharge.gateway import (
    ChargeRequest,
    ChargeResult,
    GatewayUnavailable,
    OutcomeUnknown,
    PaymentGateway,
)
from recharge.notify import Notices
from recharge.payments import Payment
from recharge.store import PaymentStore

log = logging.getLogger(__name__)

#: In-process retries of an unknown outcome before the payment is left to ``recover``.
UNKNOWN_RETRIES: Final = (0.2, 1.0)


class Settlement:
    """Charges, settles and credits payments ``recharge.service`` recorded as ``pending``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: PaymentStore,
        ledger: Ledger,
        balances: BalanceStore,
        gateway: PaymentGateway,
        notify: Notices,
        *,
        backoff_s: Sequence[float],
        max_declines: int,
        clock: Callable[[], datetime],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._pool = pool
        self._store = store
        self._ledger = ledger
        self._balances = balances
        self._gateway = gateway
        self._notify = notify
        self._backoff = tuple(backoff_s) or (300.0,)
        self._max_declines = max_declines
        self._clock = clock
        self._sleep = sleep

    async def charge(self, p: Payment) -> Payment:
        """2. Charge the gateway with the payment's idempotency key (``gateway_key``)."""
        method = await self._store.method(p.account_id)
        if method is None:
            return await self._failed(p, "no_payment_method", "the payment method was deleted")
        req = ChargeRequest(
            account_id=p.account_id,
            amount=p.amount,
            currency=p.currency,
            customer_ref=method.customer_ref,
            method_ref=method.method_ref,
            idempotency_key=p.gateway_key,
            description=("auto-recharge" if p.kind == "auto" else "top-up") + f" {p.id}",
        )
        result: ChargeResult | None = None
        for delay in (*UNKNOWN_RETRIES, None):
            try:
                result = await self._gateway.charge(req)
                break
            except OutcomeUnknown as exc:
                if delay is None:
                    log.warning(
                        "payment %s of %s: outcome unknown, left to recover: %s",
                        p.id,
                        p.account_id,
                        exc,
                    )
                    # updated_at paces recover's retries (one per grace period)
                    await self._store.note_unknown(
                        p.account_id,
                        p.id,
                        self._clock(),
                        f"outcome unknown, retrying with the same key: {exc}"[:500],
                    )
                    return p
                await self._sleep(delay)
            except GatewayUnavailable as exc:
                return await self._failed(p, "gateway_unavailable", str(exc))
        assert result is not None
        if result.status == "declined":
            return await self._declined(p, result)
        return await self._settle(p, result)

    async def _settle(self, p: Payment, result: ChargeResult) -> Payment:
        """3. The payment succeeded and the ledger's credit row, in one transaction; then 4."""
        now = self._clock()
        async with self._store.transaction() as conn:
            settled = await self._store.settle(
                conn, p.account_id, p.id, result.captured, result.gateway_ref, now
            )
            if settled is None:  # settled by another process meanwhile
                return await self._store.current(p.account_id, p.id)
            await self._ledger.record_payment(
                conn,
                account_id=p.account_id,
                payment_id=p.id,
                captured=result.captured,
                gateway_ref=f"{p.gateway}:{result.gateway_ref}",
                at=now,
            )
            await self._store.set_hold(conn, p.account_id, None)
            if p.trigger_seq is not None:
                await self._store.end_trigger(
                    conn, p.account_id, p.trigger_seq, "done", "succeeded"
                )
        metrics.RECHARGES.labels("succeeded").inc()
        await self.credit(settled)
        await self._notify("payment.succeeded", p.account_id, settled, "", "")
        return await self._store.current(p.account_id, p.id)

    async def credit(self, p: Payment) -> None:
        """4. The ledger has the payment's credit row: put the money in the Redis balance,
        then mark the payment credited."""
        now_s = int(self._clock().timestamp())
        out = await self._balances.credit(
            p.account_id, "payment:" + p.id, p.captured, payment=True, now_s=now_s
        )
        if not out.found:
            # Redis lost the account: rebuilt from the ledger, which already holds this credit.
            await load_into_redis(
                self._pool, self._balances, [p.account_id], now=now_s, ledger=self._ledger
            )
        if p.trigger_seq is not None:
            await self._balances.close_recharge_trigger(p.account_id, p.trigger_seq)
        await self._store.mark_credited(p.account_id, p.id)

    async def _declined(self, p: Payment, result: ChargeResult) -> Payment:
        now = self._clock()
        disabled = False
        async with self._store.transaction() as conn:
            await self._store.end_payment(
                conn,
                p.account_id,
                p.id,
                "declined",
                result.decline_code or "declined",
                result.message,
                now,
                gateway_ref=result.gateway_ref,
            )
            if p.trigger_seq is not None:
                declines = await self._store.count_decline(conn, p.account_id, p.trigger_seq)
                if declines is not None and declines >= self._max_declines:
                    disabled = True
                    await self._store.disable(conn, p.account_id, "repeated_declines")
                    await self._store.end_trigger(
                        conn, p.account_id, p.trigger_seq, "cancelled", "repeated_declines"
                    )
                elif declines is not None:
                    wait = self._backoff[min(declines, len(self._backoff)) - 1]
                    await self._store.retry_at(
                        conn,
                        p.account_id,
                        p.trigger_seq,
                        now + timedelta(seconds=wait),
                        "declined:" + (result.decline_code or "declined"),
                    )
        metrics.RECHARGES.labels("declined").inc()
        out = await self._store.current(p.account_id, p.id)
        await self._notify(
            "payment.declined", p.account_id, out, result.decline_code, result.message
        )
        if disabled:
            await self._balances.set_auto_recharge(p.account_id, None)
            await self._notify(
                "recharge.disabled",
                p.account_id,
                None,
                "repeated_declines",
                f"auto-recharge turned off after {self._max_declines} declines in a row;"
                " update the payment method and turn it on again",
            )
        return out

    async def _failed(self, p: Payment, reason: str, message: str) -> Payment:
        """Definitely not charged (refused before the processor): recorded, retried later."""
        now = self._clock()
        async with self._store.transaction() as conn:
            await self._store.end_payment(
                conn, p.account_id, p.id, "failed", reason, message[:500], now
            )
            if p.trigger_seq is not None:
                await self._store.retry_at(
                    conn,
                    p.account_id,
                    p.trigger_seq,
                    now + timedelta(seconds=self._backoff[0]),
                    reason,
                )
        metrics.RECHARGES.labels("failed").inc()
        out = await self._store.current(p.account_id, p.id)
        await self._notify("payment.failed", p.account_id, out, reason, message)
        return out

    async def give_up(self, p: Payment) -> None:
        """A payment whose outcome stayed unknown for nearly a day (Stripe keeps an idempotency
        key 24 hours, and replays a 500 stored under it): stop retrying, credit nothing, and
        tell an operator to look it up at the gateway by its ``gateway_key``. Its trigger is
        not retried either: a new payment id could charge the card a second time."""
        async with self._store.transaction() as conn:
            await self._store.end_payment(
                conn,
                p.account_id,
                p.id,
                "failed",
                "outcome_unknown",
                "no answer from the gateway for a day: look up this payment's idempotency key"
                f" ({p.gateway_key}) at the gateway; if it was charged, credit it by hand",
                None,
            )
            if p.trigger_seq is not None:
                await self._store.end_trigger(
                    conn, p.account_id, p.trigger_seq, "cancelled", "outcome_unknown"
                )
        if p.trigger_seq is not None:
            await self._balances.close_recharge_trigger(p.account_id, p.trigger_seq)
        metrics.RECHARGES.labels("failed").inc()
        out = await self._store.current(p.account_id, p.id)
        log.error(
            "payment %s of %s: outcome unknown for a day, needs review (gateway key %s)",
            p.id,
            p.account_id,
            p.gateway_key,
        )
        await self._notify("payment.failed", p.account_id, out, "outcome_unknown", out.message)
