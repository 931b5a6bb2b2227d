"""Plans, bundles and the minute bucket against real Redis and PostgreSQL: included seconds
drawn first and atomically with the debit, never twice, never below zero; bundles bought from
the balance; managed accounts; new price-list versions picked up by a running processor."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balance.accounts import (
    AccountSpec,
    BundleSpec,
    PlanSpec,
    create_accounts,
    put_bundle,
    put_plan,
)
from balance.bundles import BundleError, buy_bundle
from balance.store import RedisBalances
from balance.values import Debit, Draw, PlanPeriod
from contracts import topics
from enforcement.estimate import estimate
from infra.settings import Settings
from meter.traffic import call_hangup, message_sent
from metering.processor import MeteringProcessor
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from rating.plans import month_period, parse_bucket
from rating.pricelist_csv import parse_csv
from rating.pricelists import import_rates
from rating.rating import time_cost
from tests import harness
from tests.calendar import CALENDAR_EDGES, at
from tests.conftest import Seeder, Services, eventually
from tests.helpers import call_record, produce


def key(i: int | str) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def fp(s: str = "") -> bytes:
    return hashlib.blake2b(s.encode(), digest_size=8).digest()


def call(
    i: int | str, billed: int, now: int, rate: int = 60_000, fee: int = 0, answered: int = 0
) -> Debit:
    """A call debit as the processor builds it at ``now`` (60_000/min = 1_000 micro-units a
    second), answered at ``answered`` (default: ``now``)."""
    amount = fee + time_cost(billed, rate)
    return Debit(
        key(i), fp(), amount, now // 86_400, draw=Draw(billed, rate, fee, answered or now)
    )


@pytest.fixture(params=CALENDAR_EDGES)
def now(request: pytest.FixtureRequest) -> int:
    """The time the test runs at (unix s): one calendar edge per run."""
    return at(request.param)


def plan_of(account_id: str, included_s: int, now: int) -> dict[str, PlanPeriod]:
    """The plan allowance the processor passes for the period holding ``now``."""
    return {account_id: PlanPeriod(included_s, *month_period(now))}


@pytest.fixture
async def balances(redis_url: str) -> AsyncIterator[RedisBalances]:
    r = aioredis.Redis.from_url(redis_url)
    yield RedisBalances(r)
    await r.aclose()


async def test_plan_minutes_are_drawn_first_then_money(balances: RedisBalances, now: int) -> None:
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    plan = plan_of("a", 120, now)  # 2 minutes this month
    out = await balances.apply_debits(
        {"a": [call(1, 60, now), call(2, 90, now, fee=500)]}, now, plan
    )
    # call 1: 60 s included; call 2: 60 s included, 30 s at 1_000/s, plus the connect fee
    assert out[0].codes == "nn"
    assert out[0].draws == {0: (0, 60), 1: (500 + 30_000, 60)}
    assert out[0].balance == 1_000_000 - 30_500
    grants = parse_bucket(await balances.bucket("a"))
    assert [(g.id, g.remaining_s) for g in grants] == [(f"p{month_period(now)[0]}", 0)]
    # the period's allowance is not granted again when spent
    again = await balances.apply_debits({"a": [call(3, 6, now)]}, now, plan)
    assert again[0].draws == {} and again[0].balance == 1_000_000 - 30_500 - 6_000


async def test_a_call_answered_in_the_month_before_draws_that_months_allowance_once(
    balances: RedisBalances, now: int
) -> None:
    """A call answered in a month's last seconds and ended in the next draws on the month it
    was answered in, whose grant no charge had created; once that grant is past its keep
    (a day), it is never created again: a period's allowance is given once."""
    start, end = month_period(now)
    prev = month_period(start - 1)[0]
    plan = {"a": PlanPeriod(120, start, end, prev)}
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    t = start + 100
    out = await balances.apply_debits(
        {"a": [call(1, 90, t, answered=start - 30), call(2, 60, t, answered=start - 10)]}, t, plan
    )
    # call 1: 90 s of last month's 120; call 2: the 30 s left, then 30 s at 1_000/s
    assert out[0].draws == {0: (0, 90), 1: (30_000, 30)}
    assert out[0].balance == 1_000_000 - 30_000
    grants = parse_bucket(await balances.bucket("a"))
    assert sorted((g.id, g.remaining_s) for g in grants) == [(f"p{prev}", 0), (f"p{start}", 120)]
    # a call of this month does not touch last month's grant, nor last month's this one
    out = await balances.apply_debits({"a": [call(3, 60, t, answered=t)]}, t, plan)
    assert out[0].draws == {0: (0, 60)}
    # a day past last month's end its grant no longer gives (dropped at the bucket's next
    # write), and it is never granted again
    late = start + 86_400 + 1
    out = await balances.apply_debits({"a": [call(4, 60, late, answered=start - 5)]}, late, plan)
    assert out[0].draws == {} and out[0].balance == 1_000_000 - 30_000 - 60_000
    out = await balances.apply_debits({"a": [call(5, 6, late, answered=late)]}, late, plan)
    assert out[0].draws == {0: (0, 6)}
    out = await balances.apply_debits({"a": [call(6, 60, late, answered=start - 1)]}, late, plan)
    assert out[0].draws == {}
    grants = parse_bucket(await balances.bucket("a"))
    assert [(g.id, g.remaining_s) for g in grants] == [(f"p{start}", 54)]


