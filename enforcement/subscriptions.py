"""Plans as subscriptions (docs/design/subscriptions.md): each account's plan as something
bought, its periods and their fees, upgrades and downgrades, and what a subscriber sees of the
period (seeds 001 and 004). The only writer of ``subscriptions`` and ``subscription_periods``.

A period is a calendar month (UTC), as the plan's included minutes always were. At its start
(``Subscriptions.begin_period``, run by ``meter run billing``'s tick, or by the first change
of a new subscription) the plan's fee is taken once per account and period, from the balance
like any charge (below the auto-recharge threshold, below zero if need be), and the period's
allowance is put in the minute bucket, which also resumes an account held for money alone that
now has minutes. Rules:

- **A new subscription's first period is charged in full**, whatever the day (as a number's
  month is), with the whole allowance.
- **An upgrade** (a plan with a higher monthly fee) takes effect at once: the difference of the
  fees, prorated by the seconds left in the period and rounded up to the micro-unit, is taken
  now (refused whole, 409, when the available credit does not cover it), and the difference of
  the allowances is added to the period's minutes at once, whole.
- **A downgrade** (any other change) takes effect at the next period's start: the current
  period keeps its plan, its minutes and its fee; nothing is refunded.
- A **trial** period (one starting before ``trial_until``) is charged no fee.
- **Pay-As-You-Go** plans charge no fee: extensions, DIDs and minutes at their rates are the
  whole price, shown as the period's estimate.

Each step runs under the subscription's row lock: the ledger is asked first (the fee's event
key), then Redis (``plan.lua``, once per token), then the ledger row and the period's row in one
transaction; a step retried after a crash takes nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Final, Literal

import asyncpg

from balance.errors import BalanceStoreError
from balance.protocol import BalanceStore
from enforcement.numbers import month_of, next_period, period_start
from infra.clock import Clock, system_clock
from infra.ledger import Conn, Ledger, PostgresLedger, UsageRow, credit_key
from infra.metrics import SUBSCRIPTION_STEPS
from rating.plans import parse_bucket

log = logging.getLogger(__name__)

SUBSCRIPTIONS_SOURCE: Final = "urn:meter:subscriptions"
BillingModel = Literal["flat_rate", "payg"]
SubscriptionStatus = Literal["active", "trial", "suspended"]


class SubscriptionError(Exception):
    """A change that was not made: ``code`` for the API (``unknown_plan``, ``plan_not_on_sale``,
    ``insufficient_credit``, ``unknown_account``), ``field`` it is about."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True, slots=True)
class Tier:
    """A plan as sold: see migration 0014."""

    id: str
    name: str
    description: str
    billing_model: BillingModel
    monthly_fee: int
    included_s: int
    included_dids: int
    included_extensions: int
    did_rate: int
    extension_rate: int
    max_concurrent_calls: int
    on_sale: bool


_TIER: Final = (
    "id, name, description, billing_model, monthly_fee, included_s, included_dids,"
    " included_extensions, did_rate, extension_rate, max_concurrent_calls, on_sale"
)


def _tier(r: asyncpg.Record) -> Tier:
    return Tier(**{f.name: r[f.name] for f in fields(Tier)})


async def tiers(pool: asyncpg.Pool, *, on_sale: bool = True) -> list[Tier]:
    """The plans (on sale only, unless told), cheapest first."""
    rows = await pool.fetch(
        f"SELECT {_TIER} FROM plans WHERE ($1::bool IS NULL OR on_sale = $1)"
        " ORDER BY monthly_fee, id",
        True if on_sale else None,
    )
    return [_tier(r) for r in rows]


async def tier(conn: asyncpg.Pool | Conn, plan_id: str) -> Tier | None:
    r = await conn.fetchrow(f"SELECT {_TIER} FROM plans WHERE id = $1", plan_id)
    return None if r is None else _tier(r)


def period_bounds(period: str) -> tuple[datetime, datetime]:
    return period_start(period), period_start(next_period(period))


