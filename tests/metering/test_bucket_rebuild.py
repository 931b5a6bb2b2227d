"""The minute bucket rebuilt from PostgreSQL: the replay of the ledger's draws against the
grants valid at each answer, and a bucket Redis lost (flushed, or an account unknown to the
hot path) rebuilt to exactly what it held."""

from __future__ import annotations

from datetime import UTC, datetime

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
from meter.traffic import call_hangup, demo_price_list
from metering.worker import Connections
from rating.catalog import Catalog
from rating.plans import (
    Draw,
    Grant,
    month_period,
    parse_bucket,
    preview_draw,
    replay_bucket,
    replay_since,
)
from rating.rating import time_cost
from tests import harness
from tests.calendar import CALENDAR_EDGES, at, ledger_clock
from tests.calls import Clock
from tests.helpers import call_record


@pytest.fixture(params=CALENDAR_EDGES)
def now(request: pytest.FixtureRequest) -> int:
    """The time the test runs at (unix s): one calendar edge per run."""
    return at(request.param)


#: the middle of a month, for the pure replay cases: about the order of draws, not the
#: calendar (a bucket rebuilt across the calendar's edges: tests/metering/test_calendar_edges.py)
MID_MONTH = int(datetime(2026, 11, 22, 12, tzinfo=UTC).timestamp())


def test_replay_draws_in_ledger_order_from_grants_valid_at_the_answer() -> None:
    day = 86_400
    start, end = month_period(MID_MONTH)
    short = Grant("bshort", 120, MID_MONTH - 3_600, MID_MONTH - 3_600 + 3 * day)
    long_ = Grant("blong", 600, MID_MONTH - 3_600, MID_MONTH - 3_600 + 30 * day)
    draws = [
        Draw(10, MID_MONTH - 1_700, 60, 60),  # short: 60 left
        Draw(11, MID_MONTH - 7_100, 60, 60),  # answered before the bundles: the plan's grant only
        Draw(12, MID_MONTH - 600, 180, 180),  # short spent, 120 from the plan
        Draw(13, MID_MONTH - 60, 240, 240),  # the plan's 120, then 120 of the long one
        # before the period's first charge (entry 10), and before the bundles: no grant the
        # replay knows can have given it, so it takes from none
        Draw(9, MID_MONTH - 9_000, 6, 6),
    ]
    grants = replay_bucket([short, long_], 300, {start: 10}, draws, MID_MONTH)
    assert {g.id: (g.remaining_s, g.valid_from, g.expires_at) for g in grants} == {
        f"p{start}": (0, start, end),  # a spent plan grant stays: the period is not refilled
        "blong": (480, long_.valid_from, long_.expires_at),
    }
    # the answer is guessed from the hangup less the billed seconds; one increment early
    # still finds the bundle through the hangup's time
    late = [
        Draw(20, MID_MONTH - 3_600 + 5, 12, 12)
    ]  # answered MID_MONTH - 3_595: guessed MID_MONTH - 3_607
    (g,) = replay_bucket([long_], 0, {}, late, MID_MONTH)
    assert g.remaining_s == 588


def test_replay_reaches_back_through_overlapping_bundles() -> None:
    day = 86_400
    a = Grant("ba", 60, MID_MONTH - 50 * day, MID_MONTH - 20 * day)
    b = Grant("bb", 60, MID_MONTH - 25 * day, MID_MONTH + 5 * day)  # live, overlaps a
    c = Grant("bc", 60, MID_MONTH - 90 * day, MID_MONTH - 60 * day)  # overlaps neither
    assert replay_since([a, b, c], 0, MID_MONTH) == MID_MONTH - 50 * day
    assert replay_since([c], 0, MID_MONTH) is None
    # a draw while a and b both ran came from a (sooner to expire): b is untouched
    (g,) = replay_bucket([a, b], 0, {}, [Draw(1, MID_MONTH - 21 * day, 60, 60)], MID_MONTH)
    assert (g.id, g.remaining_s) == ("bb", 60)


