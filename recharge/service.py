"""Payments: manual top-ups, auto-recharge triggers, and the settlement of what a card paid.

Order of writes, so that a crash anywhere leaves exactly one charge and exactly one credit:

1. Decide under a per-account advisory lock (the rules of ``recharge.policy`` read the
   account's payments), and record the payment as ``pending`` with its id, which is also the
   gateway's idempotency key. Nothing has been charged yet.
2. Charge the gateway with that key. A timeout or 5xx is ``OutcomeUnknown``: the same key is
   retried (here, then by ``recover``), so the card is charged at most once per payment.
3. Settle in one PostgreSQL transaction: the payment ``succeeded`` with what was captured, and
   the ledger's credit row (idempotent on the payment id).
4. Credit the Redis balance (idempotent on the payment id), then mark the payment credited.

``recover`` (run every few seconds by the recharge worker) finishes whatever a crash or an
unknown outcome left: pending payments are charged again with their own key, settled ones not
yet in Redis are credited, triggers whose back-off is over are attempted again.

Only ``captured`` is ever credited, never the amount asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

import asyncpg

from balance.protocol import BalanceStore
from contracts.money import format_money
from contracts.payments import PAYMENTS_SOURCE, Notification, NotificationData, NotificationType
from infra import metrics
from infra.clock import datetime_clock, system_clock
from infra.ledger import credit_key
from recharge import policy
from recharge.gateway import (
    ChargeRequest,
    ChargeResult,
    GatewayUnavailable,
    OutcomeUnknown,
    PaymentGateway,
    SavedMethod,
)
from recharge.policy import AccountTerms

log = logging.getLogger(__name__)

#: A pending payment is given up (left for an operator) this long after it was created.
UNKNOWN_GIVE_UP: Final = timedelta(hours=23)
#: In-process retries of an unknown outcome before the payment is left to ``recover``.
_UNKNOWN_RETRIES: Final = (0.2, 1.0)


class Notifier(Protocol):
    async def notify(self, notification: Notification) -> None: ...


class LogNotifier:
    """Notifications as log lines: for a process without a broker (the API, whose caller
    hears the outcome of a top-up in the answer)."""

    async def notify(self, notification: Notification) -> None:
        log.info("%s %s: %s", notification.type, notification.subject, notification.data.message)


class PaymentError(Exception):
    """A request about payments that cannot be done; ``code`` is the API error code."""

    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class RechargeSettings:
    enabled: bool
    threshold_amount: int
    recharge_amount: int
    disabled_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Payment:
    id: str
    account_id: str
    kind: str  # auto | manual
    trigger_seq: int | None
    amount: int
    captured: int
    currency: str
    status: str  # pending | succeeded | declined | failed | refused
    reason: str
    message: str
    gateway: str
    gateway_ref: str
    method: str
    created_at: datetime
    credited_at: datetime | None

    @classmethod
    def of(cls, r: asyncpg.Record | None) -> Payment:
        if r is None:  # an INSERT ... SELECT FROM accounts found no account
            raise PaymentError("account_not_found", "no such account", 404)
        return cls(
            r["id"],
            r["account_id"],
            r["kind"],
            r["trigger_seq"],
            r["amount"],
            r["captured"],
            r["currency"],
            r["status"],
            r["reason"],
            r["message"],
            r["gateway"],
            r["gateway_ref"],
            r["method"],
            r["created_at"],
            r["credited_at"],
        )


async def _lock(conn: Any, account_id: str) -> None:
    # Serialises every payment decision of one account (API processes and recharge workers).
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('payments:' || $1, 0))", account_id
    )


def _method_label(m: asyncpg.Record) -> str:
    return f"{m['brand']} {m['last4']}".strip() or m["method_ref"]


class PaymentService:
    """Everything that moves money into an account. Safe to run in several processes."""

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
    ) -> None:
        self._pool = pool
        self._balances = balances
        self._gateway = gateway
        self._notifier = notifier
        self._backoff = tuple(backoff_s) or (300.0,)
        self._max_declines = max_declines
        # A pending payment younger than this may be another process's charge in flight
        # (each try bounded by the gateway's timeout): ``recover`` leaves it alone until then.
        self._pending_grace = timedelta(
            seconds=charge_timeout_s * (len(_UNKNOWN_RETRIES) + 1) + sum(_UNKNOWN_RETRIES) + 5
        )
        # The default is infra.clock's, the one wall clock every calendar decision reads.
        self._clock = clock or datetime_clock(system_clock)
        self._sleep = sleep

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
        if enabled:
            # Retries now follow the new settings; the trigger a low account fires below
            # starts afresh.
            await self._pool.execute(
                "UPDATE recharge_triggers SET status = 'cancelled',"
                " last_outcome = 'settings_changed', updated_at = now()"
                " WHERE account_id = $1 AND status = 'open'",
                account_id,
            )
        await self._balances.set_auto_recharge(account_id, threshold if enabled else None)
        return RechargeSettings(enabled, threshold, amount)

    async def auto_recharge(self, account_id: str) -> RechargeSettings | None:
        r = await self._pool.fetchrow(
            "SELECT * FROM auto_recharge WHERE account_id = $1", account_id
        )
        if r is None:
            return None
        return RechargeSettings(
            r["enabled"], r["threshold_amount"], r["recharge_amount"], r["disabled_reason"]
        )

    async def save_method(self, account_id: str, token: str) -> SavedMethod:
        """One method per account: 409 ``payment_method_exists`` while one is saved."""
        if await self._pool.fetchval(
            "SELECT 1 FROM payment_methods WHERE account_id = $1", account_id
        ):
            raise PaymentError(
                "payment_method_exists",
                "the account already has a payment method; delete it before saving another",
            )
        try:
            m = await self._gateway.save_method(account_id, token)
        except GatewayUnavailable as exc:
            raise PaymentError("payment_method_refused", str(exc), 422) from exc
        inserted = await self._pool.fetchval(
            "INSERT INTO payment_methods (account_id, gateway, customer_ref, method_ref, brand,"
            " last4) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1",
            account_id,
            self._gateway.name,
            m.customer_ref,
            m.method_ref,
            m.brand,
            m.last4,
        )
        if not inserted:  # another request saved one meanwhile: undo ours at the gateway
            await self._gateway.delete_method(m)
            raise PaymentError(
                "payment_method_exists",
                "the account already has a payment method; delete it before saving another",
            )
        return m

    async def saved_method(self, account_id: str) -> SavedMethod | None:
        r = await self._pool.fetchrow(
            "SELECT * FROM payment_methods WHERE account_id = $1", account_id
        )
        if r is None:
            return None
        return SavedMethod(r["customer_ref"], r["method_ref"], r["brand"], r["last4"])

    async def delete_method(self, account_id: str) -> bool:
        m = await self.saved_method(account_id)
        if m is None:
            return False
        await self._gateway.delete_method(m)
        await self._pool.execute("DELETE FROM payment_methods WHERE account_id = $1", account_id)
        return True

    # -- manual top-ups ------------------------------------------------------------------------

    async def top_up(self, account_id: str, amount: int, payment_id: str) -> Payment:
        """Charge the saved method ``amount`` now and credit what it captured. Idempotent on
        ``payment_id``: a retry answers the first payment (and finishes it if it was cut off).
        Raises ``PolicyRefusal`` (nothing charged) or ``PaymentError``."""
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            await _lock(conn, account_id)
            prior = await conn.fetchrow("SELECT * FROM payments WHERE id = $1", payment_id)
            if prior is not None:
                if prior["account_id"] != account_id or prior["amount"] != amount:
                    raise PaymentError(
                        "payment_id_reused",
                        f"payment {payment_id!r} was made with another account or amount",
                    )
                p = Payment.of(prior)
            else:
                method = await conn.fetchrow(
                    "SELECT * FROM payment_methods WHERE account_id = $1", account_id
                )
                if method is None:
                    raise PaymentError(
                        "no_payment_method", "the account has no saved payment method"
                    )
                terms, paid_today = await self._terms(conn, account_id, now)
                policy.check_manual(amount, terms, paid_today, now)
                p = Payment.of(
                    await conn.fetchrow(
                        "INSERT INTO payments (id, account_id, kind, amount, currency, status,"
                        " gateway, method, created_at, updated_at)"
                        " SELECT $1, $2, 'manual', $3, currency, 'pending', $4, $5, $6, $6"
                        " FROM accounts WHERE id = $2 RETURNING *",
                        payment_id,
                        account_id,
                        amount,
                        self._gateway.name,
                        _method_label(method),
                        now,
                    )
                )
        if p.status == "pending":
            return await self._charge(p)
        if p.status == "succeeded" and p.credited_at is None:
            await self._credit(p)
        return await self._payment(p.id)

    async def payments(self, account_id: str, limit: int = 100) -> list[Payment]:
        rows = await self._pool.fetch(
            "SELECT * FROM payments WHERE account_id = $1 ORDER BY created_at DESC, id LIMIT $2",
            account_id,
            limit,
        )
        return [Payment.of(r) for r in rows]

    # -- auto-recharge -------------------------------------------------------------------------

    async def on_trigger(self, account_id: str, seq: int) -> str:
        """A ``recharge.requested`` from the balance scripts. Idempotent per ``(account, seq)``:
        a redelivered trigger attempts nothing new. Returns the attempt's outcome."""
        exists = await self._pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id)
        if not exists:
            log.warning("recharge trigger for unknown account %s ignored", account_id)
            return "unknown_account"
        await self._pool.execute(
            "INSERT INTO recharge_triggers (account_id, seq, next_attempt_at) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            account_id,
            seq,
            self._clock(),
        )
        return await self.attempt(account_id, seq)

    async def attempt(self, account_id: str, seq: int) -> str:
        """Try trigger ``seq`` once if it is open and due: decide, charge, settle."""
        now = self._clock()
        closed = ""
        refused: tuple[policy.AutoDecision, Payment] | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            await _lock(conn, account_id)
            trig = await conn.fetchrow(
                "SELECT * FROM recharge_triggers WHERE account_id = $1 AND seq = $2",
                account_id,
                seq,
            )
            if trig is None or trig["status"] != "open":
                return "not_open"
            pending = await conn.fetchrow(
                "SELECT * FROM payments WHERE account_id = $1 AND trigger_seq = $2"
                " AND status = 'pending'",
                account_id,
                seq,
            )
            if pending is not None:
                if now - pending["updated_at"] < self._pending_grace:
                    return "in_flight"  # another worker is charging it right now
                p = Payment.of(pending)  # cut off before: finish it with its own key
            else:
                if trig["next_attempt_at"] > now:
                    return "waiting"
                settings = await conn.fetchrow(
                    "SELECT * FROM auto_recharge WHERE account_id = $1", account_id
                )
                method = await conn.fetchrow(
                    "SELECT * FROM payment_methods WHERE account_id = $1", account_id
                )
                state = await self._balances.get(account_id)
                if settings is None or not settings["enabled"]:
                    closed = "auto_recharge_off"
                elif method is None:
                    closed = "no_payment_method"
                elif state is None:
                    return "no_balance_state"  # rebuilt by the next event; retried by recover
                elif state.available > settings["threshold_amount"]:
                    closed = "not_needed"
                if closed:
                    await self._end_trigger(conn, account_id, seq, "cancelled", closed)
                else:
                    assert settings is not None and method is not None and state is not None
                    terms, paid_today = await self._terms(conn, account_id, now)
                    recent = await conn.fetch(
                        "SELECT created_at FROM payments WHERE account_id = $1 AND kind = 'auto'"
                        " AND status IN ('pending', 'succeeded') AND created_at > $2",
                        account_id,
                        now - policy.WINDOW,
                    )
                    d = policy.decide_auto(
                        balance=state.balance,
                        threshold=settings["threshold_amount"],
                        recharge=settings["recharge_amount"],
                        terms=terms,
                        recent_auto=[r["created_at"] for r in recent],
                        paid_today=paid_today,
                        now=now,
                    )
                    attempt_no = trig["attempts"] + 1
                    p = Payment.of(
                        await conn.fetchrow(
                            "INSERT INTO payments (id, account_id, kind, trigger_seq, amount,"
                            " currency, status, reason, message, gateway, method, created_at,"
                            " updated_at) SELECT $1, $2, 'auto', $3, $4, currency, $5, $6, $7, $8,"
                            " $9, $10, $10 FROM accounts WHERE id = $2 RETURNING *",
                            f"{account_id}:ar:{seq}:{attempt_no}",
                            account_id,
                            seq,
                            d.amount,
                            "pending" if d.action == "charge" else "refused",
                            d.reason,
                            d.message,
                            self._gateway.name,
                            _method_label(method),
                            now,
                        )
                    )
                    await conn.execute(
                        "UPDATE recharge_triggers SET attempts = $3, last_outcome = $4,"
                        " next_attempt_at = $5, updated_at = now()"
                        " WHERE account_id = $1 AND seq = $2",
                        account_id,
                        seq,
                        attempt_no,
                        d.reason or "charging",
                        d.retry_at or now,
                    )
                    if d.action == "refuse":
                        refused = (d, p)
                        if d.reason == "recharge_cap_reached":
                            await conn.execute(
                                "UPDATE accounts SET hold_reason = 'recharge_cap' WHERE id = $1",
                                account_id,
                            )
        if closed:
            await self._balances.close_recharge_trigger(account_id, seq)
            return closed
        if refused is not None:
            await self._refused(account_id, *refused)
            return refused[0].reason
        return (await self._charge(p)).status

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
                " enough; resume the account or make a payment to lift the hold",
            )

    async def _end_trigger(
        self, conn: Any, account_id: str, seq: int, status: str, outcome: str
    ) -> None:
        await conn.execute(
            "UPDATE recharge_triggers SET status = $3, last_outcome = $4, updated_at = now()"
            " WHERE account_id = $1 AND seq = $2",
            account_id,
            seq,
            status,
            outcome,
        )

    # -- charging and settling -----------------------------------------------------------------

    async def _charge(self, p: Payment) -> Payment:
        method = await self.saved_method(p.account_id)
        if method is None:
            return await self._failed(p, "no_payment_method", "the payment method was deleted")
        req = ChargeRequest(
            account_id=p.account_id,
            amount=p.amount,
            currency=p.currency,
            customer_ref=method.customer_ref,
            method_ref=method.method_ref,
            idempotency_key=p.id,
            description=("auto-recharge" if p.kind == "auto" else "top-up") + f" {p.id}",
        )
        result: ChargeResult | None = None
        for delay in (*_UNKNOWN_RETRIES, None):
            try:
                result = await self._gateway.charge(req)
                break
            except OutcomeUnknown as exc:
                if delay is None:
                    log.warning("payment %s: outcome unknown, left to recover: %s", p.id, exc)
                    # updated_at paces recover's retries (one per grace period)
                    await self._pool.execute(
                        "UPDATE payments SET updated_at = $2, message = $3"
                        " WHERE id = $1 AND status = 'pending'",
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
        now = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE payments SET status = 'succeeded', captured = $2, gateway_ref = $3,"
                " reason = '', message = '', updated_at = $4 WHERE id = $1 AND status = 'pending'"
                " RETURNING *",
                p.id,
                result.captured,
                result.gateway_ref,
                now,
            )
            if row is None:  # settled by another process meanwhile
                return await self._payment(p.id)
            await conn.execute(
                "INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, rate_ref,"
                " event_time, source, event_id)"
                " VALUES ($1, $2, 'credit', $3, 0, $4, $5, $6, $7, $4)"
                " ON CONFLICT DO NOTHING",
                credit_key(p.account_id, "payment:" + p.id),
                p.account_id,
                result.captured,
                p.id,
                f"{p.gateway}:{result.gateway_ref}",
                now,
                PAYMENTS_SOURCE,
            )
            await conn.execute("UPDATE accounts SET hold_reason = NULL WHERE id = $1", p.account_id)
            if p.trigger_seq is not None:
                await self._end_trigger(conn, p.account_id, p.trigger_seq, "done", "succeeded")
        settled = Payment.of(row)
        metrics.RECHARGES.labels("succeeded").inc()
        await self._credit(settled)
        await self._notify("payment.succeeded", p.account_id, settled, "", "")
        return await self._payment(p.id)

    async def _credit(self, p: Payment) -> None:
        """The ledger has the payment's credit row: put the money in the Redis balance."""
        now_s = int(self._clock().timestamp())
        out = await self._balances.credit(
            p.account_id, "payment:" + p.id, p.captured, payment=True, now_s=now_s
        )
        if not out.found:
            # Redis lost the account: rebuilt from the ledger, which already holds this credit.
            from balance.accounts import load_into_redis

            await load_into_redis(self._pool, self._balances, [p.account_id], now=now_s)
        if p.trigger_seq is not None:
            await self._balances.close_recharge_trigger(p.account_id, p.trigger_seq)
        await self._pool.execute(
            "UPDATE payments SET credited_at = now() WHERE id = $1 AND credited_at IS NULL", p.id
        )

    async def _declined(self, p: Payment, result: ChargeResult) -> Payment:
        now = self._clock()
        disabled = False
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE payments SET status = 'declined', reason = $2, message = $3,"
                " gateway_ref = $4, updated_at = $5 WHERE id = $1 AND status = 'pending'",
                p.id,
                result.decline_code or "declined",
                result.message,
                result.gateway_ref,
                now,
            )
            if p.trigger_seq is not None:
                declines = await conn.fetchval(
                    "UPDATE recharge_triggers SET declines = declines + 1, updated_at = now()"
                    " WHERE account_id = $1 AND seq = $2 RETURNING declines",
                    p.account_id,
                    p.trigger_seq,
                )
                if declines is not None and declines >= self._max_declines:
                    disabled = True
                    await conn.execute(
                        "UPDATE auto_recharge SET enabled = false,"
                        " disabled_reason = 'repeated_declines', updated_at = now()"
                        " WHERE account_id = $1",
                        p.account_id,
                    )
                    await self._end_trigger(
                        conn, p.account_id, p.trigger_seq, "cancelled", "repeated_declines"
                    )
                elif declines is not None:
                    wait = self._backoff[min(declines, len(self._backoff)) - 1]
                    await conn.execute(
                        "UPDATE recharge_triggers SET next_attempt_at = $3, last_outcome = $4"
                        " WHERE account_id = $1 AND seq = $2",
                        p.account_id,
                        p.trigger_seq,
                        now + timedelta(seconds=wait),
                        "declined:" + (result.decline_code or "declined"),
                    )
        metrics.RECHARGES.labels("declined").inc()
        out = await self._payment(p.id)
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
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE payments SET status = 'failed', reason = $2, message = $3,"
                " updated_at = $4 WHERE id = $1 AND status = 'pending'",
                p.id,
                reason,
                message[:500],
                now,
            )
            if p.trigger_seq is not None:
                await conn.execute(
                    "UPDATE recharge_triggers SET next_attempt_at = $3, last_outcome = $4"
                    " WHERE account_id = $1 AND seq = $2",
                    p.account_id,
                    p.trigger_seq,
                    now + timedelta(seconds=self._backoff[0]),
                    reason,
                )
        metrics.RECHARGES.labels("failed").inc()
        out = await self._payment(p.id)
        await self._notify("payment.failed", p.account_id, out, reason, message)
        return out

    # -- recovery ------------------------------------------------------------------------------

    async def recover(self, limit: int = 100) -> int:
        """Finish what crashes and unknown outcomes left; attempt due triggers. Returns how
        many items it worked on."""
        now = self._clock()
        done = 0
        unsettled = await self._pool.fetch(
            "SELECT * FROM payments WHERE (status = 'pending' AND updated_at < $1)"
            " OR (status = 'succeeded' AND credited_at IS NULL) ORDER BY updated_at LIMIT $2",
            now - self._pending_grace,
            limit,
        )
        for r in unsettled:
            p = Payment.of(r)
            if p.status == "pending" and now - p.created_at > UNKNOWN_GIVE_UP:
                await self._give_up(p)
            elif p.status == "pending":
                await self._charge(p)
            else:
                await self._credit(p)
            done += 1
        due = await self._pool.fetch(
            "SELECT account_id, seq FROM recharge_triggers WHERE status = 'open'"
            " AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2",
            now,
            limit,
        )
        for r in due:
            await self.attempt(r["account_id"], r["seq"])
            done += 1
        return done

    async def _give_up(self, p: Payment) -> None:
        """A payment whose outcome stayed unknown for nearly a day (Stripe keeps an idempotency
        key 24 hours, and replays a 500 stored under it): stop retrying, credit nothing, and
        tell an operator to look it up at the gateway by its id. Its trigger is not retried
        either: a new payment id could charge the card a second time."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE payments SET status = 'failed', reason = 'outcome_unknown',"
                " message = $2, updated_at = now() WHERE id = $1 AND status = 'pending'",
                p.id,
                "no answer from the gateway for a day: look up this payment id (its idempotency"
                " key) at the gateway; if it was charged, credit it by hand",
            )
            if p.trigger_seq is not None:
                await self._end_trigger(
                    conn, p.account_id, p.trigger_seq, "cancelled", "outcome_unknown"
                )
        if p.trigger_seq is not None:
            await self._balances.close_recharge_trigger(p.account_id, p.trigger_seq)
        metrics.RECHARGES.labels("failed").inc()
        out = await self._payment(p.id)
        log.error("payment %s: outcome unknown for a day, needs review", p.id)
        await self._notify("payment.failed", p.account_id, out, "outcome_unknown", out.message)

    # -- helpers -------------------------------------------------------------------------------

    async def _terms(self, conn: Any, account_id: str, now: datetime) -> tuple[AccountTerms, int]:
        """The account's terms and what it paid (or may have) during its current day."""
        a = await conn.fetchrow(
            "SELECT created_at, verification_level FROM accounts WHERE id = $1", account_id
        )
        terms = AccountTerms(a["created_at"], a["verification_level"])
        _, start, end = policy.account_day(terms, now)
        paid = await conn.fetchval(
            "SELECT coalesce(sum(CASE WHEN status = 'succeeded' THEN captured ELSE amount END), 0)"
            " FROM payments WHERE account_id = $1 AND status IN ('pending', 'succeeded')"
            " AND created_at >= $2 AND created_at < $3",
            account_id,
            start,
            end,
        )
        return terms, int(paid)

    async def _payment(self, payment_id: str) -> Payment:
        r = await self._pool.fetchrow("SELECT * FROM payments WHERE id = $1", payment_id)
        assert r is not None
        return Payment.of(r)

    async def _notify(
        self,
        type_: NotificationType,
        account_id: str,
        p: Payment | None,
        reason: str,
        message: str,
    ) -> None:
        """Best effort: the payment row is the record; a lost notification is logged."""
        at = self._clock()
        ident = f"{account_id}:{type_}:{p.id if p else at.isoformat()}"
        amount = None
        if p is not None:
            amount = p.captured if p.status == "succeeded" else p.amount
        n = Notification(
            id=ident,
            type=type_,
            time=at,
            subject=account_id,
            data=NotificationData(
                account_id=account_id,
                payment_id=p.id if p else None,
                amount=None if amount is None else format_money(amount),  # type: ignore[arg-type]
                reason=reason,
                message=message,
            ),
        )
        try:
            await self._notifier.notify(n)
        except Exception:
            log.exception("notification %s lost", ident)