async def test_the_month_before_is_not_granted_past_its_keep_nor_without_a_call_of_it(
    balances: RedisBalances, now: int
) -> None:
    start, end = month_period(now)
    prev = month_period(start - 1)[0]
    plan = {"a": PlanPeriod(120, start, end, prev)}
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    # no call of last month: its grant is not written
    t = start + 10
    await balances.apply_debits({"a": [call(1, 6, t)]}, t, plan)
    grants = parse_bucket(await balances.bucket("a"))
    assert [(g.id, g.remaining_s) for g in grants] == [(f"p{start}", 114)]
    # past the keep, even a call of last month (a late hangup) is charged in money
    late = start + 86_400
    out = await balances.apply_debits({"a": [call(2, 60, late, answered=start - 60)]}, late, plan)
    assert out[0].draws == {} and out[0].balance == 1_000_000 - 60_000
    # a period that does not end after it starts is refused, before anything is written
    bad = {"a": PlanPeriod(120, start, start, prev)}
    with pytest.raises(Exception, match="plan period"):
        await balances.apply_debits({"a": [call(3, 6, t)]}, t, bad)
    assert (await balances.get("a")).balance == 1_000_000 - 60_000  # type: ignore[union-attr]


async def test_a_duplicate_draws_nothing_and_reports_the_first_draw(
    balances: RedisBalances, now: int
) -> None:
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    plan = plan_of("a", 60, now)
    first = await balances.apply_debits({"a": [call(1, 90, now), call(1, 90, now)]}, now, plan)
    assert first[0].codes == "nd"
    assert first[0].draws == {0: (30_000, 60), 1: (30_000, 60)}
    later = await balances.apply_debits({"a": [call(1, 90, now)]}, now, plan)
    assert later[0].codes == "d" and later[0].dup_amounts == [30_000]
    assert later[0].draws == {0: (30_000, 60)}
    assert later[0].balance == 1_000_000 - 30_000


async def test_grants_are_valid_in_their_window_soonest_to_expire_first(
    balances: RedisBalances, now: int
) -> None:
    await balances.create_account("a", balance=10_000_000, credit_limit=0, low_threshold=0)
    for gid, secs, frm, to in (
        ("blong", 600, now - 100, now + 30 * 86_400),
        ("bshort", 60, now - 100, now + 60),
    ):
        r = await balances.grant_minutes(
            "a", gid, price=0, seconds=secs, valid_from=frm, expires_at=to, now_s=now
        )
        assert r.result == "applied"
    # answered before either grant existed: money only
    out = await balances.apply_debits({"a": [call(1, 60, now, answered=now - 200)]}, now)
    assert out[0].draws == {}
    out = await balances.apply_debits({"a": [call(2, 90, now)]}, now)
    assert out[0].draws == {0: (0, 90)}
    left = {g.id: g.remaining_s for g in parse_bucket(await balances.bucket("a"))}
    assert left == {"blong": 570}  # the short one was spent first, then dropped