async def test_a_flushed_bucket_is_rebuilt_from_postgres_exactly(
    conns: Connections, now: int
) -> None:
    """Run at each calendar edge with the clock injected (the processor's, the rebuild's and
    the ledger's ``recorded_at``). It used ``time.time()`` and failed in the first hours of
    every month: its expected numbers assumed every call of the last two hours fell in the
    current month and the month's grant ended before a 30-day bundle. The rebuild was right;
    the expectations now follow the calendar (tests/metering/test_calendar_edges.py rebuilds
    across the month's and the year's end with batches on both sides)."""
    clock = Clock(datetime.fromtimestamp(now, UTC))
    await ledger_clock(conns.pool, now)
    await put_price_list(conns.pool, demo_price_list())
    await put_plan(conns.pool, PlanSpec(id="flat5", included_minutes=5))
    for spec in (
        {"id": "short", "minutes": 2, "price": "0.10", "validity_days": 3},
        {"id": "long", "minutes": 10, "price": "0.20", "validity_days": 30},
    ):
        await put_bundle(conns.pool, BundleSpec.model_validate(spec))
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate(
                {"id": "flat", "price_list_id": "standard", "plan_id": "flat5", "balance": "1.00"}
            )
        ],
        clock=clock,
    )
    bought = datetime.fromtimestamp(now - 3_600, UTC)
    await buy_bundle(conns.pool, conns.balances, "flat", "short", "s1", now=bought)
    await buy_bundle(conns.pool, conns.balances, "flat", "long", "l1", now=bought)
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    p = harness.processor(conns, catalog, clock=clock, rebuild=True)
    us = "+14155550123"  # 0.007/min, 6/6
    calls = [
        call_hangup("flat", "c1", us, 60, at=datetime.fromtimestamp(now - 1_700, UTC)),
        call_hangup("flat", "c0", us, 60, at=datetime.fromtimestamp(now - 7_100, UTC)),
        call_hangup("flat", "c2", us, 180, at=datetime.fromtimestamp(now - 600, UTC)),
    ]
    await p.process([call_record(e, i) for i, e in enumerate(calls)])
    later = call_hangup("flat", "c3", us, 240, at=datetime.fromtimestamp(now - 60, UTC))
    await p.process([call_record(later, 3)])

    def state(raw: bytes | None) -> dict[str, tuple[int, int, int]]:
        return {g.id: (g.remaining_s, g.valid_from, g.expires_at) for g in parse_bucket(raw)}

    before = state(await conns.balances.bucket("flat"))
    drawn = await conns.pool.fetchval("SELECT sum(included_s) FROM ledger WHERE ref LIKE 'c%'")
    # c0, answered before the bundles, draws on the month's grant if it was answered in this
    # month; in the month's first two hours it was the last month's, and draws on that month's
    # allowance (its grant created for it: no charge of that month had)
    start = month_period(now)[0]
    c0_in_month = now - 7_160 >= start
    last_month = f"p{month_period(start - 1)[0]}"
    assert drawn == 540 and "bs1" not in before  # short: spent
    assert (last_month in before) is not c0_in_month
    assert sum(r for r, _, _ in before.values()) == (
        300 + 120 + 600 + (0 if c0_in_month else 300) - drawn
    )
    balance = (await conns.balances.get("flat")).balance  # type: ignore[union-attr]

    await conns.redis.flushall()
    assert await load_into_redis(conns.pool, conns.balances, ["flat"], now=now) == ["flat"]
    # last month's grant too, created this month for the calls of last month
    assert state(await conns.balances.bucket("flat")) == before
    st = await conns.balances.get("flat")
    assert st is not None and st.balance == balance

    # and the hot path's own rebuild (the account unknown to Redis) gives the same bucket
    await conns.redis.flushall()
    last = call_hangup("flat", "c4", us, 600, at=datetime.fromtimestamp(now, UTC))
    out = await p.process([call_record(last, 4)])
    assert out.charged == 1
    row = await conns.pool.fetchrow("SELECT amount, included_s FROM ledger WHERE ref = 'c4'")
    # what the lost bucket held at c4's answer (the month's grant ends before the 30-day
    # bundle, or after it in a month's first day: either way both are left to draw on)
    left = preview_draw([Grant(g, *v) for g, v in before.items()], 600, now - 600)
    assert (row["included_s"], row["amount"]) == (left, -time_cost(600 - left, 7_000))
