"""Auto-recharge and top-ups: the rules at their edges, the trigger decided atomically in the
balance scripts, and the payment service against real Redis and PostgreSQL with the sandbox
gateway (the Stripe adapter has its own suite in test_gateway.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import asyncpg
import pytest
import redis.asyncio as aioredis

from balance.accounts import AccountSpec, create_accounts, put_price_list
from balance.store import RedisBalances
from balance.values import RECHARGE_REQUESTED, Debit, RechargeState, StatusChange
from contracts.payments import Notification
from infra.db import create_pool
from infra.ledger import PostgresLedger
from infra.settings import Settings
from meter.traffic import demo_price_list
from recharge import policy
from recharge.gateway import ChargeRequest, ChargeResult
from recharge.policy import AccountTerms, PolicyRefusal
from recharge.sandbox import SandboxGateway
from recharge.service import PaymentError, PaymentService

USD = 1_000_000
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY = 19_000  # any UTC day number: the debits' dedup bucket


# --- the rules, pure -------------------------------------------------------------------------


def terms(age: timedelta = timedelta(0), level: int = 1) -> AccountTerms:
    return AccountTerms(T0 - age, level)


@pytest.mark.parametrize(
    ("amount", "ok"),
    [(9_990_000, False), (10_000_000, True), (10_010_000, True)],
)
def test_minimum_payment_edge(amount: int, ok: bool) -> None:
    if ok:
        policy.check_manual(amount, terms(), 0, T0)
    else:
        with pytest.raises(PolicyRefusal) as e:
            policy.check_manual(amount, terms(), 0, T0)
        assert e.value.code == "amount_below_minimum"


@pytest.mark.parametrize(
    ("age", "paid", "amount", "ok"),
    [
        # day one: $100 in all
        (timedelta(0), 0, 99_990_000, True),
        (timedelta(0), 0, 100_000_000, True),
        (timedelta(0), 0, 100_010_000, False),
        (timedelta(hours=23, minutes=59), 90_000_000, 10_000_000, True),
        (timedelta(hours=23, minutes=59), 90_010_000, 10_000_000, False),
        # day two: $150; the account's own day, not the calendar's
        (timedelta(days=1), 0, 150_000_000, True),
        (timedelta(days=1), 0, 150_010_000, False),
        (timedelta(days=1) - timedelta(seconds=1), 0, 100_010_000, False),
        (timedelta(days=1), 140_000_000, 10_000_000, True),
        (timedelta(days=1), 140_010_000, 10_000_000, False),
        # day three: $200
        (timedelta(days=2), 0, 199_990_000, True),
        (timedelta(days=2), 0, 200_000_000, True),
        (timedelta(days=2), 0, 200_010_000, False),
    ],
)
def test_new_account_limit_edges(age: timedelta, paid: int, amount: int, ok: bool) -> None:
    if ok:
        policy.check_manual(amount, terms(age), paid, T0)
    else:
        with pytest.raises(PolicyRefusal) as e:
            policy.check_manual(amount, terms(age), paid, T0)
        assert e.value.code == "payment_limit_exceeded"
        assert e.value.retry_at == T0 - age + timedelta(days=(age // timedelta(days=1)) + 1)


@pytest.mark.parametrize("amount", [100_010_000, 5_000_000_000])
def test_level_two_verification_lifts_the_limits(amount: int) -> None:
    policy.check_manual(amount, terms(level=2), 10_000_000_000, T0)
    with pytest.raises(PolicyRefusal):
        policy.check_manual(amount, terms(level=1), 0, T0)
    with pytest.raises(PolicyRefusal) as e:  # the minimum still holds
        policy.check_manual(9_990_000, terms(level=2), 0, T0)
    assert e.value.code == "amount_below_minimum"


def test_amount_brings_the_balance_up_to_threshold_plus_recharge() -> None:
    # threshold $20, recharge $50: from $19.99 -> $50.01; from -$30 -> $100
    assert policy.auto_amount(19_990_000, 20 * USD, 50 * USD) == 50_010_000
    assert policy.auto_amount(-30 * USD, 20 * USD, 50 * USD) == 100 * USD
    # rounded up to the cent, never down: credit covers the target
    assert policy.auto_amount(19_999_999, 20 * USD, 50 * USD) == 50_010_000
    # at least the minimum payment
    assert policy.auto_amount(65 * USD, 20 * USD, 10 * USD) == 10 * USD


def _decide(recent: list[datetime], now: datetime = T0, **kw: int) -> policy.AutoDecision:
    return policy.decide_auto(
        balance=kw.get("balance", 5 * USD),
        threshold=kw.get("threshold", 10 * USD),
        recharge=kw.get("recharge", 20 * USD),
        terms=terms(timedelta(days=kw.get("age_days", 30))),
        recent_auto=recent,
        paid_today=kw.get("paid_today", 0),
        now=now,
    )


def test_the_eleventh_recharge_in_24_hours_is_refused_and_the_window_rolls() -> None:
    ten = [T0 - timedelta(hours=23) + timedelta(minutes=10 * i) for i in range(10)]
    assert _decide(ten[:9]).action == "charge"
    d = _decide(ten)
    assert (d.action, d.reason) == ("refuse", "recharge_cap_reached")
    assert d.retry_at == ten[0] + timedelta(hours=24)
    # one second before the oldest leaves the window: still refused; at it: allowed
    assert _decide(ten, now=ten[0] + timedelta(hours=24) - timedelta(seconds=1)).action == "refuse"
    assert _decide(ten, now=ten[0] + timedelta(hours=24)).action == "charge"


def test_an_auto_recharge_is_lowered_to_what_the_day_limit_leaves() -> None:
    d = _decide([], balance=-200 * USD, age_days=0)  # wants $230, day one allows $100
    assert (d.action, d.amount, d.reason) == ("charge", 100 * USD, "lowered_to_day_limit")
    d = _decide([], balance=-200 * USD, age_days=0, paid_today=95 * USD)
    assert (d.action, d.reason) == ("refuse", "payment_limit_exceeded")  # $5 left < $10
    d = _decide([], balance=-200 * USD, age_days=0, paid_today=90 * USD)
    assert (d.action, d.amount) == ("charge", 10 * USD)


# --- the trigger, in Redis --------------------------------------------------------------------


@pytest.fixture
async def balances(redis_url: str) -> AsyncIterator[RedisBalances]:
    r = aioredis.Redis.from_url(redis_url)
    yield RedisBalances(r)
    await r.aclose()


def _debit(i: int, amount: int) -> Debit:
    return Debit(i.to_bytes(16, "big"), b"\x00" * 8, amount, DAY)


async def _triggers(balances: RedisBalances, account: str) -> list[int]:
    return [s.seq for s in await balances.pending_outbox(account) if s.type == RECHARGE_REQUESTED]


async def test_concurrent_events_crossing_the_threshold_fire_one_trigger(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=30 * USD, credit_limit=0, low_threshold=0)
    assert await balances.set_auto_recharge("a", 20 * USD) == 0  # above: nothing fires
    # 60 debits of $0.50 from 60 concurrent callers (separate round trips): the balance goes
    # from $30 to $0, crossing $20 once
    await asyncio.gather(
        *(balances.apply_debits({"a": [_debit(i, USD // 2)]}, 1_700_000_000) for i in range(60))
    )
    st = await balances.get("a")
    assert st is not None and st.balance == 0
    fired = await _triggers(balances, "a")
    assert len(fired) == 1
    state = await balances.recharge_state("a")
    threshold, open_seq = state.threshold, state.open_trigger
    assert (threshold, open_seq) == (20 * USD, fired[0])


async def test_the_trigger_rearms_only_after_credit_lifts_the_account_above(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=25 * USD, credit_limit=0, low_threshold=0)
    await balances.set_auto_recharge("a", 20 * USD)
    await balances.apply_debits({"a": [_debit(1, 6 * USD)]}, 1_700_000_000)
    await balances.apply_debits({"a": [_debit(2, 1 * USD)]}, 1_700_000_000)
    assert len(await _triggers(balances, "a")) == 1  # still the same crossing
    await balances.credit("a", "p1", 2 * USD)  # $20: at the threshold, not above
    assert (await balances.recharge_state("a")).open_trigger is not None
    await balances.credit("a", "p2", 30 * USD)  # $50: above, the latch opens
    assert (await balances.recharge_state("a")).open_trigger is None
    await balances.apply_debits({"a": [_debit(3, 31 * USD)]}, 1_700_000_000)
    assert len(await _triggers(balances, "a")) == 2  # a new crossing, a new trigger


async def test_turning_auto_recharge_on_for_a_low_account_fires_at_once(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=5 * USD, credit_limit=0, low_threshold=0)
    seq = await balances.set_auto_recharge("a", 20 * USD)
    assert seq and await _triggers(balances, "a") == [seq]
    assert await balances.set_auto_recharge("a", None) == 0
    await balances.apply_debits({"a": [_debit(1, USD)]}, 1_700_000_000)
    assert await _triggers(balances, "a") == [seq]  # off: no more triggers


async def test_a_pinned_hold_stays_until_a_payment_or_resume(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=50 * USD, credit_limit=0, low_threshold=0)
    assert await balances.set_status("a", "hold", "recharge_cap") == StatusChange(True, "hold")
    await balances.credit("a", "adj", USD)  # not a payment: still held
    out = await balances.apply_debits({"a": [_debit(1, USD)]}, 1_700_000_000)
    assert out[0].status == "hold"
    paid = await balances.credit("a", "pay", 10 * USD, payment=True)
    assert paid.status == "active"
    types = [s.type for s in await balances.pending_outbox("a")]
    assert types == ["account.hold", "account.resume"]  # the relay publishes both, in order


# --- the payment service ------------------------------------------------------------------------


class Collected:
    def __init__(self) -> None:
        self.items: list[Notification] = []

    async def notify(self, notification: Notification) -> None:
        self.items.append(notification)

    def types(self) -> list[str]:
        return [n.type for n in self.items]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
async def pool(db_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_settings.database_url)
    yield p
    await p.close()


MakeService = Callable[..., PaymentService]


class World(NamedTuple):
    """What a payment test stands on: real PostgreSQL and Redis, the sandbox gateway, the
    notifications it saw, and the clock the service reads (tests move it)."""

    pool: asyncpg.Pool
    balances: RedisBalances
    gateway: SandboxGateway
    notes: Collected
    clock: Clock


@pytest.fixture
async def world(pool: asyncpg.Pool, balances: RedisBalances) -> World:
    await put_price_list(pool, demo_price_list())
    return World(pool, balances, SandboxGateway(), Collected(), Clock(datetime.now(UTC)))


def _service(world: World, **kw: object) -> PaymentService:
    pool, balances, gw, notes, clock = world
    return PaymentService(pool, balances, gw, notes, clock=clock, sleep=_no_sleep, **kw)  # type: ignore[arg-type]


async def _account(
    pool: asyncpg.Pool,
    balances: RedisBalances,
    account: str,
    balance: str,
    *,
    age: timedelta = timedelta(days=30),
    level: int = 1,
) -> None:
    spec = AccountSpec.model_validate(
        {"id": account, "price_list_id": "standard", "balance": balance}
    )
    await create_accounts(pool, balances, [spec])
    await pool.execute(
        "UPDATE accounts SET created_at = now() - $2::interval, verification_level = $3"
        " WHERE id = $1",
        account,
        age,
        level,
    )


async def _drift(
    pool: asyncpg.Pool, balances: RedisBalances, account: str, debited: int = 0
) -> int:
    """Redis balance against the ledger; ``debited``: what the test took straight from Redis
    (no ledger row), so the payments' side alone is checked."""
    ledger = (await PostgresLedger(pool).balances([account]))[account]
    st = await balances.get(account)
    assert st is not None
    return st.balance - (ledger - debited)


