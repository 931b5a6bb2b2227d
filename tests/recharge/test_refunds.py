"""Refunds through the payment service against real Redis and PostgreSQL: to the card with the
sandbox and with the real ``stripe`` package against the local fake (full, partial then the
rest, more than captured refused, at once from many requests, a repeated id, a timeout after
success resolved by the retry and by the settlement), as credit; and each time the ledger and
Redis agree."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import asyncpg
import pytest
import stripe

from balance import keys
from balance.accounts import load_into_redis
from balance.store import RedisBalances
from infra.ledger import REFUNDS_SOURCE
from ops.reconcile import reconcile
from recharge.gateway import OutcomeUnknown, RefundRequest, RefundResult
from recharge.refunds import RefundError
from recharge.service import PaymentService
from recharge.stripe_gateway import StripeGateway
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
from tests.stripe_fake import API_KEY, StripeFake


async def _paid(svc: PaymentService, world: World, account: str, amount: int) -> str:
    """``account`` opened with nothing, and a succeeded top-up of ``amount``; its id."""
    await open_account(world.pool, world.balances, account, "0.00", level=2)
    await svc.save_method(account, "pm_card_visa")
    p = await svc.top_up(account, amount, "p1")
    assert p.status == "succeeded"
    return p.id


async def _ledger_refunds(pool: asyncpg.Pool, account: str) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        "SELECT amount, ref, event_id FROM ledger WHERE account_id = $1 AND kind = 'refund'"
        " AND source = $2 ORDER BY entry_id",
        account,
        REFUNDS_SOURCE,
    )
    return [(r["amount"], r["ref"], r["event_id"]) for r in rows]


async def _agree(world: World) -> None:
    """Invariant 2 across every account of the test: no drift."""
    result = await reconcile(world.pool, world.balances)
    assert (result.drift_micros, result.mismatched) == (0, {})


async def _balance(balances: RedisBalances, account: str) -> int:
    st = await balances.get(account)
    assert st is not None
    return st.balance


async def test_a_full_refund_to_the_card_takes_it_off_the_balance(world: World) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)

    r = await svc.refunds.refund_to_card("a", pid, "r1", None, "customer asked")

    assert (r.kind, r.status, r.amount, r.payment_id) == ("card", "succeeded", 20 * USD, pid)
    assert r.applied_at is not None and r.gateway_ref.startswith("re_")
    assert (world.gateway.refund_count, world.gateway.total_refunded) == (1, 20 * USD)
    assert await _balance(world.balances, "a") == 0
    assert await _ledger_refunds(world.pool, "a") == [(-20 * USD, pid, "r1")]
    assert await drift(world.pool, world.balances, "a") == 0
    await _agree(world)


async def test_a_partial_refund_then_the_rest_then_nothing_more(world: World) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)

    first = await svc.refunds.refund_to_card("a", pid, "r1", 7_500_000, "one call disputed")
    assert (first.status, first.amount) == ("succeeded", 7_500_000)
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", pid, "r2", 12_510_000, "too much")
    assert (e.value.code, e.value.status) == ("refund_exceeds_capture", 409)
    rest = await svc.refunds.refund_to_card("a", pid, "r3", None, "the rest")
    assert (rest.status, rest.amount) == ("succeeded", 12_500_000)
    for amount in (None, 10_000):
        with pytest.raises(RefundError) as e:
            await svc.refunds.refund_to_card("a", pid, "r4", amount, "nothing is left")
        assert e.value.code == "refund_exceeds_capture"

    assert world.gateway.total_refunded == 20 * USD
    assert [a for a, _, _ in await _ledger_refunds(world.pool, "a")] == [-7_500_000, -12_500_000]
    assert await drift(world.pool, world.balances, "a") == 0
    assert await world.pool.fetchval("SELECT count(*) FROM refunds WHERE account_id = 'a'") == 2


async def test_more_than_was_captured_is_refused_and_nothing_moves(world: World) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", pid, "r1", 20_010_000, "more than paid")
    assert e.value.code == "refund_exceeds_capture" and "20.00" in e.value.message
    assert world.gateway.refund_count == 0
    assert await _ledger_refunds(world.pool, "a") == []
    assert await _balance(world.balances, "a") == 20 * USD


async def test_refunds_asked_at_once_never_pass_the_capture_together(world: World) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    results = await asyncio.gather(
        *(svc.refunds.refund_to_card("a", pid, f"r{i}", 6 * USD, "at once") for i in range(6)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RefundError)]
    assert len(ok) == 3 and len(refused) == 3, results  # $18 of $20; a 4th $6 would be $24
    assert {r.status for r in ok} == {"succeeded"}
    assert {r.code for r in refused} == {"refund_exceeds_capture"}
    assert world.gateway.total_refunded == 18 * USD
    assert await _balance(world.balances, "a") == 2 * USD
    await _agree(world)


async def test_a_repeated_refund_id_is_one_refund(world: World) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    first = await svc.refunds.refund_to_card("a", pid, "r1", 5 * USD, "once")
    again = await svc.refunds.refund_to_card("a", pid, "r1", 5 * USD, "once")
    same = await svc.refunds.refund_to_card("a", pid, "r1", None, "once")  # no amount: that one
    assert first == again == same
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", pid, "r1", 6 * USD, "another amount")
    assert e.value.code == "refund_id_reused"
    with pytest.raises(RefundError) as e:
        await svc.refunds.credit("a", "r1", 5 * USD, "a credit of a refund's id")
    assert e.value.code == "refund_id_reused"
    assert world.gateway.refund_count == 1
    assert await _balance(world.balances, "a") == 15 * USD
    assert len(await _ledger_refunds(world.pool, "a")) == 1


async def test_only_a_captured_payment_of_the_account_is_refunded(world: World) -> None:
    svc = payment_service(world)
    await _paid(svc, world, "a", 20 * USD)
    await open_account(world.pool, world.balances, "b", "0.00")
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", "nope", "r1", None, "no such payment")
    assert (e.value.code, e.value.status) == ("payment_not_found", 404)
    with pytest.raises(RefundError) as e:  # another account's payment of the same id
        await svc.refunds.refund_to_card("b", "p1", "r1", None, "not b's")
    assert e.value.code == "payment_not_found"
    await svc.delete_method("a")
    await svc.save_method("a", "pm_card_chargeDeclined")
    assert (await svc.top_up("a", 10 * USD, "p2")).status == "declined"
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", "p2", "r1", None, "declined")
    assert (e.value.code, e.value.status) == ("payment_not_settled", 409)
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", "p1", "r1", 1_234_567, "not cents")
    assert (e.value.code, e.value.status) == ("invalid_amount", 422)


async def test_a_refund_may_take_the_balance_below_zero_and_holds_the_account(
    world: World,
) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    # $15 spent: a correction row and its debit, as the metering processor would have done
    await world.pool.execute(
        "INSERT INTO ledger (event_key, account_id, kind, amount, ref, event_time, source,"
        " event_id) VALUES (decode(md5('spent'), 'hex'), 'a', 'correction', $1, 'spent',"
        " now(), 'test', 'spent')",
        -15 * USD,
    )
    await world.balances.credit("a", "spent", -15 * USD)
    assert (await world.balances.get("a")).status != "hold"  # type: ignore[union-attr]

    r = await svc.refunds.refund_to_card("a", pid, "r1", None, "chargeback avoided")

    assert r.status == "succeeded"
    st = await world.balances.get("a")
    assert st is not None and (st.balance, st.status) == (-15 * USD, "hold")
    assert "account.hold" in [s.type for s in await world.balances.pending_outbox("a")]
    assert await drift(world.pool, world.balances, "a") == 0
    await _agree(world)


async def test_a_refund_never_charges_the_card_again_through_auto_recharge(
    world: World,
) -> None:
    # $40 paid, auto-recharge on below $20: a refund of $30 leaves $10, at or below the
    # threshold. Recharging would charge the card again for what was just given back.
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 40 * USD)
    await svc.set_auto_recharge("a", True, 20 * USD, 20 * USD)
    assert await triggers(world.balances, "a") == []

    r = await svc.refunds.refund_to_card("a", pid, "r1", 30 * USD, "customer asked")

    assert (r.status, await _balance(world.balances, "a")) == ("succeeded", 10 * USD)
    assert await triggers(world.balances, "a") == []
    assert await drift(world.pool, world.balances, "a") == 0
    # Usage after it is the same crossing: still no trigger.
    await world.balances.apply_debits({"a": [debit(1, USD)]}, int(world.clock().timestamp()))
    assert await triggers(world.balances, "a") == []
    assert world.gateway.charge_count == 1  # the top-up alone
    # Credit back above the threshold re-arms it: the next crossing fires as always.
    await world.balances.credit("a", "adj", 20 * USD)  # $29
    await world.balances.apply_debits(
        {"a": [debit(2, 10 * USD)]}, int(world.clock().timestamp())
    )
    assert len(await triggers(world.balances, "a")) == 1


async def test_a_rebuilt_account_keeps_the_refunds_crossing_handled(world: World) -> None:
    # The latch of a refund's crossing ("rq" = 0) is in Redis only; an account rebuilt from
    # the ledger must not come back ready to charge the refunded card on its next debit.
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 40 * USD)
    await svc.set_auto_recharge("a", True, 20 * USD, 20 * USD)
    await svc.refunds.refund_to_card("a", pid, "r1", 30 * USD, "customer asked")  # $10 left

    async def rebuilt_then_debited(event: int) -> None:
        await world.balances._r.delete(keys.account("a"), keys.credits("a"), keys.outbox("a"))
        now_s = int(world.clock().timestamp())
        assert await load_into_redis(world.pool, world.balances, ["a"], now=now_s) == ["a"]
        await world.balances.apply_debits({"a": [debit(event, USD)]}, now_s)

    await rebuilt_then_debited(1)
    assert await triggers(world.balances, "a") == []
    assert world.gateway.charge_count == 1  # the top-up alone
    assert await _balance(world.balances, "a") == 9 * USD  # the ledger's $10, less the debit
    # Auto-recharge set again after the refund re-arms it, rebuilt or not.
    await svc.set_auto_recharge("a", True, 20 * USD, 20 * USD)
    await rebuilt_then_debited(2)
    assert len(await triggers(world.balances, "a")) == 1


async def test_a_refund_as_credit_is_credited_once(world: World) -> None:
    svc = payment_service(world)
    await open_account(world.pool, world.balances, "a", "1.00")
    c = await svc.refunds.credit("a", "c1", 2_345_678, "disputed call to +4420")
    again = await svc.refunds.credit("a", "c1", 2_345_678, "disputed call to +4420")
    assert c == again
    assert (c.kind, c.status, c.amount, c.payment_id, c.reason) == (
        "credit",
        "succeeded",
        2_345_678,
        None,
        "disputed call to +4420",
    )
    assert c.applied_at is not None
    assert await _balance(world.balances, "a") == USD + 2_345_678
    assert await _ledger_refunds(world.pool, "a") == [(2_345_678, "c1", "c1")]
    with pytest.raises(RefundError) as e:
        await svc.refunds.credit("a", "c1", 3 * USD, "another amount")
    assert e.value.code == "refund_id_reused"
    with pytest.raises(RefundError) as e:
        await svc.refunds.credit("nobody", "c1", 3 * USD, "no account")
    assert (e.value.code, e.value.status) == ("account_not_found", 404)
    for amount in (0, -USD, 100_000 * USD + 1):
        with pytest.raises(RefundError) as e:
            await svc.refunds.credit("a", "c2", amount, "bad amount")
        assert e.value.code == "invalid_amount"
    await _agree(world)


async def test_a_refund_cut_off_before_redis_is_finished_once_even_after_redis_lost_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = payment_service(world)
    pid = await _paid(svc, world, "a", 20 * USD)

    async def crash(*_: object) -> None:
        raise ConnectionError("killed between the ledger and Redis")

    with monkeypatch.context() as m:
        m.setattr(svc.refunds, "_apply", crash)
        with pytest.raises(ConnectionError):
            await svc.refunds.refund_to_card("a", pid, "r1", 5 * USD, "cut off")
        with pytest.raises(ConnectionError):
            await svc.refunds.credit("a", "c1", 3 * USD, "cut off too")
    # Redis then loses the account; it is rebuilt from the ledger (which has both rows)
    await world.balances._r.delete(keys.account("a"), keys.credits("a"))
    await svc.refunds.refund_to_card("a", pid, "r2", USD, "rebuilds it")
    assert await _balance(world.balances, "a") == 20 * USD - 5 * USD + 3 * USD - USD

    assert await svc.recover() == 2  # r1 and c1, remembered as applied by the rebuild
    assert await _balance(world.balances, "a") == 17 * USD
    assert await drift(world.pool, world.balances, "a") == 0
    assert (
        await world.pool.fetchval(
            "SELECT count(*) FROM refunds WHERE account_id = 'a' AND applied_at IS NULL"
        )
        == 0
    )


# -- the real stripe package against the fake ------------------------------------------------


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeFake]:
    monkeypatch.setattr(stripe, "enable_telemetry", False)
    with StripeFake() as f:
        yield f


class LostAnswers(StripeGateway):
    """Stripe refunds, and the first ``lose`` answers are lost on the way back (a timeout
    after success): the caller sees ``OutcomeUnknown``."""

    lose = 0

    async def refund(self, request: RefundRequest) -> RefundResult:
        result = await super().refund(request)
        if self.lose > 0:
            self.lose -= 1
            raise OutcomeUnknown("read timed out")
        return result


@pytest.fixture
async def stripe_world(world: World, fake: StripeFake) -> AsyncIterator[tuple[World, LostAnswers]]:
    gw = LostAnswers(API_KEY, api_base=fake.url, timeout_s=0.5)
    yield world._replace(gateway=gw), gw  # type: ignore[arg-type]
    await gw.close()


def _service(world: World) -> PaymentService:
    pool, balances, gw, notes, clock = world
    return PaymentService(pool, balances, gw, notes, clock=clock, sleep=no_sleep)


async def test_stripe_refunds_partial_the_rest_and_refuses_more(
    stripe_world: tuple[World, LostAnswers], fake: StripeFake
) -> None:
    world, _ = stripe_world
    svc = _service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    await svc.refunds.refund_to_card("a", pid, "r1", 5 * USD, "part")
    with pytest.raises(RefundError):
        await svc.refunds.refund_to_card("a", pid, "r2", 15_010_000, "too much")
    rest = await svc.refunds.refund_to_card("a", pid, "r3", None, "the rest")
    assert rest.amount == 15 * USD
    assert [(r["amount"], r["status"]) for r in fake.refunds] == [
        (500, "succeeded"),
        (1500, "succeeded"),
    ]
    assert {r["payment_intent"] for r in fake.refunds} == {fake.charges[0]["id"]}
    assert await _balance(world.balances, "a") == 0
    await _agree(world)


async def test_stripe_timeout_after_success_is_one_refund_resolved_by_the_retry(
    stripe_world: tuple[World, LostAnswers], fake: StripeFake
) -> None:
    world, _ = stripe_world
    svc = _service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    fake.delay_next("/v1/refunds", seconds=3.0)  # refunded, then the answer is held too long

    r = await svc.refunds.refund_to_card("a", pid, "r1", None, "slow answer")

    assert r.status == "succeeded"
    assert len(fake.refunds) == 1 and r.gateway_ref == fake.refunds[0]["id"]
    assert [q.replayed for q in fake.requests_to("POST", "/v1/refunds")] == [False, True]
    assert await _balance(world.balances, "a") == 0
    await _agree(world)


async def test_stripe_outcome_unknown_is_settled_later_with_the_same_key(
    stripe_world: tuple[World, LostAnswers], fake: StripeFake
) -> None:
    world, gw = stripe_world
    svc = _service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    gw.lose = 3  # the first try and both in-process retries lose Stripe's answer

    r = await svc.refunds.refund_to_card("a", pid, "r1", 5 * USD, "answers lost")

    assert r.status == "pending" and len(fake.refunds) == 1
    assert await _balance(world.balances, "a") == 20 * USD  # nothing taken while unknown
    # the pending refund holds its part of the cap: no other refund can take it meanwhile
    with pytest.raises(RefundError) as e:
        await svc.refunds.refund_to_card("a", pid, "r2", 15_010_000, "too much")
    assert e.value.code == "refund_exceeds_capture"
    assert await svc.recover() == 0  # too young: maybe still in flight elsewhere
    world.clock.now += timedelta(minutes=2)
    assert await svc.recover() == 1

    done = await svc.refunds.store.current("a", "r1")
    assert done.status == "succeeded" and done.gateway_ref == fake.refunds[0]["id"]
    assert len(fake.refunds) == 1
    keys_sent = {q.headers["idempotency-key"] for q in fake.requests_to("POST", "/v1/refunds")}
    assert keys_sent == {"a/refund/r1"}
    assert await svc.refunds.refund_to_card("a", pid, "r1", 5 * USD, "answers lost") == done
    assert await _balance(world.balances, "a") == 15 * USD
    await _agree(world)


async def test_stripe_refusing_a_refund_fails_it_and_nothing_moves(
    stripe_world: tuple[World, LostAnswers], fake: StripeFake
) -> None:
    world, gw = stripe_world
    svc = _service(world)
    pid = await _paid(svc, world, "a", 20 * USD)
    # refunded at Stripe by hand (the dashboard): the service does not know
    await gw._client.v1.refunds.create_async(
        {"payment_intent": fake.charges[0]["id"], "amount": 1500}
    )

    r = await svc.refunds.refund_to_card("a", pid, "r1", None, "all of it")

    assert (r.status, r.outcome) == ("failed", "gateway_refused")
    assert "greater than unrefunded amount" in r.message
    assert await _balance(world.balances, "a") == 20 * USD
    assert await _ledger_refunds(world.pool, "a") == []
    # failed, it holds none of the cap: what Stripe has left can still be refunded
    ok = await svc.refunds.refund_to_card("a", pid, "r2", 5 * USD, "what is left")
    assert ok.status == "succeeded"
