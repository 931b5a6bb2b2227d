"""A number's life on an injected clock, against the real Redis and PostgreSQL (and, at the end,
the real broker with both workers): each month's renewal charged once, hold -> grace ->
renewed and hold -> grace -> released, auto-pay off, auto-recharge's chance, the credit limit,
a customer's release, a number activated again, and a crash between Redis and the ledger.

Every date here is the clock's (``SettableClock``): the Lua scripts take ``now`` as an
argument, PostgreSQL is given every time it stores, so a renewal at 1 January 00:00:30 is
tested for real whatever the machines' clocks say."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from balance.accounts import AccountSpec, create_accounts, load_into_redis, put_price_list
from balance.store import RedisBalances
from contracts import topics
from contracts.signals import Signal
from enforcement.billing_worker import run_billing, valid_event
from enforcement.numbers import (
    NumberLifecycle,
    NumberRules,
    get,
    next_period,
    period_start,
    set_auto_pay,
)
from infra.clock import SettableClock
from infra.db import create_pool
from infra.kafkatools import read_all
from infra.ledger import PostgresLedger
from infra.settings import Settings
from meter.traffic import demo_price_list, number_event
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests import harness
from tests.conftest import eventually
from tests.helpers import produce

NUMBER = "+14155550199"
OTHER = "+14155550142"
MONTHLY = 1_000_000  # 1.00
SETUP = 500_000
GRACE_S = 7 * 86_400
WAIT_S = 600


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@dataclass
class World:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    clock: SettableClock
    balances: RedisBalances
    catalog: Catalog
    numbers: NumberLifecycle

    def at(self, text: str) -> datetime:
        self.clock.set(utc(text))
        return utc(text)

    async def seed(
        self, account: str, balance: str, *, credit_limit: str = "0", monthly: int = MONTHLY
    ) -> None:
        spec = demo_price_list(f"pl_{account}").model_copy(
            update={"number_monthly_fee": monthly, "one_time_fees": {"number_setup": SETUP}}
        )
        await put_price_list(self.pool, spec)
        await create_accounts(
            self.pool,
            self.balances,
            [
                AccountSpec.model_validate(
                    {
                        "id": account,
                        "price_list_id": f"pl_{account}",
                        "balance": balance,
                        "credit_limit": credit_limit,
                    }
                )
            ],
        )
        await self.catalog.refresh()

    async def event(self, type_: str, account: str, number: str, at: datetime, **kw: str) -> str:
        raw = orjson.dumps(number_event(type_, account, number, at=at, **kw))
        ev = valid_event(
            account.encode(), raw, now=at.timestamp(), max_skew_s=300, max_bytes=65_536
        )
        assert not isinstance(ev, str), ev
        return await self.numbers.on_event(ev)

    async def signals(self, account: str) -> list[tuple[str, str, str | None]]:
        """The number signals queued for ``account`` (type, reason, number), checked to be in
        strictly increasing seq."""
        box = await self.balances.pending_outbox(account)
        seqs = [s.seq for s in box]
        assert seqs == sorted(set(seqs))
        return [(s.type, s.reason, s.number) for s in box if s.type.startswith("number.")]

    async def fees(self, account: str) -> list[tuple[int, str, str]]:
        rows = await self.pool.fetch(
            "SELECT amount, rate_ref, event_id FROM ledger WHERE account_id = $1"
            " AND kind = 'fee' ORDER BY event_time, event_id",
            account,
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def balance(self, account: str) -> int:
        st = await self.balances.get(account)
        assert st is not None
        return st.balance

    async def pay(self, account: str, payment_id: str, amount: int) -> None:
        """A settled payment, as the payment service books it: the ledger's credit and
        Redis's, once each."""
        async with self.pool.acquire() as conn:
            await PostgresLedger(self.pool).record_payment(
                conn,
                account_id=account,
                payment_id=payment_id,
                captured=amount,
                gateway_ref="sandbox:" + payment_id,
                at=datetime.fromtimestamp(self.clock(), UTC),
            )
        await self.balances.credit(account, "payment:" + payment_id, amount, payment=True)

    async def status(self, account: str, number: str) -> str:
        n = await get(self.pool, account, number)
        assert n is not None
        return n.status