async def test_a_trigger_charges_up_to_threshold_plus_recharge_and_credits_it(world: World) -> None:
    pool, balances, gw, notes, _ = world
    svc = _service(world)
    await _account(pool, balances, "a", "30.00")
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [_debit(1, 12_345_678)]}, 1_700_000_000)
    (seq,) = await _triggers(balances, "a")
    assert await svc.on_trigger("a", seq) == "succeeded"
    assert await svc.on_trigger("a", seq) == "not_open"  # a redelivery changes nothing
    st = await balances.get("a")
    assert st is not None and st.balance == 70_004_322  # 17.654322 + 52.35 (rounded up)
    assert gw.charge_count == 1 and gw.total_captured == 52_350_000
    (p,) = await svc.payments("a")
    assert (p.kind, p.status, p.amount, p.captured) == ("auto", "succeeded", 52_350_000, 52_350_000)
    assert p.credited_at is not None and p.method == "visa 4242"
    assert await _drift(pool, balances, "a", 12_345_678) == 0
    assert (await balances.recharge_state("a")).open_trigger is None  # the latch is open again
    assert notes.types() == ["payment.succeeded"]


async def test_the_eleventh_recharge_is_refused_the_account_held_and_the_window_rolls(
    world: World,
) -> None:
    pool, balances, gw, notes, clock = world
    svc = _service(world)
    await _account(pool, balances, "a", "30.00", level=2)
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 10 * USD)
    start = clock.now
    for i in range(11):
        clock.now = start + timedelta(minutes=30 * i)
        await balances.apply_debits({"a": [_debit(i, 15 * USD)]}, 1_700_000_000)
        fired = await _triggers(balances, "a")
        assert await svc.on_trigger("a", fired[-1]) == (
            "succeeded" if i < 10 else "recharge_cap_reached"
        )
    assert gw.charge_count == 10
    st = await balances.get("a")
    assert st is not None and st.status == "hold"
    assert await pool.fetchval("SELECT hold_reason FROM accounts WHERE id = 'a'") == "recharge_cap"
    assert notes.types()[-2:] == ["recharge.refused", "account.held"]
    refused = (await svc.payments("a"))[0]
    assert (refused.status, refused.reason) == ("refused", "recharge_cap_reached")
    assert refused.amount == 0
    # the scan before the window rolls attempts nothing
    clock.now = start + timedelta(hours=24) - timedelta(seconds=1)
    await svc.recover()
    assert gw.charge_count == 10
    # the first recharge leaves the window: the waiting trigger is charged and the hold lifted
    clock.now = start + timedelta(hours=24, seconds=1)
    await svc.recover()
    assert gw.charge_count == 11
    st = await balances.get("a")
    assert st is not None and st.status == "active"
    assert await pool.fetchval("SELECT hold_reason FROM accounts WHERE id = 'a'") is None
    assert await _drift(pool, balances, "a", 11 * 15 * USD) == 0