def prorated(amount: int, left_s: int, whole_s: int) -> int:
    """``amount * left_s / whole_s`` rounded up to the micro-unit (integers only)."""
    return -(-amount * left_s // whole_s)


def percent(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage with two decimals ("26.06"); "0.00" of nothing."""
    if whole <= 0:
        return "0.00"
    q = (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"{q:.2f}"


@dataclass(frozen=True, slots=True)
class Period:
    period: str
    start: datetime
    end: datetime
    plan_id: str
    included_s: int
    fee: int


@dataclass(frozen=True, slots=True)
class Summary:
    """What the seeds' Subscription Summary and Usage This Period show (``GET .../subscription``).
    Seconds and micro-units; ``minutes_reserved_s``: held by calls in flight, apart from used."""

    account_id: str
    plan: Tier
    next_plan: Tier | None
    status: SubscriptionStatus
    started_at: datetime
    trial_until: datetime | None
    period: Period
    next_invoice_date: datetime
    minutes_included_s: int
    minutes_used_s: int
    minutes_reserved_s: int
    minutes_remaining_s: int
    percent_used: str
    dids_used: int
    extensions_used: int
    calls_billed_s: int  # billed seconds of the period's calls (PAYG's minutes)
    calls_amount: int  # what the period's calls cost in money (overage, or PAYG's minutes)
    dids_amount: int  # DIDs beyond what is included (all of them under PAYG) x rate
    extensions_amount: int
    accruing: int  # flat rate: the overage accruing; PAYG: the period's estimated total


def _fee_row(account_id: str, event_id: str, plan_id: str, fee: int, at: datetime) -> UsageRow:
    return (
        credit_key(account_id, event_id),
        account_id,
        "subscription",
        -fee,
        1,
        plan_id,
        f"{plan_id}:{event_id.split(':', 1)[1]}",
        at,
        SUBSCRIPTIONS_SOURCE,
        event_id,
        None,
        0,
        "",
        "",
        "",
        "",
    )


class Subscriptions:
    """Subscriptions on the balance store, the ledger and PostgreSQL, at ``clock``'s time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        balances: BalanceStore,
        *,
        clock: Clock = system_clock,
        ledger: Ledger | None = None,
    ) -> None:
        self._pool = pool
        self._balances = balances
        self._clock = clock
        self._ledger = ledger or PostgresLedger(pool)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)

    async def _locked(self, conn: Conn, account_id: str, now: datetime) -> asyncpg.Record | None:
        """The subscription's row, locked; one is made for an account that has a plan and no
        subscription yet (accounts created with a plan, before subscriptions existed)."""
        await conn.execute(
            "INSERT INTO subscriptions (account_id, plan_id, started_at, updated_at)"
            " SELECT id, plan_id, created_at, $2 FROM accounts"
            " WHERE id = $1 AND plan_id IS NOT NULL ON CONFLICT DO NOTHING",
            account_id,
            now,
        )
        return await conn.fetchrow(
            "SELECT * FROM subscriptions WHERE account_id = $1 FOR UPDATE", account_id
        )

    async def _period(self, conn: Conn, account_id: str, period: str) -> Period | None:
        r = await conn.fetchrow(
            "SELECT plan_id, included_s, fee FROM subscription_periods"
            " WHERE account_id = $1 AND period = $2",
            account_id,
            period,
        )
        if r is None:
            return None
        start, end = period_bounds(period)
        return Period(period, start, end, r["plan_id"], r["included_s"], r["fee"])

    async def _set_plan(self, conn: Conn, account_id: str, plan: Tier, now: datetime) -> None:
        await conn.execute(
            "UPDATE subscriptions SET plan_id = $2, next_plan_id = NULL, updated_at = $3"
            " WHERE account_id = $1",
            account_id,
            plan.id,
            now,
        )
        # The plan rating reads (the included minutes of calls charged from now on).
        await conn.execute("UPDATE accounts SET plan_id = $2 WHERE id = $1", account_id, plan.id)
        # And its concurrent-call limit, for new calls from now on (calls up are not cut).
        await self._balances.set_call_limit(account_id, plan.max_concurrent_calls)

    async def _begin(self, conn: Conn, sub: asyncpg.Record, now: datetime) -> str:
        """The current period begun, under the row lock: ``begun``, ``current`` (it was),
        ``ignored`` (no balance state)."""
        account_id = sub["account_id"]
        period = month_of(now)
        if await self._period(conn, account_id, period) is not None:
            return "current"
        plan_id = sub["next_plan_id"] or sub["plan_id"]
        plan = await tier(conn, plan_id)
        assert plan is not None  # a foreign key
        start, end = period_bounds(period)
        trial = sub["trial_until"] is not None and start < sub["trial_until"]
        fee = plan.monthly_fee if plan.billing_model == "flat_rate" and not trial else 0
        event_id = f"subscription:{period}"
        if not (fee and await self._ledger.existing([credit_key(account_id, event_id)])):
            out = await self._balances.plan_step(
                account_id,
                f"s{period}",
                fee=fee,
                included_s=plan.included_s,
                period=(int(start.timestamp()), int(end.timestamp())),
                now_s=int(now.timestamp()),
            )
            if out.result == "unknown_account":
                return "ignored"
            if fee:
                await self._ledger.record_fee(
                    conn, _fee_row(account_id, event_id, plan.id, fee, now)
                )
        if plan.id != sub["plan_id"]:
            await self._set_plan(conn, account_id, plan, now)
        await conn.execute(
            "INSERT INTO subscription_periods (account_id, period, plan_id, included_s, fee,"
            " begun_at) VALUES ($1, $2, $3, $4, $5, $6)",
            account_id,
            period,
            plan.id,
            plan.included_s,
            fee,
            now,
        )
        return "begun"

    async def begin_period(self, account_id: str) -> str:
        """Begin the clock's period for one account (see ``_begin``); ``ignored`` when it has
        no subscription."""
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            sub = await self._locked(conn, account_id, now)
            outcome = "ignored" if sub is None else await self._begin(conn, sub, now)
        SUBSCRIPTION_STEPS.labels(outcome).inc()
        return outcome

    async def due(self, *, limit: int = 1000, after: str = "") -> list[str]:
        """Accounts with a plan whose clock period has not begun, in id order after ``after``."""
        rows = await self._pool.fetch(
            "SELECT a.id FROM accounts a WHERE a.plan_id IS NOT NULL AND a.id > $2"
            " AND NOT EXISTS (SELECT 1 FROM subscription_periods p"
            "  WHERE p.account_id = a.id AND p.period = $1)"
            " ORDER BY a.id LIMIT $3",
            month_of(self._now()),
            after,
            limit,
        )
        return [r[0] for r in rows]

    async def tick(self, *, batch: int = 1000) -> dict[str, int]:
        """Begin the period of every account that has not begun it; the count of outcomes."""
        counts: dict[str, int] = {}
        after = ""
        while True:
            todo = await self.due(limit=batch, after=after)
            for account_id in todo:
                try:
                    outcome = await self.begin_period(account_id)
                except (asyncpg.PostgresError, OSError, TimeoutError, BalanceStoreError) as exc:
                    log.warning("subscriptions: %s not begun: %r", account_id, exc)
                    SUBSCRIPTION_STEPS.labels("failed").inc()
                    outcome = "failed"
                counts[outcome] = counts.get(outcome, 0) + 1
            if len(todo) < batch:
                return counts
            after = todo[-1]

    async def change(
        self, account_id: str, plan_id: str | None = None, *, extensions: int | None = None
    ) -> str:
        """Subscribe, upgrade or downgrade (see the module docstring), and/or set the
        extensions used. Returns what happened to the plan: ``subscribed``, ``upgraded``,
        ``downgrade_scheduled``, ``unchanged``. Raises ``SubscriptionError``."""
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
                raise SubscriptionError("unknown_account", f"no account {account_id!r}")
            new = None if plan_id is None else await tier(conn, plan_id)
            if plan_id is not None and new is None:
                raise SubscriptionError("unknown_plan", f"no plan {plan_id!r}", "plan_id")
            sub = await self._locked(conn, account_id, now)
            outcome = "unchanged"
            if sub is None:
                if new is None:
                    raise SubscriptionError(
                        "no_subscription", "the account has no plan: give plan_id", "plan_id"
                    )
                if not new.on_sale:
                    raise SubscriptionError(
                        "plan_not_on_sale", f"plan {new.id!r} is not on sale", "plan_id"
                    )
                await conn.execute(
                    "INSERT INTO subscriptions (account_id, plan_id, started_at, updated_at)"
                    " VALUES ($1, $2, $3, $3)",
                    account_id,
                    new.id,
                    now,
                )
                await conn.execute(
                    "UPDATE accounts SET plan_id = $2 WHERE id = $1", account_id, new.id
                )
                await self._balances.set_call_limit(account_id, new.max_concurrent_calls)
                sub = await self._locked(conn, account_id, now)
                assert sub is not None
                await self._begin(conn, sub, now)
                outcome = "subscribed"
            elif new is not None:
                outcome = await self._change_plan(conn, sub, new, now)
            if extensions is not None:
                await conn.execute(
                    "UPDATE subscriptions SET extensions = $2, updated_at = $3"
                    " WHERE account_id = $1",
                    account_id,
                    extensions,
                    now,
                )
        SUBSCRIPTION_STEPS.labels(outcome).inc()
        return outcome

    async def _change_plan(self, conn: Conn, sub: asyncpg.Record, new: Tier, now: datetime) -> str:
        account_id = sub["account_id"]
        if new.id == sub["plan_id"]:
            if sub["next_plan_id"] is not None:  # a scheduled downgrade called off
                await self._set_plan(conn, account_id, new, now)
            return "unchanged"
        if not new.on_sale:
            raise SubscriptionError(
                "plan_not_on_sale", f"plan {new.id!r} is not on sale", "plan_id"
            )
        await self._begin(conn, sub, now)  # the period the change is made in, begun first
        period = await self._period(conn, account_id, month_of(now))
        assert period is not None
        old = await tier(conn, period.plan_id)
        assert old is not None
        if new.monthly_fee <= old.monthly_fee:
            await conn.execute(
                "UPDATE subscriptions SET next_plan_id = $2, updated_at = $3 WHERE account_id = $1",
                account_id,
                new.id,
                now,
            )
            return "downgrade_scheduled"
        trial = sub["trial_until"] is not None and period.start < sub["trial_until"]
        whole_s = int((period.end - period.start).total_seconds())
        left_s = int((period.end - now).total_seconds())
        fee = 0
        if new.billing_model == "flat_rate" and not trial:
            fee = prorated(
                new.monthly_fee - (old.monthly_fee if old.billing_model == "flat_rate" else 0),
                left_s,
                whole_s,
            )
        add_s = max(0, new.included_s - period.included_s)
        event_id = f"upgrade:{period.period}:{new.id}"
        if not (fee and await self._ledger.existing([credit_key(account_id, event_id)])):
            out = await self._balances.plan_step(
                account_id,
                f"u{period.period}:{new.id}",
                fee=fee,
                included_s=period.included_s + add_s,
                period=(int(period.start.timestamp()), int(period.end.timestamp())),
                add_s=add_s,
                cover=True,
                now_s=int(now.timestamp()),
            )
            if out.result == "insufficient_credit":
                raise SubscriptionError(
                    "insufficient_credit",
                    "the available credit does not cover the upgrade's prorated fee",
                )
            if out.result == "unknown_account":
                raise SubscriptionError("unknown_account", f"no balance for {account_id!r}")
            if fee:
                await self._ledger.record_fee(
                    conn, _fee_row(account_id, event_id, new.id, fee, now)
                )
        await conn.execute(
            "UPDATE subscription_periods SET plan_id = $3, included_s = included_s + $4,"
            " fee = fee + $5 WHERE account_id = $1 AND period = $2",
            account_id,
            period.period,
            new.id,
            add_s,
            fee,
        )
        await self._set_plan(conn, account_id, new, now)
        return "upgraded"

    async def summary(self, account_id: str) -> Summary | None:
        """The subscription as its subscriber sees it now; None when the account has none.
        Minutes come from the balance store (real time), calls from the ledger."""
        now = self._now()
        period_name = month_of(now)
        async with self._pool.acquire() as conn:
            sub = await conn.fetchrow(
                "SELECT s.*, a.suspended FROM subscriptions s JOIN accounts a"
                " ON a.id = s.account_id WHERE s.account_id = $1",
                account_id,
            )
            if sub is None:
                return None
            period = await self._period(conn, account_id, period_name)
            plan = await tier(conn, period.plan_id if period else sub["plan_id"])
            assert plan is not None
            nxt = None if sub["next_plan_id"] is None else await tier(conn, sub["next_plan_id"])
            start, end = period_bounds(period_name)
            if period is None:
                period = Period(period_name, start, end, plan.id, plan.included_s, 0)
            calls = await conn.fetchrow(
                "SELECT coalesce(sum(quantity), 0)::bigint AS billed,"
                " coalesce(-sum(amount), 0)::bigint AS amount"
                " FROM ledger WHERE account_id = $1 AND kind = 'call'"
                " AND event_time >= $2 AND event_time < $3",
                account_id,
                start,
                end,
            )
            assert calls is not None  # an aggregate: one row
            dids = await conn.fetchval(
                "SELECT count(*) FROM numbers WHERE account_id = $1 AND status <> 'released'",
                account_id,
            )
        bucket = parse_bucket(await self._balances.bucket(account_id))
        grant = next((g for g in bucket if g.id == f"p{int(start.timestamp())}"), None)
        included = period.included_s
        used = 0 if grant is None else max(0, included - grant.remaining_s)
        reserved = sum((await self._balances.held_seconds(account_id)).values())
        remaining = max(0, included - used - reserved)
        status: SubscriptionStatus = "active"
        if sub["suspended"]:
            status = "suspended"
        elif sub["trial_until"] is not None and now < sub["trial_until"]:
            status = "trial"
        payg = plan.billing_model == "payg"
        extensions = sub["extensions"]
        extra_dids = dids if payg else max(0, dids - plan.included_dids)
        extra_ext = extensions if payg else max(0, extensions - plan.included_extensions)
        dids_amount = extra_dids * plan.did_rate
        ext_amount = extra_ext * plan.extension_rate
        return Summary(
            account_id=account_id,
            plan=plan,
            next_plan=nxt,
            status=status,
            started_at=sub["started_at"],
            trial_until=sub["trial_until"],
            period=period,
            next_invoice_date=end,
            minutes_included_s=included,
            minutes_used_s=used,
            minutes_reserved_s=reserved,
            minutes_remaining_s=remaining,
            percent_used=percent(used, included),
            dids_used=dids,
            extensions_used=extensions,
            calls_billed_s=calls["billed"],
            calls_amount=calls["amount"],
            dids_amount=dids_amount,
            extensions_amount=ext_amount,
            accruing=calls["amount"] + dids_amount + ext_amount,
        )