@pytest.fixture
async def world(db_settings: Settings) -> AsyncIterator[World]:
    pool = await create_pool(db_settings.database_url, max_size=4)
    r = aioredis.Redis.from_url(db_settings.redis_url)
    clock = SettableClock(utc("2026-12-10T09:00:00+00:00"))
    balances = RedisBalances(r, clock=clock)
    catalog = Catalog(pool)
    lifecycle = NumberLifecycle(
        pool,
        balances,
        catalog.lookup,
        rules=NumberRules(grace_s=GRACE_S, recharge_wait_s=WAIT_S),
        clock=clock,
    )
    try:
        yield World(pool, r, clock, balances, catalog, lifecycle)
    finally:
        await r.aclose()
        await pool.close()


def test_periods_roll_over_at_year_ends() -> None:
    assert next_period("2026-12") == "2027-01"
    assert next_period("2027-01") == "2027-02"
    assert next_period("2028-02") == "2028-03"
    assert period_start("2027-01") == utc("2027-01-01T00:00:00+00:00")


# (activated, last second of the month, first moments of the next, the month renewed)
EDGES = [
    pytest.param(
        "2026-12-15T10:00:00+00:00",
        "2026-12-31T23:59:59+00:00",
        "2027-01-01T00:00:30+00:00",
        "2027-01",
        id="year_end",
    ),
    pytest.param(
        "2027-01-20T10:00:00+00:00",
        "2027-01-31T23:59:59+00:00",
        "2027-02-01T00:00:01+00:00",
        "2027-02",
        id="month_end",
    ),
    pytest.param(
        "2028-02-29T12:00:00+00:00",
        "2028-02-29T23:59:59+00:00",
        "2028-03-01T00:00:00+00:00",
        "2028-03",
        id="leap_day",
    ),
]


@pytest.mark.parametrize(("activated", "last", "first", "period"), EDGES)
async def test_the_month_is_renewed_once_at_its_start(
    world: World, activated: str, last: str, first: str, period: str
) -> None:
    await world.seed("acc", "20.00")
    assert await world.event("number.activated", "acc", NUMBER, world.at(activated)) == "activated"
    n = await get(world.pool, "acc", NUMBER)
    assert n is not None
    assert (n.status, n.auto_pay, n.paid_through) == ("active", True, activated[:7])
    assert (n.monthly_fee, n.one_time_fees) == (MONTHLY, SETUP)
    assert n.next_renewal == period_start(period)

    world.at(last)
    assert await world.numbers.tick() == {}  # nothing is due in the month paid for
    world.at(first)
    assert await world.numbers.tick() == {"renewed": 1}
    # Every way of asking again: ticks, inventory's announcement of the same month, replays.
    assert await world.numbers.tick() == {}
    assert (
        await world.event("number.renewal_due", "acc", NUMBER, world.at(first), period=period)
        == "current"
    )
    world.clock.advance(86_400)
    assert await world.numbers.tick() == {}

    assert await world.fees("acc") == [
        (-MONTHLY, f"pl_acc:monthly:{period}", f"renewal:{NUMBER}:1:{period}")
    ]
    assert await world.balance("acc") == 20_000_000 - MONTHLY
    n = await get(world.pool, "acc", NUMBER)
    assert n is not None and n.paid_through == period and n.status == "active"
    assert await world.signals("acc") == []
    assert (await reconcile(world.pool, world.balances)).ok