async def test_declines_back_off_then_turn_auto_recharge_off(world: World) -> None:
    pool, balances, gw, notes, clock = world
    svc = _service(world, backoff_s=(60.0, 600.0), max_declines=3)
    await _account(pool, balances, "a", "30.00")
    await svc.save_method("a", "pm_card_chargeDeclinedInsufficientFunds")
    await svc.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [_debit(1, 15 * USD)]}, 1_700_000_000)
    (seq,) = await _triggers(balances, "a")
    assert await svc.on_trigger("a", seq) == "declined"
    assert await svc.attempt("a", seq) == "waiting"  # backing off
    clock.now += timedelta(seconds=61)
    assert await svc.recover() == 1
    clock.now += timedelta(seconds=599)
    assert await svc.attempt("a", seq) == "waiting"
    clock.now += timedelta(seconds=2)
    await svc.recover()
    assert [p.status for p in await svc.payments("a")] == ["declined"] * 3
    assert {p.reason for p in await svc.payments("a")} == {"insufficient_funds"}
    settings = await svc.auto_recharge("a")
    assert settings is not None and not settings.enabled
    assert settings.disabled_reason == "repeated_declines"
    assert (await balances.recharge_state("a")).threshold is None  # off in Redis too
    assert notes.types() == ["payment.declined"] * 3 + ["recharge.disabled"]
    assert gw.total_captured == 0 and await _drift(pool, balances, "a", 15 * USD) == 0


