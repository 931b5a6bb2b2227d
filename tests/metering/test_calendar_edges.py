"""The calendar's edges, against real Redis and PostgreSQL, with the clock injected.

The edges themselves (``tests.calendar.CALENDAR_EDGES``) are what every date-dependent test
runs at. Here: the billing month's arithmetic at each edge, and a minute bucket flushed from
Redis and rebuilt from PostgreSQL, exactly, by calls and batches that straddle a month's and a
year's end.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import pytest

from balance.accounts import (
    AccountSpec,
    BundleSpec,
    PlanSpec,
    create_accounts,
    load_into_redis,
    put_bundle,
    put_plan,
    put_price_list,
)
from balance.bundles import buy_bundle
from infra.clock import SettableClock
from meter.traffic import call_hangup, demo_price_list
from metering.processor import MeteringProcessor
from metering.worker import Connections
from rating.catalog import Catalog
from rating.plans import (
    GRANT_KEEP_S,
    Grant,
    month_period,
    parse_bucket,
    preview_draw,
    replay_since,
)
from rating.rating import time_cost
from tests import harness
from tests.calendar import BOUNDARY_EDGES, CALENDAR_EDGES, EDGES, _utc, ledger_clock
from tests.helpers import call_record

# -- the billing month at each edge -------------------------------------------------------------


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@pytest.mark.parametrize(
    ("when", "start", "end"),
    [
        ("2027-01-31T23:59:59", "2027-01-01", "2027-02-01"),
        ("2027-02-01T00:00:00", "2027-02-01", "2027-03-01"),
        ("2027-02-28T23:59:59", "2027-02-01", "2027-03-01"),
        ("2028-02-29T12:00:00", "2028-02-01", "2028-03-01"),
        ("2028-02-29T23:59:59", "2028-02-01", "2028-03-01"),
        ("2026-12-31T23:59:59", "2026-12-01", "2027-01-01"),
        ("2027-01-01T00:00:00", "2027-01-01", "2027-02-01"),
        ("2025-03-01T00:00:00", "2025-03-01", "2025-04-01"),
        ("2030-06-30T23:59:59", "2030-06-01", "2030-07-01"),
    ],
)
def test_the_billing_month_holds_its_last_second_and_not_the_next(
    when: str, start: str, end: str
) -> None:
    s, e = month_period(_utc(when + "+00:00"))
    assert (_dt(s), _dt(e)) == (
        datetime.fromisoformat(start + "T00:00:00+00:00"),
        datetime.fromisoformat(end + "T00:00:00+00:00"),
    )
    assert month_period(e - 1) == (s, e) and month_period(e)[0] == e
    assert month_period(s - 1)[1] == s  # the month before ends where this one starts


@pytest.mark.parametrize("now", [p for p in CALENDAR_EDGES if p.values[0] is not None])
def test_the_last_periods_grant_is_replayed_for_a_day_into_the_next(now: int) -> None:
    start, _ = month_period(now)
    prev, _ = month_period(start - 1)
    since = replay_since([], 300, now)
    # a day after the month's start the previous period's grant is gone from Redis too
    assert since == (prev if now < start + GRANT_KEEP_S else start)


# -- a bucket rebuilt across a month's and a year's end -----------------------------------------

US: Final = "+14155550123"  # 0.007/min, 6/6 in the demo price list
US_RATE: Final = 7_000


def _grants(raw: bytes | None) -> dict[str, tuple[int, int, int]]:
    return {g.id: (g.remaining_s, g.valid_from, g.expires_at) for g in parse_bucket(raw)}


def _hangup(call_id: str, answered: int, seconds: int) -> dict[str, Any]:
    return call_hangup("flat", call_id, US, seconds, at=_dt(answered + seconds))


async def _processor(conns: Connections, clock: SettableClock) -> MeteringProcessor:
    """The hot path on ``clock``, rebuilding lost accounts from the ledger as the worker does."""
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    return harness.processor(conns, catalog, clock=clock, rebuild=True)


@pytest.mark.parametrize("edge", BOUNDARY_EDGES)
async def test_a_bucket_rebuilt_across_the_calendars_edge_is_exactly_redis(
    conns: Connections, edge: int
) -> None:
    """Calls answered on both sides of the edge, charged by batches on both sides of it (a
    late call of the old month charged in the new one too), drawing from the old period's
    grant, the new one's, and two bundles; then Redis loses the account. The bucket rebuilt
    from PostgreSQL is what Redis had, grant for grant, and the hot path's own rebuild
    charges the next call as the lost bucket would have."""
    clock = SettableClock(edge - 3 * 86_400)
    pool = conns.pool
    await ledger_clock(pool, clock())
    await put_price_list(pool, demo_price_list())
    await put_plan(pool, PlanSpec(id="flat5", included_minutes=5))
    for spec in (
        {"id": "short", "minutes": 2, "price": "0.10", "validity_days": 3},
        {"id": "long", "minutes": 10, "price": "0.20", "validity_days": 30},
    ):
        await put_bundle(pool, BundleSpec.model_validate(spec))
    spec = {"id": "flat", "price_list_id": "standard", "plan_id": "flat5", "balance": "1.00"}
    await create_accounts(pool, conns.balances, [AccountSpec.model_validate(spec)], clock=clock)
    clock.set(edge - 7_200)
    for bundle in ("short", "long"):
        await buy_bundle(pool, conns.balances, "flat", bundle, bundle, clock=clock)
    p = await _processor(conns, clock)
    # (when the batch is charged, [(call, answered, seconds)]), relative to the edge
    batches = [
        (-5_400, [("c0", -7_300, 60), ("c1", -6_000, 60)]),  # before the bundles, then after
        (-40, [("c2", -400, 180), ("c3", -300, 240)]),
        (90, [("c4", -150, 120), ("c5", 10, 60)]),  # c4 answered before the edge, charged after
        (3_600, [("c6", 3_000, 300)]),
    ]
    offset = 0
    for charged_at, calls in batches:
        clock.set(edge + charged_at)
        await ledger_clock(pool, clock())
        recs = []
        for call_id, answered, seconds in calls:
            recs.append(call_record(_hangup(call_id, edge + answered, seconds), offset))
            offset += 1
        out = await p.process(recs)
        assert out.charged == len(calls)
    drawn = await pool.fetchval("SELECT sum(included_s) FROM ledger WHERE kind = 'call'")
    assert drawn > 0
    before = _grants(await conns.balances.bucket("flat"))
    st = await conns.balances.get("flat")
    assert st is not None

    await conns.redis.flushall()
    assert await load_into_redis(pool, conns.balances, ["flat"], clock=clock) == ["flat"]
    assert _grants(await conns.balances.bucket("flat")) == before
    again = await conns.balances.get("flat")
    assert again is not None and (again.balance, again.status) == (st.balance, st.status)

    # the hot path's rebuild (Redis lost the account again) charges the next call exactly as
    # the lost bucket would have: what it held at the answer, and this period's grant
    await conns.redis.flushall()
    clock.set(edge + 3_700)
    await ledger_clock(pool, clock())
    answered, seconds = edge + 3_100, 600
    grants = [Grant(g, *v) for g, v in before.items()]
    start, end = month_period(int(clock()))
    if f"p{start}" not in before:
        grants.append(Grant(f"p{start}", 300, start, end))
    expect = preview_draw(grants, seconds, answered)
    out = await p.process([call_record(_hangup("c7", answered, seconds), offset)])
    assert out.charged == 1
    row = await pool.fetchrow("SELECT amount, included_s FROM ledger WHERE ref = 'c7'")
    assert (row["included_s"], row["amount"]) == (
        expect,
        -time_cost(seconds - expect, US_RATE),
    )


def _period_grants(raw: bytes | None) -> list[str]:
    return sorted(g.id for g in parse_bucket(raw) if g.id.startswith("p"))


@pytest.mark.parametrize("edge", [EDGES["month_start"], EDGES["year_start"]])
async def test_a_rebuild_the_day_after_a_months_end_keeps_the_old_periods_grant(
    conns: Connections, edge: int
) -> None:
    """The old period's grant lives a day into the new month (late calls of the old month
    still draw on it); a rebuild in that day restores it with what was left, a rebuild after
    that day has no such grant, and no rebuild gives a period's allowance twice."""
    clock = SettableClock(edge - 86_400)
    pool = conns.pool
    await ledger_clock(pool, clock())
    await put_price_list(pool, demo_price_list())
    await put_plan(pool, PlanSpec(id="flat5", included_minutes=5))
    spec = {"id": "flat", "price_list_id": "standard", "plan_id": "flat5", "balance": "1.00"}
    await create_accounts(pool, conns.balances, [AccountSpec.model_validate(spec)], clock=clock)
    p = await _processor(conns, clock)
    old, _ = month_period(edge - 3_600)
    new, _ = month_period(edge)
    assert old < new  # the edge is in the first hour of a month
    clock.set(edge - 3_600)
    await ledger_clock(pool, clock())
    await p.process([call_record(_hangup("c1", edge - 3_700, 60), 0)])
    clock.set(edge)
    await ledger_clock(pool, clock())
    await p.process([call_record(_hangup("c2", edge - 200, 30), 1)])  # late: the old period's
    before = _grants(await conns.balances.bucket("flat"))
    assert before[f"p{old}"][0] == 300 - 60 - 30 and f"p{new}" in before

    for later in (3_600, 86_400 - 1_000 + (new - edge)):  # within the new month's first day
        clock.set(edge + later)
        await conns.redis.flushall()
        assert await load_into_redis(pool, conns.balances, ["flat"], clock=clock) == ["flat"]
        assert _grants(await conns.balances.bucket("flat")) == before
    clock.set(new + GRANT_KEEP_S + 60)  # a day past the old period's end: gone
    await conns.redis.flushall()
    await load_into_redis(pool, conns.balances, ["flat"], clock=clock)
    assert _period_grants(await conns.balances.bucket("flat")) == [f"p{new}"]
    assert _grants(await conns.balances.bucket("flat"))[f"p{new}"] == before[f"p{new}"]