async def test_hold_grace_then_a_payment_renews_once(world: World) -> None:
    await world.seed("acc", "0.50")
    await world.event("number.activated", "acc", NUMBER, world.at("2026-12-10T09:00:00+00:00"))
    world.at("2027-01-01T00:00:30+00:00")
    assert await world.numbers.tick() == {"held": 1}
    n = await get(world.pool, "acc", NUMBER)
    assert n is not None and n.status == "on_hold" and n.hold_reason == "renewal_unpaid"
    assert n.grace_until == utc("2027-01-01T00:00:30+00:00") + timedelta(seconds=GRACE_S)
    assert await world.signals("acc") == [("number.hold", "renewal_unpaid", NUMBER)]

    world.clock.advance(3_600)
    assert await world.numbers.tick() == {"waiting": 1}  # still short: no second hold
    assert await world.fees("acc") == []

    world.clock.advance(2 * 86_400)
    await world.pay("acc", "p1", 5_000_000)
    assert await world.numbers.tick() == {"renewed": 1}
    assert await world.signals("acc") == [
        ("number.hold", "renewal_unpaid", NUMBER),
        ("number.resume", "renewed", NUMBER),
    ]
    # Past the grace period and into the next day: nothing more, charged once.
    world.at("2027-01-20T00:00:00+00:00")
    assert await world.numbers.tick() == {}
    assert [f[1] for f in await world.fees("acc")] == ["pl_acc:monthly:2027-01"]
    assert await world.balance("acc") == 500_000 + 5_000_000 - MONTHLY
    assert await world.status("acc", NUMBER) == "active"
    assert (await reconcile(world.pool, world.balances)).ok


async def test_hold_grace_then_released_and_never_charged_again(world: World) -> None:
    await world.seed("acc", "0.50")
    await world.event("number.activated", "acc", NUMBER, world.at("2027-01-20T09:00:00+00:00"))
    held_at = world.at("2027-02-01T00:00:01+00:00")
    assert await world.numbers.tick() == {"held": 1}
    world.clock.set(held_at + timedelta(seconds=GRACE_S - 1))
    assert await world.numbers.tick() == {"waiting": 1}
    world.clock.set(held_at + timedelta(seconds=GRACE_S))
    assert await world.numbers.tick() == {"released": 1}
    n = await get(world.pool, "acc", NUMBER)
    assert n is not None and n.status == "released" and n.release_reason == "grace_expired"
    assert n.next_renewal is None

    # Money arrives, months pass, inventory announces a month: nothing is charged any more.
    await world.pay("acc", "late", 10_000_000)
    world.at("2027-03-01T00:00:05+00:00")
    assert await world.numbers.tick() == {}
    assert (
        await world.event(
            "number.renewal_due",
            "acc",
            NUMBER,
            world.at("2027-03-02T00:00:00+00:00"),
            period="2027-03",
        )
        == "ignored"
    )
    assert await world.fees("acc") == []
    assert await world.balance("acc") == 500_000 + 10_000_000
    assert await world.signals("acc") == [
        ("number.hold", "renewal_unpaid", NUMBER),
        ("number.release", "grace_expired", NUMBER),
    ]
    assert (await reconcile(world.pool, world.balances)).ok


async def test_auto_pay_off_holds_without_charging_and_turning_it_on_renews(world: World) -> None:
    await world.seed("acc", "20.00")
    await world.event("number.activated", "acc", NUMBER, world.at("2026-12-10T09:00:00+00:00"))
    assert await set_auto_pay(
        world.pool, "acc", NUMBER, False, now=world.at("2026-12-11T00:00:00+00:00")
    )
    world.at("2027-01-01T00:00:30+00:00")
    assert await world.numbers.tick() == {"held": 1}
    assert await world.signals("acc") == [("number.hold", "auto_pay_off", NUMBER)]
    assert await world.fees("acc") == []
    world.clock.advance(86_400)
    assert await set_auto_pay(
        world.pool, "acc", NUMBER, True, now=world.at("2027-01-02T00:00:00+00:00")
    )
    assert await world.numbers.tick() == {"renewed": 1}
    assert await world.signals("acc") == [
        ("number.hold", "auto_pay_off", NUMBER),
        ("number.resume", "renewed", NUMBER),
    ]
    assert await world.balance("acc") == 20_000_000 - MONTHLY
    assert not await set_auto_pay(
        world.pool, "acc", OTHER, True, now=world.at("2027-01-02T00:00:00+00:00")
    )