async def test_concurrent_events_never_overdraw_or_double_spend_a_bucket(
    balances: RedisBalances, now: int
) -> None:
    await balances.create_account("a", balance=100_000_000, credit_limit=0, low_threshold=0)
    plan = plan_of("a", 300, now)  # 5 minutes
    # 20 calls of 60 s, each sent by 3 concurrent callers (duplicates racing each other;
    # 60 at once, within the client's pool of 100 connections)
    batches = [{"a": [call(i, 60, now)]} for i in range(20) for _ in range(3)]
    outs = await asyncio.gather(*(balances.apply_debits(b, now, plan) for b in batches))
    new = [o[0] for o in outs if o[0].codes == "n"]
    assert len(new) == 20
    drawn = sum(o.draws.get(0, (0, 0))[1] for o in new)
    assert drawn == 300
    assert parse_bucket(await balances.bucket("a"))[0].remaining_s == 0
    st = await balances.get("a")
    assert st is not None and st.balance == 100_000_000 - (20 * 60 - 300) * 1_000


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    included=st.integers(0, 2_000),
    bundle=st.integers(0, 2_000),
    durations=st.lists(st.integers(1, 700), min_size=1, max_size=12),
    order=st.lists(st.integers(0, 11), min_size=1, max_size=30),
)
def test_bucket_property_never_negative_never_twice(
    services: Services, included: int, bundle: int, durations: list[int], order: list[int]
) -> None:
    """Events (ids may repeat: duplicates) applied by concurrent callers: the seconds drawn
    add up to at most what was granted, each event draws once, and money + drawn seconds
    price every distinct call exactly."""

    # an event id always carries the same call (a duplicate is a byte-identical redelivery)
    calls = [(i % len(durations), durations[i % len(durations)]) for i in order]

    now = int(time.time())

    async def scenario() -> None:
        r = aioredis.Redis.from_url(services.redis_url)
        b = RedisBalances(r)
        acct = f"prop_{time.monotonic_ns()}"
        try:
            await b.create_account(acct, balance=10**12, credit_limit=0, low_threshold=0)
            if bundle:
                await b.grant_minutes(
                    acct,
                    "bx",
                    price=0,
                    seconds=bundle,
                    valid_from=0,
                    expires_at=now + 86_400,
                    now_s=now,
                )
            plan = plan_of(acct, included, now)
            batches = [{acct: [call(i, s * 6, now)]} for i, s in calls]
            outs = await asyncio.gather(*(b.apply_debits(x, now, plan) for x in batches))
            first: dict[int, tuple[int, int]] = {}
            for (i, s), o in zip(calls, outs, strict=True):
                amount = o[0].draws.get(0, (time_cost(s * 6, 60_000), 0))
                if o[0].codes == "n":
                    assert i not in first
                    first[i] = amount
                else:
                    assert o[0].codes == "d"
            for (i, _), o in zip(calls, outs, strict=True):
                if o[0].codes == "d":  # a duplicate reports the first draw, takes nothing
                    assert o[0].dup_amounts[0] == first[i][0]
            total_drawn = sum(d for _, d in first.values())
            assert 0 <= total_drawn <= included + bundle
            billed = {i: s * 6 for i, s in set(calls)}
            assert total_drawn == min(included + bundle, sum(billed.values()))
            for i, (amount, drawn) in first.items():
                assert amount == time_cost(billed[i] - drawn, 60_000)
            left = sum(g.remaining_s for g in parse_bucket(await b.bucket(acct)))
            assert left == included + bundle - total_drawn
            st_ = await b.get(acct)
            assert st_ is not None and st_.balance == 10**12 - sum(a for a, _ in first.values())
        finally:
            await r.aclose()

    asyncio.run(scenario())


# -- with PostgreSQL: bundles, processor, managed accounts, versions -------------------------


async def _plans(conns: Connections) -> None:
    await put_plan(conns.pool, PlanSpec(id="flat300", included_minutes=5))
    await put_bundle(
        conns.pool,
        BundleSpec.model_validate(
            {"id": "b150", "minutes": 150, "price": "3.00", "validity_days": 30}
        ),
    )


async def test_buy_bundle_is_paid_from_the_balance_once(conns: Connections, seed: Seeder) -> None:
    await seed("acc_1", balance="5.00")
    await _plans(conns)
    p = await buy_bundle(conns.pool, conns.balances, "acc_1", "b150", "order-1")
    assert p.applied and p.seconds == 9_000 and p.price == 3_000_000 and p.balance == 2_000_000
    again = await buy_bundle(conns.pool, conns.balances, "acc_1", "b150", "order-1")
    assert not again.applied and again.balance == 2_000_000
    with pytest.raises(BundleError) as err:
        await buy_bundle(conns.pool, conns.balances, "acc_1", "b150", "order-2")
    assert err.value.reason == "insufficient_credit"
    with pytest.raises(BundleError):
        await buy_bundle(conns.pool, conns.balances, "acc_1", "nope", "order-3")
    grants = parse_bucket(await conns.balances.bucket("acc_1"))
    assert [(g.id, g.remaining_s) for g in grants] == [("border-1", 9_000)]
    rows = await conns.pool.fetch("SELECT amount, kind FROM ledger WHERE kind = 'bundle'")
    assert [(r["amount"], r["kind"]) for r in rows] == [(-3_000_000, "bundle")]
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_a_purchase_retried_after_redis_was_rebuilt_is_not_granted_again(
    conns: Connections, seed: Seeder
) -> None:
    from balance.accounts import load_into_redis

    await seed("acc_1", balance="10.00")
    await _plans(conns)
    await buy_bundle(conns.pool, conns.balances, "acc_1", "b150", "order-1")
    await conns.redis.flushall()  # Redis lost: rebuilt from the book of record
    await load_into_redis(conns.pool, conns.balances, ["acc_1"])
    again = await buy_bundle(conns.pool, conns.balances, "acc_1", "b150", "order-1")
    assert not again.applied and again.balance == 7_000_000  # 10.00 - 3.00, once
    grants = parse_bucket(await conns.balances.bucket("acc_1"))
    assert [(g.id, g.remaining_s) for g in grants] == [("border-1", 9_000)]
    assert (await reconcile(conns.pool, conns.balances)).ok


