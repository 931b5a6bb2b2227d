"""Every charge is put in a billing group when it is rated, and keeps it (issue 13): the
attribution table case by case, a number moved to another group mid-month, and the month's
ledger records by group, whose lines add up to the ledger at month and year edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from contracts import topics
from enforcement import groups
from meter.traffic import call_hangup, message_sent, number_event
from metering.worker import Connections
from rating.catalog import Catalog
from tests import harness
from tests.conftest import Seeder
from tests.helpers import Rec

MAIN = "+14155550100"  # the "from" of every call and message of meter.traffic
SALES = "+14155550111"
UK = "+442071234567"

_offset = 0


def with_from(ev: dict[str, Any], number: str) -> dict[str, Any]:
    ev["data"]["from"] = number
    return ev


def with_profile(ev: dict[str, Any], profile: str) -> dict[str, Any]:
    ev["data"]["outbound_profile_id"] = profile
    return ev


async def feed(p: Any, *events: dict[str, Any]) -> Any:
    global _offset
    recs = []
    for e in events:
        _offset += 1
        topic = {"call": topics.CALL_EVENTS, "mess": topics.MESSAGE_EVENTS}.get(
            e["type"][:4], topics.NUMBER_EVENTS
        )
        recs.append(Rec(topic, 0, _offset, e["subject"].encode(), orjson.dumps(e)))
    out = await p.process(recs)
    assert not out.dead_letters, out.dead_letters
    return out


async def group_of(conns: Connections, ref: str) -> str:
    got = await conns.pool.fetch(
        "SELECT billing_group_id FROM ledger WHERE account_id = 'acc_1' AND ref = $1", ref
    )
    assert len(got) == 1, (ref, got)
    return str(got[0][0])


async def world(conns: Connections, seed: Seeder) -> tuple[Any, dict[str, str]]:
    await seed("acc_1", balance="100.00")
    sales = await groups.create(conns.pool, "acc_1", "Sales")
    support = await groups.create(conns.pool, "acc_1", "Support")
    await groups.set_numbers(conns.pool, "acc_1", sales.id, [SALES, "+14155550199"])
    await groups.set_numbers(conns.pool, "acc_1", support.id, [MAIN])
    await groups.put_profile(conns.pool, "acc_1", "trunk-sales", "Sales trunk", sales.id)
    await groups.put_profile(conns.pool, "acc_1", "trunk-none", "No group", None)
    catalog = Catalog(conns.pool, check_interval_s=0)
    await catalog.refresh()
    return harness.processor(conns, catalog), {"sales": sales.id, "support": support.id}


async def test_each_charge_takes_its_group_as_the_table_says(
    conns: Connections, seed: Seeder
) -> None:
    p, g = await world(conns, seed)
    at = datetime.now(UTC) - timedelta(minutes=5)
    await feed(
        p,
        # outbound through a profile with a group: the profile's, whatever the from number
        with_profile(call_hangup("acc_1", "c-profile", UK, 60, at=at), "trunk-sales"),
        # outbound through a profile with no group: the from number's
        with_profile(call_hangup("acc_1", "c-nogroup-profile", UK, 60, at=at), "trunk-none"),
        # outbound through a profile nobody set up: the from number's
        with_profile(call_hangup("acc_1", "c-unknown-profile", UK, 60, at=at), "trunk-x"),
        # outbound without a profile: the from number's
        call_hangup("acc_1", "c-from", UK, 60, at=at),
        with_from(call_hangup("acc_1", "c-from-sales", UK, 60, at=at), SALES),
        # outbound from a number in no group: none
        with_from(call_hangup("acc_1", "c-from-none", UK, 60, at=at), "+14155550000"),
        # inbound: the to number's (never the caller's)
        call_hangup("acc_1", "c-in", SALES, 60, at=at, direction="inbound"),
        with_from(
            call_hangup("acc_1", "c-in-none", "+14155550000", 60, at=at, direction="inbound"), SALES
        ),
        # a message: its from number's
        message_sent("acc_1", "m-main", UK, 1, at=at),
        with_from(message_sent("acc_1", "m-sales", UK, 1, at=at), SALES),
        # a number fee: its number's; else the group the event names if it is the account's
        number_event("number.activated", "acc_1", SALES, at=at),
        number_event("number.activated", "acc_1", "+14155550300", at=at),
    )
    stated = number_event("number.activated", "acc_1", "+14155550301", at=at)
    stated["data"]["billing_group_id"] = g["support"]
    foreign = number_event("number.activated", "acc_1", "+14155550302", at=at)
    foreign["data"]["billing_group_id"] = "bg_notthisaccounts0"
    await feed(p, stated, foreign)
    assert await group_of(conns, "c-profile") == g["sales"]
    assert await group_of(conns, "c-nogroup-profile") == g["support"]
    assert await group_of(conns, "c-unknown-profile") == g["support"]
    assert await group_of(conns, "c-from") == g["support"]
    assert await group_of(conns, "c-from-sales") == g["sales"]
    assert await group_of(conns, "c-from-none") == ""
    assert await group_of(conns, "c-in") == g["sales"]
    assert await group_of(conns, "c-in-none") == ""
    assert await group_of(conns, "m-main") == g["support"]
    assert await group_of(conns, "m-sales") == g["sales"]
    assert await group_of(conns, SALES) == g["sales"]
    assert await group_of(conns, "+14155550300") == ""
    assert await group_of(conns, "+14155550301") == g["support"]
    assert await group_of(conns, "+14155550302") == ""
    directions = dict(
        await conns.pool.fetch(
            "SELECT ref, direction FROM ledger WHERE ref IN ('c-in', 'c-from', 'm-main')"
        )
    )
    assert directions == {"c-in": "inbound", "c-from": "outbound", "m-main": ""}


async def test_a_number_moved_mid_month_never_rewrites_what_was_rated(
    conns: Connections, seed: Seeder
) -> None:
    p, g = await world(conns, seed)
    at = datetime.now(UTC) - timedelta(minutes=5)
    await feed(p, with_from(call_hangup("acc_1", "before", UK, 60, at=at), SALES))
    await groups.set_numbers(conns.pool, "acc_1", g["support"], [MAIN, SALES])  # moved
    await feed(p, with_from(call_hangup("acc_1", "after", UK, 60, at=at), SALES))
    assert await group_of(conns, "before") == g["sales"]
    assert await group_of(conns, "after") == g["support"]
    # a replay of the first call, after the move, is a duplicate: its row is as it was
    await feed(p, with_from(call_hangup("acc_1", "before", UK, 60, at=at), SALES))
    assert await group_of(conns, "before") == g["sales"]
    sales = await groups.group(conns.pool, "acc_1", g["sales"])
    assert sales is not None and sales.numbers == ["+14155550199"]
    # a group deleted with reassign_to=none: its numbers go to no group, history stays
    with pytest.raises(groups.GroupError) as refused:
        await groups.delete(conns.pool, "acc_1", g["support"], reassign_to=None, force=False)
    assert refused.value.code == "billing_group_in_use"
    assert await groups.delete(conns.pool, "acc_1", g["support"], reassign_to=None, force=True)
    await feed(p, with_from(call_hangup("acc_1", "gone", UK, 60, at=at), SALES))
    assert await group_of(conns, "gone") == ""
    assert await group_of(conns, "after") == g["support"]


@pytest.mark.parametrize(
    "last,first,month,next_month",
    [
        ("2026-11-30T23:59:59+00:00", "2026-12-01T00:00:00+00:00", "2026-11", "2026-12"),
        ("2026-12-31T23:59:59+00:00", "2027-01-01T00:00:00+00:00", "2026-12", "2027-01"),
        ("2028-02-29T23:59:59+00:00", "2028-03-01T00:00:00+00:00", "2028-02", "2028-03"),
    ],
    ids=["month_edge", "year_edge", "leap_day"],
)
async def test_a_months_records_add_up_to_the_ledger_at_its_edges(
    conns: Connections, seed: Seeder, last: str, first: str, month: str, next_month: str
) -> None:
    p, g = await world(conns, seed)
    end, start = datetime.fromisoformat(last), datetime.fromisoformat(first)
    # the processor's clock well after both months: nothing is in the future
    p._clock = lambda: start.timestamp() + 86_400 * 40
    await feed(
        p,
        call_hangup("acc_1", "in-month", UK, 61, at=end),
        with_from(call_hangup("acc_1", "in-month-sales", UK, 30, at=end), SALES),
        call_hangup("acc_1", "in-month-in", SALES, 45, at=end, direction="inbound"),
        message_sent("acc_1", "m1", UK, 2, at=end),
        call_hangup("acc_1", "next-month", UK, 61, at=start),
    )
    report = await groups.month_report(conns.pool, "acc_1", month)
    lo, hi = groups.month_bounds(month)
    want = await conns.pool.fetchval(
        "SELECT sum(amount) FROM ledger WHERE account_id = 'acc_1' AND event_time >= $1"
        " AND event_time < $2",
        lo,
        hi,
    )
    assert report.total == want
    refs = {(line.billing_group_id, line.kind, line.direction): line.count for line in report.lines}
    assert refs[(g["support"], "call", "outbound")] == 1
    assert refs[(g["sales"], "call", "outbound")] == 1
    assert refs[(g["sales"], "call", "inbound")] == 1
    assert refs[(g["support"], "sms", "")] == 1
    after = await groups.month_report(conns.pool, "acc_1", next_month)
    assert [line.count for line in after.lines if line.kind == "call"] == [1]
    only_sales = await groups.month_report(conns.pool, "acc_1", month, only_groups=[g["sales"]])
    assert {line.billing_group_id for line in only_sales.lines} == {g["sales"]}
    assert sum(line.count for line in only_sales.lines) == 2