async def test_a_renewal_never_takes_the_balance_below_the_credit_limit(world: World) -> None:
    await world.seed("acc", "0.40", credit_limit="0.60")  # available 1.00: exactly one month
    await world.event("number.activated", "acc", NUMBER, world.at("2026-11-05T09:00:00+00:00"))
    world.at("2026-12-01T00:00:00+00:00")
    assert await world.numbers.tick() == {"renewed": 1}
    assert await world.balance("acc") == 400_000 - MONTHLY  # -0.60: the limit, not past it
    world.at("2027-01-01T00:00:00+00:00")
    assert await world.numbers.tick() == {"held": 1}
    assert await world.balance("acc") == -600_000


async def test_auto_recharge_gets_its_chance_before_the_hold(world: World) -> None:
    await world.seed("acc", "0.50")
    await world.seed("poor", "0.50")
    for account in ("acc", "poor"):
        await world.balances.set_auto_recharge(account, 2_000_000)  # threshold 2.00
        await world.event(
            "number.activated", account, NUMBER, world.at("2026-12-10T09:00:00+00:00")
        )
    start = world.at("2027-01-01T00:00:30+00:00")
    assert await world.numbers.tick() == {"waiting": 2}
    for account in ("acc", "poor"):
        box = await world.balances.pending_outbox(account)
        assert [s.type for s in box] == ["recharge.requested"]  # the trigger fired once
    world.clock.set(start + timedelta(seconds=WAIT_S - 1))
    assert await world.numbers.tick() == {"waiting": 2}
    await world.pay("acc", "recharge-1", 10_000_000)  # the recharge lands for one of them
    assert await world.numbers.tick() == {"renewed": 1, "waiting": 1}
    world.clock.set(start + timedelta(seconds=WAIT_S))
    assert await world.numbers.tick() == {"held": 1}
    assert await world.signals("acc") == []  # renewed: never held
    assert await world.signals("poor") == [("number.hold", "renewal_unpaid", NUMBER)]


async def test_a_customers_release_is_at_once_and_final(world: World) -> None:
    await world.seed("acc", "20.00")
    await world.event("number.activated", "acc", NUMBER, world.at("2026-12-10T09:00:00+00:00"))
    world.at("2026-12-20T12:00:00+00:00")
    n = await world.numbers.release("acc", NUMBER)
    assert n is not None and n.status == "released" and n.release_reason == "customer"
    again = await world.numbers.release("acc", NUMBER)  # safe to repeat: one signal
    assert again is not None and again.released_at == n.released_at
    assert await world.numbers.release("acc", OTHER) is None
    world.at("2027-01-01T00:00:30+00:00")
    assert await world.numbers.tick() == {}
    assert await world.fees("acc") == []  # the month paid is not refunded, none is charged
    assert await world.balance("acc") == 20_000_000
    assert await world.signals("acc") == [("number.release", "customer", NUMBER)]


async def test_inventory_deactivation_and_a_new_activation_start_a_new_lease(world: World) -> None:
    await world.seed("acc", "20.00")
    await world.event("number.activated", "acc", NUMBER, world.at("2026-12-10T09:00:00+00:00"))
    first = world.at("2026-12-28T00:00:00+00:00")
    # Inventory announces January early: charged now, not again at the month's start.
    assert (
        await world.event("number.renewal_due", "acc", NUMBER, first, period="2027-01") == "renewed"
    )
    assert (
        await world.event(
            "number.deactivated", "acc", NUMBER, world.at("2026-12-29T00:00:00+00:00")
        )
        == "deactivated"
    )
    assert await world.signals("acc") == []  # inventory took it back: telephony knows
    # A late copy of the first activation changes nothing; a new one is a new lease.
    assert (
        await world.event("number.activated", "acc", NUMBER, utc("2026-12-10T09:00:00+00:00"))
        == "ignored"
    )
    assert (
        await world.event("number.activated", "acc", NUMBER, world.at("2027-01-15T00:00:00+00:00"))
        == "activated"
    )
    n = await get(world.pool, "acc", NUMBER)
    assert n is not None and (n.lease, n.status, n.paid_through) == (2, "active", "2027-01")
    world.at("2027-02-01T00:00:00+00:00")
    assert await world.numbers.tick() == {"renewed": 1}
    assert [f[2] for f in await world.fees("acc")] == [
        f"renewal:{NUMBER}:1:2027-01",
        f"renewal:{NUMBER}:2:2027-02",
    ]