async def test_manual_top_ups_obey_the_limits_and_are_idempotent(world: World) -> None:
    pool, balances, gw, _, _ = world
    svc = _service(world)
    await _account(pool, balances, "new", "0.00", age=timedelta(hours=1))
    with pytest.raises(PaymentError) as e:
        await svc.top_up("new", 20 * USD, "t0")
    assert e.value.code == "no_payment_method"
    await svc.save_method("new", "pm_card_visa")
    with pytest.raises(PaymentError) as e:
        await svc.save_method("new", "pm_card_mastercard")
    assert e.value.code == "payment_method_exists"
    with pytest.raises(PolicyRefusal) as r:
        await svc.top_up("new", 9_990_000, "t1")
    assert r.value.code == "amount_below_minimum"
    p = await svc.top_up("new", 60 * USD, "t2")
    assert (p.status, p.captured) == ("succeeded", 60 * USD)
    again = await svc.top_up("new", 60 * USD, "t2")  # the same payment: no second charge
    assert again.id == p.id and gw.charge_count == 1
    with pytest.raises(PolicyRefusal) as r:
        await svc.top_up("new", 40_010_000, "t3")  # $100.01 on day one
    assert r.value.code == "payment_limit_exceeded"
    assert (await svc.top_up("new", 40 * USD, "t4")).status == "succeeded"  # exactly $100
    with pytest.raises(PaymentError) as e:
        await svc.top_up("new", 50 * USD, "t4")
    assert e.value.code == "payment_id_reused"
    st = await balances.get("new")
    assert st is not None and st.balance == 100 * USD
    assert await _drift(pool, balances, "new") == 0
    # replacing the method means deleting it first
    assert await svc.delete_method("new")
    await svc.save_method("new", "pm_card_mastercard")


