"""Refunds (operator only): a payment given back to its card through the gateway, or money
given back as account credit. The rules are in docs/design/refunds.md; the rows are written
through ``recharge.refund_store`` (the one writer of ``refunds``) and the ledger's ``refund``
rows through the ``Ledger``.

Order of writes for a refund to the card, so that a crash or a lost answer anywhere leaves
exactly one refund at the gateway and one debit of the balance:

1. Decide in one PostgreSQL transaction holding the payment's row lock: the payment
   succeeded; its refunds pending or succeeded, with this one, stay within what it captured
   (the cap: ``RefundStore.add_card``); record the refund ``pending`` with its id (unique in
   its account) and the gateway's idempotency key made of both (``gateway.refund_key``).
   Nothing has been refunded yet.
2. Ask the gateway with that key. A timeout or 5xx is ``OutcomeUnknown``: the same key is
   retried (here, then by ``recover``), so the card is refunded at most once per refund. A
   refusal (``GatewayUnavailable``: more than is left at the gateway, no such charge) or a
   failed refund marks it ``failed``: nothing given back, it no longer holds any of the cap.
3. Settle in one transaction: the refund ``succeeded``, and the ledger's ``refund`` row of
   ``-amount`` (idempotent on the account and refund id), ``ref`` the payment's id.
4. Debit the Redis balance through the credit script with ``-amount`` (idempotent on
   ``refund:<id>`` in the account's own credits hash), unconditionally: the balance may go
   below zero, and the account then moves where its credit puts it (hold at or below zero
   available credit, low at or below its threshold, a suspended or pinned account stays as
   it is). Then mark the refund applied.

A refund as credit is steps 3 and 4 at once: recorded ``succeeded`` with its ledger row of
``+amount`` in one transaction, then credited in Redis once per refund id.

``recover`` (run by the recharge worker's scan, through ``PaymentService.recover``) finishes
what a crash or an unknown outcome left: pending refunds are sent again with their own key,
settled ones not yet in Redis are applied; a refund whose outcome stays unknown for
``UNKNOWN_GIVE_UP`` is left for an operator (``failed``, ``outcome_unknown``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from balance.accounts import load_into_redis
from balance.protocol import BalanceStore
from contracts.money import format_money
from infra.ledger import Ledger
from recharge import policy
from recharge.gateway import (
    MICROS_PER_CENT,
    GatewayUnavailable,
    OutcomeUnknown,
    PaymentGateway,
    RefundRequest,
    RefundResult,
)
from recharge.refund_store import CapExceeded, Refund, RefundStore
from recharge.settlement import UNKNOWN_RETRIES

log = logging.getLogger(__name__)

#: A pending refund is given up (left for an operator) this long after it was created:
#: Stripe keeps an idempotency key for 24 hours.
UNKNOWN_GIVE_UP: Final = timedelta(hours=23)
#: The most one credit may give (a refund to card is capped by its payment).
MAX_CREDIT: Final = policy.MAX_PAYMENT


class RefundError(Exception):
    """A refund that cannot be done; ``code`` is the API error code. Nothing was written."""

    def __init__(
        self, code: str, message: str, status: int = 409, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.field = field


class RefundService:
    """Refunds to the card and as credit. Safe to run in several processes."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ledger: Ledger,
        balances: BalanceStore,
        gateway: PaymentGateway,
        *,
        clock: Callable[[], datetime],
        sleep: Callable[[float], Awaitable[None]],
        pending_grace: timedelta,
        store: RefundStore | None = None,
    ) -> None:
        self._pool = pool
        self._ledger = ledger
        self._balances = balances
        self._gateway = gateway
        self._clock = clock
        self._sleep = sleep
        # A pending refund younger than this may be another process's request in flight.
        self._pending_grace = pending_grace
        self._store = store or RefundStore(pool)

    @property
    def store(self) -> RefundStore:
        return self._store

    # -- to the card ---------------------------------------------------------------------------

    async def refund_to_card(
        self, account_id: str, payment_id: str, refund_id: str, amount: int | None, reason: str
    ) -> Refund:
        """Give ``amount`` (default: all that is left) of a succeeded payment back to its card,
        and take it off the balance. Idempotent on ``refund_id`` in the account: a retry
        answers the first refund (and finishes it if it was cut off). Raises ``RefundError``:
        404 ``payment_not_found``, 409 ``payment_not_settled``, ``refund_exceeds_capture``,
        ``refund_id_reused``, ``gateway_mismatch``, 422 ``invalid_amount``."""
        if amount is not None and (amount <= 0 or amount % MICROS_PER_CENT):
            raise RefundError(
                "invalid_amount",
                "a refund to the card is a positive whole number of cents",
                422,
                "amount",
            )
        now = self._clock()
        async with self._store.transaction() as conn:  # 1. decide and record, the payment locked
            pay = await self._store.lock_payment(conn, account_id, payment_id)
            prior = await self._store.refund(account_id, refund_id, conn)
            if prior is not None:
                r = _same(prior, "card", payment_id, amount)
            elif pay is None:
                raise RefundError("payment_not_found", f"no payment {payment_id!r}", 404)
            elif pay.status != "succeeded" or pay.captured <= 0:
                raise RefundError(
                    "payment_not_settled",
                    f"payment {payment_id!r} is {pay.status}: only a captured payment is refunded",
                )
            elif pay.gateway != self._gateway.name or not pay.gateway_ref:
                raise RefundError(
                    "gateway_mismatch",
                    f"payment {payment_id!r} was charged through {pay.gateway!r}, not through"
                    f" {self._gateway.name!r}",
                )
            else:
                left = pay.captured - pay.refunded
                want = left if amount is None else amount
                if want <= 0:
                    raise RefundError(
                        "refund_exceeds_capture", f"payment {payment_id!r} is fully refunded"
                    )
                try:
                    added = await self._store.add_card(
                        conn,
                        account_id=account_id,
                        refund_id=refund_id,
                        payment_id=payment_id,
                        payment=pay,
                        amount=want,
                        reason=reason,
                        at=now,
                    )
                except CapExceeded as exc:
                    raise RefundError(
                        "refund_exceeds_capture",
                        f"{format_money(exc.left)} of payment {payment_id!r} is left to refund",
                        409,
                        "amount",
                    ) from None
                if added is None:  # the id was taken meanwhile, by a refund of another payment
                    raise RefundError("refund_id_reused", f"refund {refund_id!r} exists")
                r = added
        if r.status == "pending":
            return await self._send(r)
        if r.status == "succeeded" and r.applied_at is None:
            await self._apply(r)
        return await self._store.current(account_id, refund_id)

    async def _send(self, r: Refund) -> Refund:
        """2. Ask the gateway with the refund's own key; then 3 and 4."""
        assert r.kind == "card" and r.gateway_key is not None
        req = RefundRequest(
            account_id=r.account_id,
            charge_ref=r.charge_ref,
            amount=r.amount,
            currency=r.currency,
            idempotency_key=r.gateway_key,
            reason=r.reason,
        )
        result: RefundResult | None = None
        for delay in (*UNKNOWN_RETRIES, None):
            try:
                result = await self._gateway.refund(req)
                break
            except OutcomeUnknown as exc:
                if delay is None:
                    log.warning(
                        "refund %s of %s: outcome unknown, left to recover: %s",
                        r.id,
                        r.account_id,
                        exc,
                    )
                    await self._store.note_unknown(
                        r.account_id,
                        r.id,
                        self._clock(),
                        f"outcome unknown, retrying with the same key: {exc}",
                    )
                    return await self._store.current(r.account_id, r.id)
                await self._sleep(delay)
            except GatewayUnavailable as exc:
                await self._store.fail(
                    r.account_id, r.id, "gateway_refused", str(exc), self._clock()
                )
                return await self._store.current(r.account_id, r.id)
        assert result is not None
        if result.status == "failed":
            await self._store.fail(
                r.account_id,
                r.id,
                "refund_" + result.gateway_status,
                result.message,
                self._clock(),
                result.gateway_ref,
            )
            return await self._store.current(r.account_id, r.id)
        now = self._clock()
        async with self._store.transaction() as conn:  # 3. settle, with the ledger's row
            settled = await self._store.settle(
                conn,
                r.account_id,
                r.id,
                result.gateway_ref,
                result.gateway_status,
                result.message,
                now,
            )
            if settled is None:  # settled by another process meanwhile
                return await self._store.current(r.account_id, r.id)
            assert r.payment_id is not None
            await self._ledger.record_refund(
                conn,
                account_id=r.account_id,
                refund_id=r.id,
                amount=-r.amount,
                ref=r.payment_id,
                refund_ref=f"card:{r.gateway}:{result.gateway_ref}",
                at=now,
            )
        await self._apply(settled)
        return await self._store.current(r.account_id, r.id)

    # -- as credit -----------------------------------------------------------------------------

    async def credit(self, account_id: str, credit_id: str, amount: int, reason: str) -> Refund:
        """Give ``amount`` back as account credit (e.g. for a disputed call): a ledger
        ``refund`` row of ``+amount`` and the Redis balance credited, once per ``credit_id`` in
        the account. Raises ``RefundError``: 404 ``account_not_found``, 409 ``refund_id_reused``,
        422 ``invalid_amount``."""
        if amount <= 0 or amount > MAX_CREDIT:
            raise RefundError(
                "invalid_amount",
                f"a credit is more than 0 and at most {format_money(MAX_CREDIT)}",
                422,
                "amount",
            )
        now = self._clock()
        async with self._store.transaction() as conn:  # 3. record it and its ledger row
            added = await self._store.add_credit(
                conn,
                account_id=account_id,
                refund_id=credit_id,
                amount=amount,
                reason=reason,
                at=now,
            )
            if added is not None:
                await self._ledger.record_refund(
                    conn,
                    account_id=account_id,
                    refund_id=credit_id,
                    amount=amount,
                    ref=credit_id,
                    refund_ref="credit",
                    at=now,
                )
        if added is None:
            prior = await self._store.refund(account_id, credit_id)
            if prior is None:
                raise RefundError("account_not_found", "no such account", 404)
            r = _same(prior, "credit", None, amount)
        else:
            r = added
        if r.applied_at is None:  # 4.
            await self._apply(r)
        return await self._store.current(account_id, credit_id)

    # -- both ----------------------------------------------------------------------------------

    async def _apply(self, r: Refund) -> None:
        """4. The ledger has the refund's row: move the Redis balance by it once per refund
        id (a debit is never refused: the balance may go below zero), then mark it applied."""
        now = self._clock()
        now_s = int(now.timestamp())
        # Money given back never fires auto-recharge: the card would be charged again for it.
        out = await self._balances.credit(
            r.account_id, "refund:" + r.id, r.signed, refund=r.signed < 0, now_s=now_s
        )
        if not out.found:
            # Redis lost the account: rebuilt from the ledger, which already holds this row.
            await load_into_redis(
                self._pool, self._balances, [r.account_id], now=now_s, ledger=self._ledger
            )
        elif out.applied:
            log.info(
                "refund %s of %s applied: balance %s, account %s",
                r.id,
                r.account_id,
                format_money(out.balance),
                out.status,
            )
        await self._store.mark_applied(r.account_id, r.id, now)

    async def refunds(self, account_id: str, limit: int = 100) -> list[Refund]:
        return await self._store.refunds(account_id, limit)

    async def recover(self, limit: int = 100) -> int:
        """Finish what crashes and unknown outcomes left. Returns how many refunds it worked
        on."""
        now = self._clock()
        done = 0
        for r in await self._store.unsettled(now - self._pending_grace, limit):
            if r.status == "pending" and now - r.created_at > UNKNOWN_GIVE_UP:
                await self._give_up(r)
            elif r.status == "pending":
                await self._send(r)
            else:
                await self._apply(r)
            done += 1
        return done

    async def _give_up(self, r: Refund) -> None:
        """No answer for nearly a day (Stripe keeps a key 24 hours): stop asking, debit
        nothing, and tell an operator to look the key up at the gateway."""
        message = (
            "no answer from the gateway for a day: look up this refund's idempotency key"
            f" ({r.gateway_key}) at the gateway; if it was refunded, debit it by hand"
        )
        await self._store.fail(r.account_id, r.id, "outcome_unknown", message, self._clock())
        log.error(
            "refund %s of %s: outcome unknown for a day, needs review (gateway key %s)",
            r.id,
            r.account_id,
            r.gateway_key,
        )


def _same(prior: Refund, kind: str, payment_id: str | None, amount: int | None) -> Refund:
    """The refund a retry of ``prior``'s id asks for is ``prior`` itself, or 409."""
    if (
        prior.kind != kind
        or prior.payment_id != payment_id
        or (amount is not None and amount != prior.amount)
    ):
        raise RefundError(
            "refund_id_reused",
            f"refund {prior.id!r} was made as another refund (kind, payment or amount)",
        )
    return prior