def _processor(conns: Connections, catalog: Catalog) -> MeteringProcessor:
    return harness.processor(conns, catalog)


async def test_processor_draws_plan_minutes_and_records_them(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_0")  # creates the demo price list
    await _plans(conns)
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate(
                {"id": "flat", "price_list_id": "standard", "plan_id": "flat300", "balance": "1.00"}
            )
        ],
    )
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    p = _processor(conns, catalog)
    # US at 0.007/min, 6/6: 240 s then 120 s: the second call has 60 s left to draw
    calls = [
        call_hangup("flat", "c1", "+14155550123", 240),
        call_hangup("flat", "c2", "+14155550123", 120),
    ]
    out = await p.process([call_record(e, i) for i, e in enumerate(calls)])
    assert out.charged == 2
    rows = await conns.pool.fetch(
        "SELECT ref, amount, quantity, included_s FROM ledger WHERE kind = 'call' ORDER BY ref"
    )
    assert [tuple(r) for r in rows] == [("c1", 0, 240, 240), ("c2", -7_000, 120, 60)]
    st_ = await conns.balances.get("flat")
    assert st_ is not None and st_.balance == 1_000_000 - 7_000
    # the same events again (a redelivery): nothing drawn, nothing charged
    again = await p.process([call_record(e, i) for i, e in enumerate(calls)])
    assert again.duplicates == 2 and again.charged == 0
    assert parse_bucket(await conns.balances.bucket("flat"))[0].remaining_s == 0
    assert (await reconcile(conns.pool, conns.balances)).ok
    # the estimate sees the spent allowance: money only now
    est = await estimate(catalog, conns.balances, "flat", to="+14155550123", seconds=61)
    assert (est.billed_s, est.included_s, est.cost) == (66, 0, 7_700)
    sms = await estimate(catalog, conns.balances, "flat", sms_parts=2)
    assert sms.cost == 8_000


async def test_managed_accounts_inherit_the_managers_price_list(
    conns: Connections, seed: Seeder
) -> None:
    await seed("boss")
    await conns.pool.execute(
        "INSERT INTO price_lists (id, inbound_per_min, sms_per_part) VALUES ('own', 0, 1)"
    )
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec(id="sub_1", manager_id="boss"),
            AccountSpec(id="sub_2", manager_id="boss", price_list_id="own"),
        ],
    )
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    await catalog.resolve(["boss", "sub_1", "sub_2"])
    boss, sub1, sub2 = (catalog.get(a) for a in ("boss", "sub_1", "sub_2"))
    assert boss and sub1 and sub2
    assert (boss.price_list.id, boss.inherited) == ("standard", False)
    assert (sub1.price_list.id, sub1.inherited) == ("standard", True)
    assert (sub2.price_list.id, sub2.inherited) == ("own", False)
    with pytest.raises(ValueError, match="managed"):
        await create_accounts(conns.pool, conns.balances, [AccountSpec(id="x", manager_id="sub_1")])


async def test_a_running_processor_picks_up_a_new_price_list_version(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="100.00")
    async with harness.running_worker(settings, conns) as outcomes:
        first = call_hangup("acc_1", "c1", "+33142685300", 60)  # France 0.016/min, 1/1
        await produce(conns.producer, topics.CALL_EVENTS, [first])
        await eventually(lambda: _charged(outcomes, 1))
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        await import_rates(
            conns.pool,
            "standard",
            parse_csv(f"prefix,rate_per_min,effective_from\n33,0.5,{since}\n", default_from=0),
        )
        await asyncio.sleep(1.2)  # the worker's catalog checks the version every second
        second = call_hangup("acc_1", "c2", "+33142685300", 60)
        sms = message_sent("acc_1", "m1", "+33142685300", 1)
        await produce(conns.producer, topics.CALL_EVENTS, [second])
        await produce(conns.producer, topics.MESSAGE_EVENTS, [sms])
        await eventually(lambda: _charged(outcomes, 3))
    amounts = dict(
        await conns.pool.fetch("SELECT ref, amount FROM ledger WHERE kind IN ('call', 'sms')")
    )
    assert amounts == {"c1": -16_000, "c2": -500_000, "m1": -4_000}


async def _charged(outcomes: list[object], n: int) -> bool:
    return sum(o.charged for o in outcomes) >= n  # type: ignore[attr-defined]
