"""Plans as subscriptions on an injected clock, against the real Redis and PostgreSQL (and the
real metering processor for the period's calls): the fee of each period taken once (replays,
two workers at once), the allowance renewed, a held account resumed at the period's start, an
upgrade mid-period and a downgrade exactly as docs/design/subscriptions.md says, a trial, and
the summary's figures against the ledger and the balance store with a call in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from balance.accounts import AccountSpec, PlanSpec, create_accounts, put_plan, put_price_list
from balance.store import RedisBalances
from balance.values import PlanPeriod, Tariff
from enforcement.subscriptions import (
    SubscriptionError,
    Subscriptions,
    percent,
    period_bounds,
    prorated,
)
from infra.clock import SettableClock
from infra.db import create_pool
from infra.settings import Settings
from meter.traffic import call_hangup, demo_price_list
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from rating.plans import parse_bucket
from tests import harness
from tests.helpers import call_record

BASIC = PlanSpec(id="basic", name="Basic", monthly_fee="10.00", included_minutes=100)
PRO = PlanSpec(
    id="pro",
    name="Professional",
    monthly_fee="30.00",
    included_minutes=300,
    included_dids=2,
    included_extensions=5,
    did_rate="1.50",
    extension_rate="4.00",
    max_concurrent_calls=10,
)
FREE = PlanSpec(id="free0", name="Free", monthly_fee="0", included_minutes=0)
MINUTES = PlanSpec(id="mins", name="Minutes", monthly_fee="0", included_minutes=60)
PAYG = PlanSpec(
    id="payg",
    name="Pay As You Go",
    billing_model="payg",
    did_rate="1.00",
    extension_rate="2.00",
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@dataclass
class World:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    clock: SettableClock
    balances: RedisBalances
    subs: Subscriptions

    def at(self, text: str) -> datetime:
        self.clock.set(utc(text))
        return utc(text)

    async def account(self, account_id: str, balance: str, plan: str | None = None) -> None:
        await create_accounts(
            self.pool,
            self.balances,
            [
                AccountSpec.model_validate(
                    {
                        "id": account_id,
                        "price_list_id": "standard",
                        "plan_id": plan,
                        "balance": balance,
                    }
                )
            ],
            clock=self.clock,
        )

    async def fees(self, account_id: str) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(
            "SELECT amount, event_id FROM ledger WHERE account_id = $1 AND kind = 'subscription'"
            " ORDER BY entry_id",
            account_id,
        )
        return [(r[0], r[1]) for r in rows]

    async def balance(self, account_id: str) -> int:
        st = await self.balances.get(account_id)
        assert st is not None
        return st.balance

    async def plan_grant(self, account_id: str, period: str) -> int | None:
        start = int(period_bounds(period)[0].timestamp())
        grants = parse_bucket(await self.balances.bucket(account_id))
        return next((g.remaining_s for g in grants if g.id == f"p{start}"), None)


@pytest.fixture
async def world(db_settings: Settings) -> AsyncIterator[World]:
    pool = await create_pool(db_settings.database_url, max_size=6)
    r = aioredis.Redis.from_url(db_settings.redis_url)
    clock = SettableClock(utc("2026-12-10T09:00:00+00:00"))
    balances = RedisBalances(r, clock=clock)
    await put_price_list(pool, demo_price_list())
    for plan in (BASIC, PRO, FREE, MINUTES, PAYG):
        await put_plan(pool, plan)
    try:
        yield World(pool, r, clock, balances, Subscriptions(pool, balances, clock=clock))
    finally:
        await r.aclose()
        await pool.close()


def test_proration_and_percent_are_exact_integers() -> None:
    assert prorated(20_000_000, 16 * 86_400, 31 * 86_400) == 10_322_581  # rounded up
    assert prorated(3, 1, 3) == 1 and prorated(0, 5, 7) == 0
    assert percent(1_563, 6_000) == "26.05" and percent(15_636, 60_000) == "26.06"
    assert percent(0, 0) == "0.00" and percent(6_000, 6_000) == "100.00"


@pytest.mark.parametrize(
    ("subscribed", "last", "first", "period"),
    [
        pytest.param(
            "2026-12-10T09:00:00+00:00",
            "2026-12-31T23:59:59+00:00",
            "2027-01-01T00:00:30+00:00",
            "2027-01",
            id="year_end",
        ),
        pytest.param(
            "2028-02-10T09:00:00+00:00",
            "2028-02-29T23:59:59+00:00",
            "2028-03-01T00:00:00+00:00",
            "2028-03",
            id="leap_month_end",
        ),
    ],
)
async def test_each_periods_fee_is_taken_once_and_its_allowance_renewed(
    world: World, subscribed: str, last: str, first: str, period: str
) -> None:
    world.at(subscribed)
    await world.account("acc", "100.00")
    assert await world.subs.change("acc", "basic") == "subscribed"
    # The first period in full, whatever the day; its whole allowance.
    assert await world.fees("acc") == [(-10_000_000, f"subscription:{subscribed[:7]}")]
    assert await world.plan_grant("acc", subscribed[:7]) == 6_000

    world.at(last)
    assert await world.subs.tick() == {}
    world.at(first)
    # Two workers at once, then replays: one fee.
    other = Subscriptions(world.pool, world.balances, clock=world.clock)
    results = await asyncio.gather(world.subs.tick(), other.tick())
    assert sorted(o for r in results for o in r) == ["begun"] or sorted(
        o for r in results for o in r
    ) == ["begun", "current"]
    assert await world.subs.tick() == {}
    assert await world.subs.begin_period("acc") == "current"
    assert await world.fees("acc") == [
        (-10_000_000, f"subscription:{subscribed[:7]}"),
        (-10_000_000, f"subscription:{period}"),
    ]
    assert await world.balance("acc") == 80_000_000
    assert await world.plan_grant("acc", period) == 6_000
    s = await world.subs.summary("acc")
    assert s is not None and s.period.period == period and s.period.fee == 10_000_000
    assert s.next_invoice_date == period_bounds(period)[1]
    assert (await reconcile(world.pool, world.balances)).ok


async def test_a_held_account_with_a_fresh_allowance_resumes_at_the_periods_start(
    world: World,
) -> None:
    await world.account("held", "0.00", plan="free0")  # no money, no minutes: held
    st = await world.balances.get("held")
    assert st is not None and st.status == "hold"
    # Same fee, more minutes: a change that is not an upgrade waits for the next period.
    assert await world.subs.change("held", "mins") == "downgrade_scheduled"
    assert (await world.balances.get("held")).status == "hold"  # type: ignore[union-attr]
    world.at("2027-01-01T00:00:30+00:00")
    assert await world.subs.tick() == {"begun": 1}
    st = await world.balances.get("held")
    assert st is not None and st.status == "low"  # money exhausted, minutes left
    box = await world.balances.pending_outbox("held")
    assert [(s.type, s.reason) for s in box] == [("account.resume", "credit_available")]
    assert await world.plan_grant("held", "2027-01") == 3_600
    assert await world.pool.fetchval("SELECT plan_id FROM accounts WHERE id = 'held'") == "mins"
    assert await world.subs.tick() == {}  # resumed once
    assert len(await world.balances.pending_outbox("held")) == 1


async def test_an_upgrade_mid_period_is_prorated_and_adds_the_minutes_at_once(
    world: World,
) -> None:
    world.at("2027-01-01T00:00:00+00:00")
    await world.account("acc", "100.00")
    await world.subs.change("acc", "basic")
    upgraded_at = world.at("2027-01-16T00:00:00+00:00")  # 16 of January's 31 days left
    assert await world.subs.change("acc", "pro") == "upgraded"
    start, end = period_bounds("2027-01")
    diff = prorated(
        20_000_000,
        int((end - upgraded_at).total_seconds()),
        int((end - start).total_seconds()),
    )
    assert diff == 10_322_581
    assert await world.fees("acc") == [
        (-10_000_000, "subscription:2027-01"),
        (-diff, "upgrade:2027-01:pro"),
    ]
    assert await world.balance("acc") == 100_000_000 - 10_000_000 - diff
    assert await world.plan_grant("acc", "2027-01") == 18_000  # 100 + 200 minutes more
    s = await world.subs.summary("acc")
    assert s is not None
    assert (s.plan.id, s.period.included_s, s.period.fee) == ("pro", 18_000, 10_000_000 + diff)
    assert await world.subs.change("acc", "pro") == "unchanged"  # asked again: nothing
    assert len(await world.fees("acc")) == 2
    # February charges the new plan's whole fee and allowance.
    world.at("2027-02-01T00:00:01+00:00")
    assert await world.subs.tick() == {"begun": 1}
    assert (await world.fees("acc"))[-1] == (-30_000_000, "subscription:2027-02")
    assert await world.plan_grant("acc", "2027-02") == 18_000
    assert (await reconcile(world.pool, world.balances)).ok


async def test_an_upgrade_the_credit_cannot_cover_changes_nothing(world: World) -> None:
    world.at("2027-01-02T00:00:00+00:00")
    await world.account("poor", "10.00")
    await world.subs.change("poor", "basic")  # takes the 10.00: nothing left
    with pytest.raises(SubscriptionError) as refused:
        await world.subs.change("poor", "pro")
    assert refused.value.code == "insufficient_credit"
    s = await world.subs.summary("poor")
    assert s is not None and s.plan.id == "basic" and s.period.included_s == 6_000
    assert await world.plan_grant("poor", "2027-01") == 6_000
    assert len(await world.fees("poor")) == 1


async def test_a_downgrade_waits_for_the_next_period_and_refunds_nothing(world: World) -> None:
    world.at("2026-12-01T00:00:00+00:00")
    await world.account("acc", "100.00")
    await world.subs.change("acc", "pro")
    world.at("2026-12-20T00:00:00+00:00")
    assert await world.subs.change("acc", "basic") == "downgrade_scheduled"
    s = await world.subs.summary("acc")
    assert s is not None and s.plan.id == "pro" and s.next_plan is not None
    assert s.next_plan.id == "basic"
    assert await world.balance("acc") == 70_000_000  # nothing back
    assert await world.plan_grant("acc", "2026-12") == 18_000
    world.at("2027-01-01T00:00:00+00:00")
    assert await world.subs.tick() == {"begun": 1}
    assert await world.fees("acc") == [
        (-30_000_000, "subscription:2026-12"),
        (-10_000_000, "subscription:2027-01"),
    ]
    assert await world.plan_grant("acc", "2027-01") == 6_000
    s = await world.subs.summary("acc")
    assert s is not None and s.plan.id == "basic" and s.next_plan is None
    # A downgrade called off before the period ends: nothing changes at its start.
    await world.subs.change("acc", "free0")
    await world.subs.change("acc", "basic")
    world.at("2027-02-01T00:00:00+00:00")
    await world.subs.tick()
    assert (await world.fees("acc"))[-1] == (-10_000_000, "subscription:2027-02")


async def test_a_trial_period_is_not_charged(world: World) -> None:
    world.at("2026-12-15T00:00:00+00:00")
    await world.account("acc", "50.00", plan="basic")
    await world.pool.execute(
        "INSERT INTO subscriptions (account_id, plan_id, started_at, trial_until, updated_at)"
        " VALUES ('acc', 'basic', $1, $2, $1)",
        utc("2026-12-15T00:00:00+00:00"),
        utc("2027-01-15T00:00:00+00:00"),
    )
    assert await world.subs.tick() == {"begun": 1}  # December: in trial
    s = await world.subs.summary("acc")
    assert s is not None and s.status == "trial" and s.period.fee == 0
    world.at("2027-01-01T00:00:00+00:00")
    await world.subs.tick()  # January starts before the trial ends: free too
    world.at("2027-02-01T00:00:00+00:00")
    await world.subs.tick()
    assert await world.fees("acc") == [(-10_000_000, "subscription:2027-02")]
    s = await world.subs.summary("acc")
    assert s is not None and s.status == "active"


async def test_unknown_and_unsold_plans_are_refused(world: World) -> None:
    await world.account("acc", "50.00")
    for plan, code in (("nope", "unknown_plan"), (None, "no_subscription")):
        with pytest.raises(SubscriptionError) as e:
            await world.subs.change("acc", plan)
        assert e.value.code == code
    await put_plan(world.pool, PlanSpec(id="legacy", monthly_fee="0.000001", on_sale=False))
    with pytest.raises(SubscriptionError) as e:
        await world.subs.change("acc", "legacy")
    assert e.value.code == "plan_not_on_sale"
    assert await world.subs.summary("acc") is None


async def test_the_summary_is_what_the_ledger_and_the_balance_store_hold(
    conns: Connections,
) -> None:
    """On the real clock: the metering processor charges a call from the plan's minutes, a
    second call is in flight, and the summary's minutes, DIDs, extensions and money equal
    what the ledger and Redis hold."""
    await put_price_list(conns.pool, demo_price_list())
    await put_plan(conns.pool, PRO)
    await create_accounts(
        conns.pool,
        conns.balances,
        [AccountSpec.model_validate({"id": "acc", "price_list_id": "standard", "balance": "80"})],
    )
    subs = Subscriptions(conns.pool, conns.balances)
    await subs.change("acc", "pro", extensions=7)
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    processor = harness.processor(conns, catalog)
    done = call_hangup("acc", "c-done", "+442071234567", 1_563)
    out = await processor.process([call_record(done, 0)])
    assert out.charged == 1
    now = int(datetime.now(UTC).timestamp())
    start, end = (int(t.timestamp()) for t in period_bounds(datetime.now(UTC).strftime("%Y-%m")))
    live = await conns.balances.reserve(
        "acc",
        "c-live",
        "outbound",
        Tariff(rate_per_min=15_000),
        now_s=now,
        grant_s=300,
        grace_s=60,
        max_s=14_400,
        plan=PlanPeriod(18_000, start, end),
    )
    assert live.decision == "allow"
    for n in ("+14155550101", "+14155550102", "+14155550103"):
        await conns.pool.execute(
            "INSERT INTO numbers (account_id, number, status, monthly_fee, activated_at,"
            " paid_through, updated_at) VALUES ('acc', $1, 'active', 0, now(), $2, now())",
            n,
            datetime.now(UTC).strftime("%Y-%m"),
        )
    s = await subs.summary("acc")
    assert s is not None
    drawn = await conns.pool.fetchval(
        "SELECT sum(included_s) FROM ledger WHERE account_id = 'acc' AND kind = 'call'"
    )
    assert s.minutes_used_s == drawn == 1_566  # 1,563 s billed in 6 s increments
    assert s.minutes_reserved_s == 300 == live.granted_s
    assert s.minutes_remaining_s == 18_000 - 1_566 - 300
    assert s.percent_used == percent(1_566, 18_000) == "8.70"
    assert (s.dids_used, s.extensions_used) == (3, 7)
    assert s.dids_amount == 1 * 1_500_000 and s.extensions_amount == 2 * 4_000_000
    assert s.calls_amount == 0  # all of it came from the included minutes
    assert all(type(v) is int for v in (s.calls_amount, s.calls_billed_s, s.dids_used))
    assert s.accruing == 1_500_000 + 8_000_000
    assert s.status == "active" and s.plan.max_concurrent_calls == 10
    raw = await conns.redis.hget("{a:acc}", "mc")  # the plan's limit, in force at authorize
    assert raw == b"10"