async def test_concurrent_top_ups_cannot_pass_the_day_limit_together(world: World) -> None:
    pool, balances, gw, _, _ = world
    svc = _service(world)
    await _account(pool, balances, "new", "0.00", age=timedelta(hours=1))
    await svc.save_method("new", "pm_card_visa")
    results = await asyncio.gather(
        *(svc.top_up("new", 30 * USD, f"c{i}") for i in range(6)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, PolicyRefusal)]
    assert len(ok) == 3 and len(refused) == 3  # $90 of $100; a 4th $30 would be $120
    assert gw.total_captured == 90 * USD


async def test_two_workers_on_one_trigger_charge_the_card_once(world: World) -> None:
    pool, balances, _, notes, clock = world
    # two worker processes, each with its own gateway client: a double charge would show
    gw1, gw2 = SandboxGateway(), SandboxGateway()
    w1 = PaymentService(pool, balances, gw1, notes, clock=clock, sleep=_no_sleep)
    w2 = PaymentService(pool, balances, gw2, notes, clock=clock, sleep=_no_sleep)
    await _account(pool, balances, "a", "30.00")
    await w1.save_method("a", "pm_card_visa")
    await w1.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [_debit(1, 15 * USD)]}, 1_700_000_000)
    (seq,) = await _triggers(balances, "a")
    outcomes = await asyncio.gather(w1.on_trigger("a", seq), w2.on_trigger("a", seq))
    assert outcomes.count("succeeded") == 1  # the other: in_flight or not_open (timing)
    assert set(outcomes) <= {"succeeded", "in_flight", "not_open"}
    assert gw1.charge_count + gw2.charge_count == 1
    st = await balances.get("a")
    assert st is not None and st.balance == 70 * USD


class PartialCapture(SandboxGateway):
    """A processor that captured less than it was asked (e.g. a partial authorization)."""

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        r = await super().charge(request)
        return dataclasses.replace(r, captured=r.captured - 10_000)


async def test_only_what_was_captured_is_credited(
    pool: asyncpg.Pool, balances: RedisBalances
) -> None:
    await put_price_list(pool, demo_price_list())
    svc = PaymentService(pool, balances, PartialCapture(), Collected(), sleep=_no_sleep)
    await _account(pool, balances, "a", "0.00")
    await svc.save_method("a", "pm_card_visa")
    p = await svc.top_up("a", 20 * USD, "t1")
    assert (p.amount, p.captured) == (20 * USD, 19_990_000)
    st = await balances.get("a")
    assert st is not None and st.balance == 19_990_000
    assert (await PostgresLedger(pool).balances(["a"]))["a"] == 19_990_000


async def test_a_lost_redis_state_comes_back_with_its_recharge_state(world: World) -> None:
    from balance.accounts import load_into_redis

    pool, balances, *_ = world
    svc = _service(world)
    await _account(pool, balances, "a", "30.00", level=2)
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 10 * USD)
    # a settled payment Redis was never told of (the worker died before crediting it)
    p = await svc.top_up("a", 10 * USD, "t1")
    await pool.execute("UPDATE payments SET credited_at = NULL WHERE id = $1", p.id)
    await svc.set_auto_recharge("a", True, 50 * USD, 10 * USD)  # fires: 40 <= 50
    await pool.execute("UPDATE accounts SET hold_reason = 'recharge_cap' WHERE id = 'a'")
    (seq,) = await _triggers(balances, "a")
    await pool.execute("INSERT INTO recharge_triggers (account_id, seq) VALUES ('a', $1)", seq)
    await balances._r.flushall()
    assert await load_into_redis(pool, balances, ["a"]) == ["a"]
    st = await balances.get("a")
    assert st is not None and (st.balance, st.status) == (40 * USD, "hold")
    assert await balances.recharge_state("a") == RechargeState(50 * USD, seq, "recharge_cap")
    await svc.recover()  # finishes the uncredited payment: nothing is added twice
    st = await balances.get("a")
    assert st is not None and st.balance == 40 * USD
    assert (await svc.payments("a"))[-1].credited_at is not None
