"""Compensation of included minutes: seconds drawn again for an event the ledger already had
are given back once, each to the grant it came from, as debit.lua recorded the draw."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from balance import keys
from balance.accounts import (
    AccountSpec,
    BundleSpec,
    PlanSpec,
    create_accounts,
    put_bundle,
    put_plan,
    put_price_list,
)
from balance.bundles import buy_bundle
from balance.values import Undraw
from infra.ledger import event_key
from meter.traffic import call_hangup, demo_price_list
from metering.processor import MeteringProcessor
from metering.worker import Connections
from rating.catalog import Catalog
from rating.plans import month_period, parse_bucket
from tests import harness
from tests.calendar import CALENDAR_EDGES, at
from tests.helpers import call_record
from tests.metering.accounts import account


@pytest.fixture(params=CALENDAR_EDGES)
def now(request: pytest.FixtureRequest) -> int:
    """The time the test runs at (unix s): one calendar edge per run."""
    return at(request.param)


async def _flat_with_bundle(conns: Connections, now: int) -> MeteringProcessor:
    """Account "flat": 10 included minutes a month and a 10-minute bundle bought an hour before
    ``now`` (the processor's clock), valid 60 days: the plan's grant ends first."""
    await put_price_list(conns.pool, demo_price_list())
    await put_plan(conns.pool, PlanSpec(id="flat10", included_minutes=10))
    await put_bundle(
        conns.pool,
        BundleSpec.model_validate({"id": "b10", "minutes": 10, "price": "0", "validity_days": 60}),
    )
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate(
                {"id": "flat", "price_list_id": "standard", "plan_id": "flat10", "balance": "1.00"}
            )
        ],
    )
    bought = datetime.fromtimestamp(now - 3_600, UTC)
    await buy_bundle(conns.pool, conns.balances, "flat", "b10", "l1", now=bought)
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    return harness.processor(conns, catalog, clock=lambda: now)


def _left(raw: bytes | None) -> dict[str, int]:
    return {g.id: g.remaining_s for g in parse_bucket(raw)}


async def _redraw(conns: Connections, p: MeteringProcessor, ev: dict[str, Any], off: int) -> Any:
    """Make Redis forget ``ev`` (the ledger has it) and deliver it again."""
    key = event_key(ev["source"], ev["id"])
    day = int(datetime.fromisoformat(ev["time"]).timestamp()) // 86_400
    assert await conns.redis.hdel(keys.applied("flat", day), key) == 1
    return await p.process([call_record(ev, off)])


async def test_compensation_gives_back_the_seconds_drawn_again(
    conns: Connections, now: int
) -> None:
    now = _settled(now)
    p = await _flat_with_bundle(conns, now)
    pid = f"p{month_period(now)[0]}"
    us = "+14155550123"  # 0.007/min, 6/6
    c1 = call_hangup("flat", "c1", us, 120, at=datetime.fromtimestamp(now - 60, UTC))
    await p.process([call_record(c1, 0)])
    before = _left(await conns.balances.bucket("flat"))
    assert before == {pid: 480, "bl1": 600}
    balance = (await conns.balances.get("flat")).balance  # type: ignore[union-attr]
    out = await _redraw(conns, p, c1, 1)
    assert out.compensated == 1
    assert _left(await conns.balances.bucket("flat")) == before
    st = await conns.balances.get("flat")
    assert st is not None and st.balance == balance
    # given back once: the same compensation again gives nothing
    day = int(datetime.fromisoformat(c1["time"]).timestamp()) // 86_400
    key = event_key(c1["source"], c1["id"])
    assert await conns.balances.undraw_many([Undraw("flat", key, day, 120, now - 180)]) == [0]
    assert _left(await conns.balances.bucket("flat")) == before
    assert await conns.pool.fetchval("SELECT count(*) FROM ledger WHERE ref = 'c1'") == 1


def _settled(now: int) -> int:
    """``now``, or two hours into its month when it is earlier: the compensation cases need
    their calls (of the last hour) in one month, under one plan grant."""
    return max(now, month_period(now)[0] + 7_200)


async def _spanning(conns: Connections, now: int) -> tuple[dict[str, int], dict[str, int]]:
    """A draw made again across two grants: the plan's last 96 s, then 204 s of the bundle."""
    now = _settled(now)
    p = await _flat_with_bundle(conns, now)
    us = "+14155550123"
    c0 = call_hangup("flat", "c0", us, 204, at=datetime.fromtimestamp(now - 900, UTC))
    c1 = call_hangup("flat", "c1", us, 300, at=datetime.fromtimestamp(now - 60, UTC))
    await p.process([call_record(c0, 0), call_record(c1, 1)])
    before = _left(await conns.balances.bucket("flat"))
    assert before == {f"p{month_period(now)[0]}": 96, "bl1": 600}
    await _redraw(conns, p, c1, 2)
    return before, _left(await conns.balances.bucket("flat"))


async def test_compensation_of_a_draw_across_grants_gives_back_every_second(
    conns: Connections, now: int
) -> None:
    before, after = await _spanning(conns, now)
    assert sum(after.values()) == sum(before.values()) == 696


async def test_compensation_gives_each_second_back_to_the_grant_it_came_from(
    conns: Connections, now: int
) -> None:
    before, after = await _spanning(conns, now)
    assert after == before


async def test_undraw_follows_the_grants_debit_recorded(conns: Connections, now: int) -> None:
    p_start, p_end = month_period(now)
    await account(conns, "flat", minutes=10)
    r = conns.redis
    await r.hset(keys.account("flat"), "min", f"p{p_start},0,{p_start},{p_end}")
    key, day = b"k" * 16, now // 86_400
    # a memory as debit.lua would write it with the list: 300 s drawn, 200 of them from a
    # bundle it then dropped as spent
    took = f"bgone,200,{now - 99},{now + 99};p{p_start},100,{p_start},{p_end}"
    await r.hset(keys.applied("flat", day), key, b"0|" + b"f" * 8 + f"300|{took}".encode())
    b = conns.balances
    assert await b.undraw_many([Undraw("flat", key, day, 300, now)]) == [300]
    assert _left(await b.bucket("flat")) == {f"p{p_start}": 100, "bgone": 200}
    assert await b.undraw_many([Undraw("flat", key, day, 300, now)]) == [0]
    # no list and no grant valid at the answer: nothing to give them to
    assert await b.undraw_many([Undraw("flat", b"x" * 16, day, 60, now - 40 * 86_400)]) == [-60]
    assert _left(await b.bucket("flat")) == {f"p{p_start}": 100, "bgone": 200}
