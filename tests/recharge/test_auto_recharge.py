"""Auto-recharge against real Redis and PostgreSQL with the sandbox gateway: the trigger decided
atomically in the balance scripts (one per crossing, re-armed only above the threshold), then
the payment service charging it: up to threshold plus recharge, the cap of ten in 24 hours,
declines backing off, two workers on one trigger, and the recharge state a lost Redis gets back
(the Stripe adapter has its own suite in test_gateway.py)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from balance.store import RedisBalances
from balance.values import RechargeState, StatusChange
from recharge.sandbox import SandboxGateway
from recharge.service import PaymentService
from tests.recharge.world import (
    USD,
    World,
    debit,
    drift,
    no_sleep,
    open_account,
    payment_service,
    triggers,
)


async def test_concurrent_events_crossing_the_threshold_fire_one_trigger(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=30 * USD, credit_limit=0, low_threshold=0)
    assert await balances.set_auto_recharge("a", 20 * USD) == 0  # above: nothing fires
    # 60 debits of $0.50 from 60 concurrent callers (separate round trips): the balance goes
    # from $30 to $0, crossing $20 once
    await asyncio.gather(
        *(balances.apply_debits({"a": [debit(i, USD // 2)]}, 1_700_000_000) for i in range(60))
    )
    st = await balances.get("a")
    assert st is not None and st.balance == 0
    fired = await triggers(balances, "a")
    assert len(fired) == 1
    state = await balances.recharge_state("a")
    threshold, open_seq = state.threshold, state.open_trigger
    assert (threshold, open_seq) == (20 * USD, fired[0])


async def test_the_trigger_rearms_only_after_credit_lifts_the_account_above(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=25 * USD, credit_limit=0, low_threshold=0)
    await balances.set_auto_recharge("a", 20 * USD)
    await balances.apply_debits({"a": [debit(1, 6 * USD)]}, 1_700_000_000)
    await balances.apply_debits({"a": [debit(2, 1 * USD)]}, 1_700_000_000)
    assert len(await triggers(balances, "a")) == 1  # still the same crossing
    await balances.credit("a", "p1", 2 * USD)  # $20: at the threshold, not above
    assert (await balances.recharge_state("a")).open_trigger is not None
    await balances.credit("a", "p2", 30 * USD)  # $50: above, the latch opens
    assert (await balances.recharge_state("a")).open_trigger is None
    await balances.apply_debits({"a": [debit(3, 31 * USD)]}, 1_700_000_000)
    assert len(await triggers(balances, "a")) == 2  # a new crossing, a new trigger


async def test_turning_auto_recharge_on_for_a_low_account_fires_at_once(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=5 * USD, credit_limit=0, low_threshold=0)
    seq = await balances.set_auto_recharge("a", 20 * USD)
    assert seq and await triggers(balances, "a") == [seq]
    assert await balances.set_auto_recharge("a", None) == 0
    await balances.apply_debits({"a": [debit(1, USD)]}, 1_700_000_000)
    assert await triggers(balances, "a") == [seq]  # off: no more triggers


async def test_a_pinned_hold_stays_until_a_payment_or_resume(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=50 * USD, credit_limit=0, low_threshold=0)
    assert await balances.set_status("a", "hold", "recharge_cap") == StatusChange(True, "hold")
    await balances.credit("a", "adj", USD)  # not a payment: still held
    out = await balances.apply_debits({"a": [debit(1, USD)]}, 1_700_000_000)
    assert out[0].status == "hold"
    paid = await balances.credit("a", "pay", 10 * USD, payment=True)
    assert paid.status == "active"
    types = [s.type for s in await balances.pending_outbox("a")]
    assert types == ["account.hold", "account.resume"]  # the relay publishes both, in order


async def test_a_resume_lifts_a_pin_only_when_told_to(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=50 * USD, credit_limit=0, low_threshold=0)
    await balances.set_status("a", "hold", "recharge_cap")
    # not an operator's: the pin stays, and telephony already has its hold
    assert await balances.set_status("a", "resume", "tenant") == StatusChange(False, "hold")
    # a suspension lifted from under the pin: held again, for the pin's reason
    assert await balances.set_status("a", "suspend", "tenant") == StatusChange(True, "suspended")
    assert await balances.set_status("a", "resume", "tenant") == StatusChange(True, "hold")
    assert (await balances.recharge_state("a")).hold_reason == "recharge_cap"
    # an operator's lifts it: the credit decides
    lifted = await balances.set_status("a", "resume", "operator", lift_hold=True)
    assert lifted == StatusChange(True, "active")
    assert (await balances.recharge_state("a")).hold_reason is None
    signals = await balances.pending_outbox("a")
    assert [(s.type, s.reason) for s in signals] == [
        ("account.hold", "recharge_cap"),
        ("account.suspend", "tenant"),
        ("account.resume", "tenant"),
        ("account.hold", "recharge_cap"),
        ("account.resume", "operator"),
    ]
    assert [s.seq for s in signals] == sorted({s.seq for s in signals})


async def test_set_status_refuses_arguments_that_would_change_their_meaning(
    balances: RedisBalances,
) -> None:
    from redis.exceptions import ResponseError

    from balance import keys

    await balances.create_account("a", balance=50 * USD, credit_limit=0, low_threshold=0)
    script = balances._status
    ks = [keys.account("a"), keys.outbox("a")]
    for args in (
        ["unsuspend", "operator", 1_700_000_000, "0"],  # once, anything else resumed
        ["resume", "operator", 1_700_000_000],  # no word on the pin
        ["resume", "operator", 1_700_000_000, "yes"],
        ["suspend", "operator", 1_700_000_000, "1"],  # a lift that only a resume has
        ["suspend", "a|b", 1_700_000_000, "0"],  # would split the outbox entry
        ["suspend", "x" * 65, 1_700_000_000, "0"],
        ["suspend", "operator", "soon", "0"],
    ):
        try:
            await script(keys=ks, args=args)
        except ResponseError as exc:
            assert "set_status" in str(exc), args
        else:
            raise AssertionError(f"accepted {args}")
    st = await balances.get("a")
    assert st is not None and st.status == "active"
    assert await balances.pending_outbox("a") == []


async def test_a_trigger_charges_up_to_threshold_plus_recharge_and_credits_it(world: World) -> None:
    pool, balances, gw, notes, _ = world
    svc = payment_service(world)
    await open_account(pool, balances, "a", "30.00")
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [debit(1, 12_345_678)]}, 1_700_000_000)
    (seq,) = await triggers(balances, "a")
    assert await svc.on_trigger("a", seq) == "succeeded"
    assert await svc.on_trigger("a", seq) == "not_open"  # a redelivery changes nothing
    st = await balances.get("a")
    assert st is not None and st.balance == 70_004_322  # 17.654322 + 52.35 (rounded up)
    assert gw.charge_count == 1 and gw.total_captured == 52_350_000
    (p,) = await svc.payments("a")
    assert (p.kind, p.status, p.amount, p.captured) == ("auto", "succeeded", 52_350_000, 52_350_000)
    assert p.credited_at is not None and p.method == "visa 4242"
    assert await drift(pool, balances, "a", 12_345_678) == 0
    assert (await balances.recharge_state("a")).open_trigger is None  # the latch is open again
    assert notes.types() == ["payment.succeeded"]


async def test_the_eleventh_recharge_is_refused_the_account_held_and_the_window_rolls(
    world: World,
) -> None:
    pool, balances, gw, notes, clock = world
    svc = payment_service(world)
    await open_account(pool, balances, "a", "30.00", level=2)
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 10 * USD)
    start = clock.now
    for i in range(11):
        clock.now = start + timedelta(minutes=30 * i)
        await balances.apply_debits({"a": [debit(i, 15 * USD)]}, 1_700_000_000)
        fired = await triggers(balances, "a")
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
    assert await drift(pool, balances, "a", 11 * 15 * USD) == 0


async def test_declines_back_off_then_turn_auto_recharge_off(world: World) -> None:
    pool, balances, gw, notes, clock = world
    svc = payment_service(world, backoff_s=(60.0, 600.0), max_declines=3)
    await open_account(pool, balances, "a", "30.00")
    await svc.save_method("a", "pm_card_chargeDeclinedInsufficientFunds")
    await svc.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [debit(1, 15 * USD)]}, 1_700_000_000)
    (seq,) = await triggers(balances, "a")
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
    assert gw.total_captured == 0 and await drift(pool, balances, "a", 15 * USD) == 0


async def test_two_workers_on_one_trigger_charge_the_card_once(world: World) -> None:
    pool, balances, _, notes, clock = world
    # two worker processes, each with its own gateway client: a double charge would show
    gw1, gw2 = SandboxGateway(), SandboxGateway()
    w1 = PaymentService(pool, balances, gw1, notes, clock=clock, sleep=no_sleep)
    w2 = PaymentService(pool, balances, gw2, notes, clock=clock, sleep=no_sleep)
    await open_account(pool, balances, "a", "30.00")
    await w1.save_method("a", "pm_card_visa")
    await w1.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [debit(1, 15 * USD)]}, 1_700_000_000)
    (seq,) = await triggers(balances, "a")
    outcomes = await asyncio.gather(w1.on_trigger("a", seq), w2.on_trigger("a", seq))
    # The other, by timing: in_flight (the first still charging), not_open (its trigger already
    # closed) or not_needed (the trigger still listed, the credit already above the threshold).
    assert outcomes.count("succeeded") == 1
    assert set(outcomes) <= {"succeeded", "in_flight", "not_open", "not_needed"}
    assert gw1.charge_count + gw2.charge_count == 1
    st = await balances.get("a")
    assert st is not None and st.balance == 70 * USD


async def test_a_lost_redis_state_comes_back_with_its_recharge_state(world: World) -> None:
    from balance.accounts import load_into_redis

    pool, balances, *_ = world
    svc = payment_service(world)
    await open_account(pool, balances, "a", "30.00", level=2)
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 10 * USD)
    # a settled payment Redis was never told of (the worker died before crediting it)
    p = await svc.top_up("a", 10 * USD, "t1")
    await pool.execute("UPDATE payments SET credited_at = NULL WHERE id = $1", p.id)
    await svc.set_auto_recharge("a", True, 50 * USD, 10 * USD)  # fires: 40 <= 50
    await pool.execute("UPDATE accounts SET hold_reason = 'recharge_cap' WHERE id = 'a'")
    (seq,) = await triggers(balances, "a")
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


async def test_a_refund_takes_the_crossing_it_causes_as_handled(
    balances: RedisBalances,
) -> None:
    await balances.create_account("a", balance=30 * USD, credit_limit=0, low_threshold=0)
    await balances.set_auto_recharge("a", 20 * USD)
    out = await balances.credit("a", "refund:r1", -15 * USD, refund=True)  # $15
    assert out.applied and await triggers(balances, "a") == []
    assert (await balances.recharge_state("a")).open_trigger == 0
    await balances.apply_debits({"a": [debit(1, USD)]}, 1_700_000_000)
    assert await triggers(balances, "a") == []  # the same crossing
    # A refund that leaves the credit above the threshold changes nothing about the trigger;
    # an open trigger stays open through a refund (its recharge is under way).
    await balances.credit("a", "p1", 20 * USD)  # $34: above, re-armed
    assert (await balances.recharge_state("a")).open_trigger is None
    await balances.credit("a", "refund:r2", -USD, refund=True)  # $33
    assert (await balances.recharge_state("a")).open_trigger is None
    await balances.apply_debits({"a": [debit(2, 20 * USD)]}, 1_700_000_000)  # $13
    (seq,) = await triggers(balances, "a")
    await balances.credit("a", "refund:r3", -USD, refund=True)
    assert (await balances.recharge_state("a")).open_trigger == seq
    assert await triggers(balances, "a") == [seq]
    with pytest.raises(ValueError):
        await balances.credit("a", "x", USD, payment=True, refund=True)


async def test_credit_refuses_a_kind_it_does_not_know(balances: RedisBalances) -> None:
    from redis.exceptions import ResponseError

    from balance import keys

    await balances.create_account("a", balance=30 * USD, credit_limit=0, low_threshold=0)
    ks = [keys.account("a"), keys.credits("a"), keys.outbox("a")]
    for kind in ("", "2", "refund", "1 ", "R"):
        with pytest.raises(ResponseError, match="credit: kind"):
            await balances._credit(keys=ks, args=["c1", USD, kind, 1_700_000_000])
    assert (await balances.get("a")).balance == 30 * USD  # type: ignore[union-attr]