async def test_an_early_announcement_the_credit_cannot_cover_waits_for_the_month(
    world: World,
) -> None:
    await world.seed("acc", "0.50")
    await world.event("number.activated", "acc", NUMBER, world.at("2026-12-10T09:00:00+00:00"))
    at = world.at("2026-12-28T00:00:00+00:00")
    assert await world.event("number.renewal_due", "acc", NUMBER, at, period="2027-01") == "waiting"
    assert await world.status("acc", NUMBER) == "active"  # December is paid: no hold yet
    world.at("2027-01-01T00:00:00+00:00")
    assert await world.numbers.tick() == {"held": 1}


async def test_a_crash_between_redis_and_the_ledger_is_mended_and_never_charged_twice(
    world: World,
) -> None:
    await world.seed("acc", "20.00")
    await world.event("number.activated", "acc", NUMBER, world.at("2026-12-10T09:00:00+00:00"))
    world.at("2027-01-01T00:00:30+00:00")
    # The worker died after Redis took the month, before the ledger had it:
    out = await world.balances.number_step("acc", "renew", NUMBER, "1:2027-01", fee=MONTHLY)
    assert out.result == "applied"
    assert not (await reconcile(world.pool, world.balances)).ok
    assert await world.numbers.tick() == {"renewed": 1}  # the ledger row, not a second debit
    assert await world.balance("acc") == 20_000_000 - MONTHLY
    assert (await reconcile(world.pool, world.balances)).ok

    # The ledger has February, the inventory row does not say so, and Redis was rebuilt
    # from the ledger (its memory of the step is gone): the ledger's word stops a repeat.
    world.at("2027-02-01T00:00:30+00:00")
    assert await world.numbers.tick() == {"renewed": 1}
    await world.pool.execute("UPDATE numbers SET paid_through = '2027-01'")  # a lost update
    await world.redis.flushall()
    await load_into_redis(world.pool, world.balances, ["acc"], now=int(world.clock()))
    assert await world.numbers.tick() == {"renewed": 1}
    assert len(await world.fees("acc")) == 2
    assert await world.balance("acc") == 20_000_000 - 2 * MONTHLY
    assert (await reconcile(world.pool, world.balances)).ok


async def test_the_balance_store_checks_every_value_of_a_step(world: World) -> None:
    from balance.errors import Refused

    await world.seed("acc", "20.00")
    bad = [
        ("renew", "+1|555", "1:2027-01", MONTHLY, "-"),  # a separator in the number
        ("renew", NUMBER, "1:2027-01|x", MONTHLY, "-"),
        ("renew", NUMBER, "1:2027-01", -5, "-"),
        ("hold", NUMBER, "1:2027-01", 0, "no|pipes"),
        ("hold", NUMBER, "1:2027-01", 7, "renewal_unpaid"),  # only a renewal takes money
        ("drop", NUMBER, "1", 0, "customer"),
    ]
    for action, number, token, fee, reason in bad:
        with pytest.raises(Refused):
            await world.balances.number_step(
                "acc",
                action,  # type: ignore[arg-type]  # "drop" on purpose
                number,
                token,
                fee=fee,
                reason=reason,
            )
    assert await world.balance("acc") == 20_000_000
    assert await world.balances.pending_outbox("acc") == []
    gone = await world.balances.number_step("ghost", "hold", NUMBER, "1:2027-01", reason="x")
    assert gone.result == "unknown_account"


