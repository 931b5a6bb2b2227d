"""Payments: manual top-ups, auto-recharge triggers, and the settlement of what a card paid.

The state machine of a payment lives here; its rows are written through ``recharge.store``
(the one writer of the payments' tables) and its credit through the ``Ledger``.

Order of writes, so that a crash anywhere leaves exactly one charge and exactly one credit:

1. Decide under a per-account advisory lock (the rules of ``recharge.policy`` read the
   account's payments), and record the payment as ``pending`` with its id (unique in its
   account) and the gateway's idempotency key made of both (``gateway.idempotency_key``).
   Nothing has been charged yet.
2. Charge the gateway with that key. A timeout or 5xx is ``OutcomeUnknown``: the same key is
   retried (here, then by ``recover``), so the card is charged at most once per payment.
3. Settle in one PostgreSQL transaction: the payment ``succeeded`` with what was captured, and
   the ledger's credit row (idempotent on the account and payment id).
4. Credit the Redis balance (idempotent on the payment id in the account's own credits), then
   mark the payment credited.

``recover`` (run every few seconds by the recharge worker) finishes whatever a crash or an
unknown outcome left: pending payments are charged again with their own key, settled ones not
yet in Redis are credited, triggers whose back-off is over are attempted again.

Only ``captured`` is ever credited, never the amount asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from balance.protocol import BalanceStore
from contracts.money import format_money
from infra import metrics
from infra.clock import datetime_clock, system_clock
from infra.ledger import Conn, Ledger, PostgresLedger
from recharge import policy
from recharge.gateway import GatewayUnavailable, PaymentGateway, SavedMethod
from recharge.notify import LogNotifier, Notices, Notifier
from recharge.payments import (
    NewPayment,
    Payment,
    RechargeSettings,
    auto_payment_id,
    is_auto_payment_id,
    method_label,
)
from recharge.policy import AccountTerms
from recharge.refunds import RefundService
from recharge.settlement import UNKNOWN_RETRIES, Settlement
from recharge.store import PaymentStore

# The names callers have always imported from here (the HTTP routes, the worker, the demos).
__all__ = [
    "UNKNOWN_GIVE_UP",
    "LogNotifier",
    "Notifier",
    "Payment",
    "PaymentError",
    "PaymentService",
    "RechargeSettings",
]

log = logging.getLogger(__name__)

#: A pending payment is given up (left for an operator) this long after it was created.
UNKNOWN_GIVE_UP: Final = timedelta(hours=23)


class PaymentError(Exception):
    """A request about payments that cannot be done; ``code`` is the API error code."""

    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def _found(p: Payment | None) -> Payment:
    if p is None:  # an INSERT ... SELECT FROM accounts found no account
        raise PaymentError("account_not_found", "no such account", 404)
    return p


class PaymentService:
    """Everything that moves money into an account. Safe to run in several processes. Its
    ``refunds`` give money back (operator only, ``recharge.refunds``) on the same gateway,
    ledger and clock, and ``recover`` finishes those too.

    ``store`` and ``ledger`` default to this pool's (``PaymentStore``, ``PostgresLedger``)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        balances: BalanceStore,
        gateway: PaymentGateway,
        notifier: Notifier,
        *,
        backoff_s: Sequence[float] = (300.0, 1800.0, 7200.0),
        max_declines: int = 3,
        charge_timeout_s: float = 20.0,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        store: PaymentStore | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self._store = store or PaymentStore(pool)
        self._balances = balances
        self._gateway = gateway
        # A pending payment younger than this may be another process's charge in flight
        # (each try bounded by the gateway's timeout): ``recover`` leaves it alone until then.
        self._pending_grace = timedelta(
            seconds=charge_timeout_s * (len(UNKNOWN_RETRIES) + 1) + sum(UNKNOWN_RETRIES) + 5
        )
        # The default is infra.clock's, the one wall clock every calendar decision reads.
        self._clock = clock or datetime_clock(system_clock)
        self._notify = Notices(notifier, self._clock)
        ledger = ledger or PostgresLedger(pool)
        self.refunds = RefundService(
            pool,
            ledger,
            balances,
            gateway,
            clock=self._clock,
            sleep=sleep,
            pending_grace=self._pending_grace,
        )
        self._settlement = Settlement(
            pool,
            self._store,
            ledger,
            balances,
            gateway,
            self._notify,
            backoff_s=backoff_s,
            max_declines=max_declines,
            clock=self._clock,
            sleep=sleep,
        )

    @property
    def gateway_name(self) -> str:
        return self._gateway.name

    # -- settings and the saved method ---------------------------------------------------------

    async def set_auto_recharge(
        self, account_id: str, enabled: bool, threshold: int, amount: int
    ) -> RechargeSettings:
        """PostgreSQL first (the book of record), then the real-time state; repeatable."""
        if amount < policy.MIN_PAYMENT:
            raise PaymentError(
                "amount_below_minimum",
                f"recharge_amount must be at least {format_money(policy.MIN_PAYMENT)}",
                422,
            )
        if amount > policy.MAX_PAYMENT or threshold > policy.MAX_PAYMENT:
            raise PaymentError(
                "amount_above_maximum",
                f"amounts are at most {format_money(policy.MAX_PAYMENT)}",
                422,
            )
        await self._store.put_settings(account_id, enabled, threshold, amount)
        if enabled:
            # Retries now follow the new settings; the trigger a low account fires below
            # starts afresh.
            await self._store.cancel_open_triggers(account_id, "settings_changed")
        await self._balances.set_auto_recharge(account_id, threshold if enabled else None)
        return RechargeSettings(enabled, threshold, amount)

    async def auto_recharge(self, account_id: str) -> RechargeSettings | None:
        return await self._store.settings(account_id)

    async def save_method(self, account_id: str, token: str) -> SavedMethod:
        """One method per account: 409 ``payment_method_exists`` while one is saved."""
        if await self._store.method(account_id) is not None:
            raise PaymentError(
                "payment_method_exists",
                "the account already has a payment method; delete it before saving another",
            )
        try:
            m = await self._gateway.save_method(account_id, token)
        except GatewayUnavailable as exc:
            raise PaymentError("payment_method_refused", str(exc), 422) from exc
        if not await self._store.add_method(account_id, self._gateway.name, m):
            # another request saved one meanwhile: undo ours at the gateway
            await self._gateway.delete_method(m)
            raise PaymentError(
                "payment_method_exists",
                "the account already has a payment method; delete it before saving another",
            )
        return m

    async def saved_method(self, account_id: str) -> SavedMethod | None:
        return await self._store.method(account_id)

    async def delete_method(self, account_id: str) -> bool:
        m = await self.saved_method(account_id)
        if m is None:
            return False
        await self._gateway.delete_method(m)
        await self._store.remove_method(account_id)
        return True

    # -- manual top-ups ------------------------------------------------------------------------

    async def top_up(self, account_id: str, amount: int, payment_id: str) -> Payment:
        """Charge the saved method ``amount`` now and credit what it captured. Idempotent on
        ``payment_id`` in the account: a retry answers the first payment (and finishes it if it
        was cut off); another account's payment of the same id is never seen.
        Raises ``PolicyRefusal`` (nothing charged) or ``PaymentError``."""
        return await self._manual(account_id, amount, payment_id, limits=True)

    async def pay_invoice(self, account_id: str, amount: int, payment_id: str) -> Payment:
        """``top_up`` for an invoice's amount (``enforcement.invoices``): what is owed is
        charged as it is, so the top-up minimum and the new-account limits do not apply (they
        bound money put in ahead, not money due)."""
        return await self._manual(account_id, amount, payment_id, limits=False)

    async def _manual(
        self, account_id: str, amount: int, payment_id: str, *, limits: bool
    ) -> Payment:
        if is_auto_payment_id(account_id, payment_id):
            # The account's auto-recharges are named in its own id space: a top-up that took
            # one of those ids would answer as that recharge, or leave a trigger's attempt
            # unable to record its payment, which the worker would retry for ever, holding
            # its partition.
            raise PaymentError(
                "payment_id_reused",
                f"payment ids {account_id}:ar:... are the account's auto-recharges",
            )
        now = self._clock()
        async with self._store.locked(account_id) as conn:  # 1. decide and record, locked
            prior = await self._store.payment(account_id, payment_id, conn)
            if prior is not None:
                if prior.amount != amount:
                    raise PaymentError(
                        "payment_id_reused",
                        f"payment {payment_id!r} was made with another amount",
                    )
                p = prior
            else:
                method = await self._store.method(account_id, conn)
                if method is None:
                    raise PaymentError(
                        "no_payment_method", "the account has no saved payment method"
                    )
                if limits:
                    terms, paid_today = await self._terms(conn, account_id, now)
                    policy.check_manual(amount, terms, paid_today, now)
                p = _found(
                    await self._store.add_payment(
                        conn,
                        NewPayment(
                            payment_id,
                            account_id,
                            "manual",
                            amount,
                            self._gateway.name,
                            method_label(method),
                            now,
                        ),
                    )
                )
        if p.status == "pending":
            return await self._settlement.charge(p)
        if p.status == "succeeded" and p.credited_at is None:
            await self._settlement.credit(p)
        return await self._store.current(account_id, p.id)

    async def payments(self, account_id: str, limit: int = 100) -> list[Payment]:
        return await self._store.payments(account_id, limit)

    async def invoices_paid(self, account_id: str) -> dict[str, str]:
        """Payment id -> the invoice it was applied to (Pay Now, invoice auto-pay)."""
        return await self._store.invoices_paid(account_id)

    # -- auto-recharge -------------------------------------------------------------------------

    async def on_trigger(self, account_id: str, seq: int) -> str:
        """A ``recharge.requested`` from the balance scripts. Idempotent per ``(account, seq)``:
        a redelivered trigger attempts nothing new. Returns the attempt's outcome."""
        if not await self._store.account_exists(account_id):
            log.warning("recharge trigger for unknown account %s ignored", account_id)
            return "unknown_account"
        await self._store.add_trigger(account_id, seq, self._clock())
        return await self.attempt(account_id, seq)

    async def attempt(self, account_id: str, seq: int) -> str:
        """Try trigger ``seq`` once if it is open and due: decide, charge, settle."""
        now = self._clock()
        closed = ""
        refused: tuple[policy.AutoDecision, Payment] | None = None
        async with self._store.locked(account_id) as conn:  # 1. decide and record, locked
            trig = await self._store.trigger(conn, account_id, seq)
            if trig is None or trig.status != "open":
                return "not_open"
            pending = await self._store.pending_of(conn, account_id, seq)
            if pending is not None:
                if now - pending.updated_at < self._pending_grace:
                    return "in_flight"  # another worker is charging it right now
                p = pending  # cut off before: finish it with its own key
            else:
                if trig.next_attempt_at > now:
                    return "waiting"
                settings = await self._store.settings(account_id, conn)
                method = await self._store.method(account_id, conn)
                state = await self._balances.get(account_id)
                if settings is None or not settings.enabled:
                    closed = "auto_recharge_off"
                elif method is None:
                    closed = "no_payment_method"
                elif state is None:
                    return "no_balance_state"  # rebuilt by the next event; retried by recover
                elif state.available > settings.threshold_amount:
                    closed = "not_needed"
                if closed:
                    await self._store.end_trigger(conn, account_id, seq, "cancelled", closed)
                else:
                    assert settings is not None and method is not None and state is not None
                    terms, paid_today = await self._terms(conn, account_id, now)
                    d = policy.decide_auto(
                        balance=state.balance,
                        threshold=settings.threshold_amount,
                        recharge=settings.recharge_amount,
                        terms=terms,
                        recent_auto=await self._store.auto_since(
                            conn, account_id, now - policy.WINDOW
                        ),
                        paid_today=paid_today,
                        now=now,
                    )
                    attempt_no = trig.attempts + 1
                    p = _found(
                        await self._store.add_payment(
                            conn,
                            NewPayment(
                                auto_payment_id(account_id, seq, attempt_no),
                                account_id,
                                "auto",
                                d.amount,
                                self._gateway.name,
                                method_label(method),
                                now,
                                trigger_seq=seq,
                                status="pending" if d.action == "charge" else "refused",
                                reason=d.reason,
                                message=d.message,
                            ),
                        )
                    )
                    await self._store.count_attempt(
                        conn, account_id, seq, attempt_no, d.reason or "charging", d.retry_at or now
                    )
                    if d.action == "refuse":
                        refused = (d, p)
                        if d.reason == "recharge_cap_reached":
                            await self._store.set_hold(conn, account_id, "recharge_cap")
        if closed:
            await self._balances.close_recharge_trigger(account_id, seq)
            return closed
        if refused is not None:
            await self._refused(account_id, *refused)
            return refused[0].reason
        return (await self._settlement.charge(p)).status

    async def _refused(self, account_id: str, d: policy.AutoDecision, p: Payment) -> None:
        cap = {
            "recharge_cap_reached": "rolling_24h_count",
            "payment_limit_exceeded": "new_account_daily_amount",
        }.get(d.reason)
        if cap:
            metrics.RECHARGE_CAP_HITS.labels(cap).inc()
        metrics.RECHARGES.labels("capped").inc()
        await self._notify("recharge.refused", account_id, p, d.reason, d.message)
        if d.reason == "recharge_cap_reached":
            # Ten were not enough: something is consuming faster than a day's recharges. Hold
            # outbound calls until an operator looks (resume) or a payment comes in.
            await self._balances.set_status(account_id, "hold", "recharge_cap")
            await self._notify(
                "account.held",
                account_id,
                None,
                "recharge_cap",
                f"held: {policy.MAX_AUTO_RECHARGES} automatic recharges in 24 hours were not"
                " enough; a payment (or the operator) lifts the hold",
            )

    # -- recovery ------------------------------------------------------------------------------

    async def recover(self, limit: int = 100) -> int:
        """Finish what crashes and unknown outcomes left (refunds' too); attempt due triggers.
        Returns how many items it worked on."""
        now = self._clock()
        done = 0
        for p in await self._store.unsettled(now - self._pending_grace, limit):
            if p.status == "pending" and now - p.created_at > UNKNOWN_GIVE_UP:
                await self._settlement.give_up(p)
            elif p.status == "pending":
                await self._settlement.charge(p)
            else:
                await self._settlement.credit(p)
            done += 1
        for account_id, seq in await self._store.due_triggers(now, limit):
            await self.attempt(account_id, seq)
            done += 1
        return done + await self.refunds.recover(limit)

    # -- helpers -------------------------------------------------------------------------------

    async def _terms(self, conn: Conn, account_id: str, now: datetime) -> tuple[AccountTerms, int]:
        """The account's terms and what it paid (or may have) during its current day."""
        terms = await self._store.terms(conn, account_id)
        _, start, end = policy.account_day(terms, now)
        return terms, await self._store.paid_during(conn, account_id, start, end)