async def test_the_worker_skips_what_the_metering_workers_dead_letter() -> None:
    now = utc("2026-12-10T09:00:00+00:00")
    good = number_event("number.activated", "acc", NUMBER, at=now)

    def check(key: bytes | None, value: bytes | None) -> object:
        return valid_event(key, value, now=now.timestamp(), max_skew_s=300, max_bytes=4096)

    assert not isinstance(check(b"acc", orjson.dumps(good)), str)
    assert check(b"acc", None) == "schema"
    assert check(b"acc", b"\xff\x00 not json") == "schema"
    assert check(b"acc", b"x" * 5000) == "oversized"
    assert check(b"other", orjson.dumps(good)) == "key_mismatch"
    late = number_event("number.activated", "acc", NUMBER, at=now + timedelta(hours=1))
    assert check(b"acc", orjson.dumps(late)) == "future_timestamp"
    far = number_event("number.renewal_due", "acc", NUMBER, at=now, period="2027-03")
    assert check(b"acc", orjson.dumps(far)) == "bad_period"
    hangup = orjson.loads(orjson.dumps(good))
    hangup["type"] = "message.sent"
    assert check(b"acc", orjson.dumps(hangup)) == "schema"


async def test_both_workers_on_the_real_broker_publish_the_hold_with_its_number(
    settings: Settings, conns: Connections
) -> None:
    """``meter run billing`` keeps the inventory from the topic and holds the number at the
    month's start; ``meter run metering`` charges the activation and publishes the hold, with
    its ``number``, on billing.control-signals."""
    spec = demo_price_list("pl_num").model_copy(
        update={"number_monthly_fee": MONTHLY, "one_time_fees": {"number_setup": SETUP}}
    )
    await put_price_list(conns.pool, spec)
    await create_accounts(
        conns.pool,
        conns.balances,
        [AccountSpec.model_validate({"id": "acc", "price_list_id": "pl_num", "balance": "2.00"})],
    )
    # The activation is now (the metering worker rates it on the real clock); the numbers
    # worker's clock then moves to the first second of the month after.
    now = datetime.now(UTC).replace(microsecond=0)
    clock = SettableClock(now)
    await produce(
        conns.producer,
        topics.NUMBER_EVENTS,
        [number_event("number.activated", "acc", NUMBER, at=now)],
    )
    steps: list[str] = []
    stop = asyncio.Event()
    fast = replace(settings, billing_scan_interval_s=0.2, billing_worker_group="meter-billing-test")
    task = asyncio.create_task(run_billing(fast, stop, clock=clock, on_step=steps.append))
    try:
        async with harness.running_worker(settings, conns):
            await eventually(lambda: _has(steps, "activated"))
            # 2.00 - (0.50 + 1.00) = 0.50 left after the activation: next month is short.
            await eventually(lambda: _balance_is(conns, "acc", 500_000))
            clock.set(period_start(next_period(f"{now.year:04d}-{now.month:02d}")))
            await eventually(lambda: _has(steps, "held"))

            async def published() -> bool:
                return any(s.type == "number.hold" for s in await _signals(settings))

            await eventually(published)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    held = [s for s in await _signals(settings) if s.type == "number.hold"]
    assert len(held) == 1
    assert (held[0].data.number, held[0].data.reason) == (NUMBER, "renewal_unpaid")


async def _has(steps: list[str], outcome: str) -> bool:
    return outcome in steps


async def _balance_is(conns: Connections, account: str, amount: int) -> bool:
    st = await conns.balances.get(account)
    return st is not None and st.balance == amount


async def _signals(settings: Settings) -> list[Signal]:
    records = await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS)
    return [Signal.model_validate_json(r.value) for r in records]


def test_an_outbox_entry_of_a_number_decodes_with_its_number() -> None:
    from balance.replies import decode_outbox

    [s] = decode_outbox([b"7|number.hold|renewal_unpaid|+14155550199"])
    assert (s.seq, s.type, s.reason, s.number) == (7, "number.hold", "renewal_unpaid", NUMBER)
    [r] = decode_outbox([b"8|account.resume|credit_available"])
    assert r.number is None
