"""Payment ids are the account's own (issue 12): two accounts' top-ups with one payment_id are
two payments and two gateway charges under two idempotency keys, each credited once and each in
its own history; another account's id answers as an id nobody used; payments cut off after the
charge and finished by ``recover`` are settled once per (account, id); a top-up cannot take the
id of one of its account's auto-recharges; and migration 0009 keeps the payments it finds, with
the keys they were charged with."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
import stripe

from contracts.payments import PAYMENTS_SOURCE
from infra.db import migrate
from recharge.gateway import ChargeRequest, ChargeResult, OutcomeUnknown, idempotency_key
from recharge.sandbox import SandboxGateway
from recharge.service import PaymentError, PaymentService
from recharge.store import PaymentStore
from recharge.stripe_gateway import StripeGateway
from tests.api import Api
from tests.conftest import Services
from tests.helpers import database_before
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

PI_PATH = "/v1/payment_intents"


class Recording(SandboxGateway):
    """The sandbox, keeping the idempotency key of every charge it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        self.keys.append(request.idempotency_key)
        return await super().charge(request)


class LosesAnswers(Recording):
    """Charges, then loses the answer until ``answering`` (a timeout after the processor took
    the money): the payment is left ``pending`` for ``recover``."""

    answering = False

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        result = await super().charge(request)
        if not self.answering:
            raise OutcomeUnknown("the answer was lost")
        return result


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeFake]:
    monkeypatch.setattr(stripe, "enable_telemetry", False)
    with StripeFake() as f:
        yield f


async def _credits(pool: asyncpg.Pool, account: str) -> list[tuple[str, int]]:
    """The account's payment credits in the ledger, as (payment id, amount)."""
    rows = await pool.fetch(
        "SELECT ref, amount FROM ledger WHERE account_id = $1 AND kind = 'credit'"
        " AND source = $2 ORDER BY ref",
        account,
        PAYMENTS_SOURCE,
    )
    return [(r["ref"], r["amount"]) for r in rows]


async def _balance(world: World, account: str) -> int:
    st = await world.balances.get(account)
    assert st is not None
    return st.balance


async def _two_accounts(world: World, svc: PaymentService) -> None:
    for account in ("a", "b"):
        await open_account(world.pool, world.balances, account, "0.00")
        await svc.save_method(account, "pm_card_visa")


def test_the_gateway_key_names_one_account_and_one_payment() -> None:
    assert idempotency_key("a", "p1") == "a/p1"
    # ':' is in both ids' alphabets: joined by it, these two would be one charge
    assert idempotency_key("a:b", "c") != idempotency_key("a", "b:c")
    assert len(idempotency_key("a" * 64, "p" * 128)) <= 255  # the longest ids, Stripe's limit
    with pytest.raises(ValueError):
        idempotency_key("a", "b/c")


async def test_two_accounts_paying_with_one_payment_id_make_two_payments_each_credited_once(
    world: World,
) -> None:
    gw = Recording()
    world = world._replace(gateway=gw)
    svc = payment_service(world)
    await _two_accounts(world, svc)
    pa = await svc.top_up("a", 20 * USD, "p1")
    pb = await svc.top_up("b", 30 * USD, "p1")  # once: 409 payment_id_reused, a's amount
    assert (pa.account_id, pa.status, pa.captured) == ("a", "succeeded", 20 * USD)
    assert (pb.account_id, pb.status, pb.captured) == ("b", "succeeded", 30 * USD)
    assert pa.gateway_ref != pb.gateway_ref
    # a retry on each account answers that account's own payment, charging nothing
    assert await svc.top_up("a", 20 * USD, "p1") == pa
    assert await svc.top_up("b", 30 * USD, "p1") == pb
    assert gw.keys == ["a/p1", "b/p1"]  # two keys, so two charges at any processor
    assert (gw.charge_count, gw.total_captured) == (2, 50 * USD)
    assert await svc.payments("a") == [pa]
    assert await svc.payments("b") == [pb]
    assert await _credits(world.pool, "a") == [("p1", 20 * USD)]
    assert await _credits(world.pool, "b") == [("p1", 30 * USD)]
    assert (await _balance(world, "a"), await _balance(world, "b")) == (20 * USD, 30 * USD)
    assert await drift(world.pool, world.balances, "a") == 0
    assert await drift(world.pool, world.balances, "b") == 0


async def test_stripe_gets_two_charges_under_two_keys_for_two_accounts_one_payment_id(
    world: World, fake: StripeFake
) -> None:
    gw = StripeGateway(API_KEY, api_base=fake.url, timeout_s=2.0)
    svc = PaymentService(
        world.pool, world.balances, gw, world.notes, clock=world.clock, sleep=no_sleep
    )
    try:
        await _two_accounts(world, svc)
        assert (await svc.top_up("a", 20 * USD, "p1")).status == "succeeded"
        assert (await svc.top_up("b", 30 * USD, "p1")).status == "succeeded"
        assert (await svc.top_up("b", 30 * USD, "p1")).captured == 30 * USD  # a retry
    finally:
        await gw.close()
    sent = [r.headers.get("idempotency-key") for r in fake.requests_to("POST", PI_PATH)]
    assert sent == ["a/p1", "b/p1"]
    assert sorted(pi["amount_received"] for pi in fake.charges) == [2_000, 3_000]  # cents
    assert [pi["metadata"] for pi in fake.payment_intents] == [
        {"account_id": "a", "idempotency_key": "a/p1"},
        {"account_id": "b", "idempotency_key": "b/p1"},
    ]


async def test_another_accounts_payment_id_answers_as_an_id_nobody_used(api: Api) -> None:
    await api.seed("a", "b", balance="5.00")
    a, b = await api.key("a", "admin"), await api.key("b", "admin")

    async def pay(headers: dict[str, str], account: str, amount: str, pid: str) -> httpx.Response:
        return await api.client.post(
            f"/v1/accounts/{account}/payments",
            json={"amount": amount, "payment_id": pid},
            headers=headers,
        )

    r = await api.client.put(
        "/v1/accounts/b/payment_method", json={"token": "pm_card_visa"}, headers=b
    )
    assert r.status_code == 201
    assert (await pay(b, "b", "30.00", "p1")).status_code == 201
    # a has no method: b's id and a fresh one get one answer, whatever the amount (once a's
    # top-up with b's id was 409 payment_id_reused: it told a that b had used it)
    for amount in ("30.00", "20.00"):
        taken, fresh = await pay(a, "a", amount, "p1"), await pay(a, "a", amount, "never")
        assert (taken.status_code, taken.json()) == (fresh.status_code, fresh.json())
        assert taken.json()["error"]["code"] == "no_payment_method"
    r = await api.client.put(
        "/v1/accounts/a/payment_method", json={"token": "pm_card_visa"}, headers=a
    )
    assert r.status_code == 201
    taken, fresh = await pay(a, "a", "20.00", "p1"), await pay(a, "a", "20.00", "q1")
    assert taken.status_code == fresh.status_code == 201

    def seen(body: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in body.items() if k not in ("id", "created_at")}

    assert seen(taken.json()) == seen(fresh.json())
    assert taken.json()["account_id"] == "a" and taken.json()["captured"] == "20.00"
    ha = (await api.client.get("/v1/accounts/a/payments", headers=a)).json()["payments"]
    hb = (await api.client.get("/v1/accounts/b/payments", headers=b)).json()["payments"]
    assert sorted((p["id"], p["account_id"], p["amount"]) for p in ha) == [
        ("p1", "a", "20.00"),
        ("q1", "a", "20.00"),
    ]
    assert [(p["id"], p["account_id"], p["amount"]) for p in hb] == [("p1", "b", "30.00")]
    bal = await api.client.get("/v1/accounts/a/balance", headers=a)
    assert bal.json()["balance"] == "45.00"
    bal = await api.client.get("/v1/accounts/b/balance", headers=b)
    assert bal.json()["balance"] == "35.00"


async def test_payments_cut_off_after_the_charge_are_settled_once_per_account_and_id(
    world: World,
) -> None:
    """As test_a_timeout_after_a_successful_charge_is_retried_with_the_same_key, for two
    accounts' payments of one id pending at once: each is finished with its own key, and one
    account's settlement never settles the other's."""
    gw = LosesAnswers()
    world = world._replace(gateway=gw)
    svc = payment_service(world)
    await _two_accounts(world, svc)
    assert (await svc.top_up("a", 20 * USD, "p1")).status == "pending"
    assert (await svc.top_up("b", 30 * USD, "p1")).status == "pending"
    assert gw.charge_count == 2  # the processor took both; nothing is credited yet
    assert await _credits(world.pool, "a") == await _credits(world.pool, "b") == []
    gw.answering = True
    world.clock.now += timedelta(minutes=5)  # past the grace a charge in flight is given
    assert await svc.recover() == 2
    assert await svc.recover() == 0
    (pa,), (pb,) = await svc.payments("a"), await svc.payments("b")
    assert (pa.status, pa.captured, pa.credited_at is not None) == ("succeeded", 20 * USD, True)
    assert (pb.status, pb.captured, pb.credited_at is not None) == ("succeeded", 30 * USD, True)
    assert set(gw.keys) == {"a/p1", "b/p1"}  # every retry with its payment's own key
    assert (gw.charge_count, gw.total_captured) == (2, 50 * USD)
    # cut off again, between the ledger and Redis, for a alone: credited again, once
    await world.pool.execute(
        "UPDATE payments SET credited_at = NULL WHERE account_id = 'a' AND id = 'p1'"
    )
    assert await svc.recover() == 1
    assert await _credits(world.pool, "a") == [("p1", 20 * USD)]
    assert await _credits(world.pool, "b") == [("p1", 30 * USD)]
    assert (await _balance(world, "a"), await _balance(world, "b")) == (20 * USD, 30 * USD)
    assert await drift(world.pool, world.balances, "a") == 0
    assert await drift(world.pool, world.balances, "b") == 0
    assert await svc.top_up("b", 30 * USD, "p1") == (await svc.payments("b"))[0]
    assert gw.charge_count == 2


async def test_a_top_up_cannot_take_the_id_of_an_auto_recharge_of_its_account(
    world: World,
) -> None:
    pool, balances, gw, _, _ = world
    svc = payment_service(world)
    await open_account(pool, balances, "a", "30.00")
    await open_account(pool, balances, "b", "0.00")
    for account in ("a", "b"):
        await svc.save_method(account, "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [debit(1, 15 * USD)]}, 1_700_000_000)
    (seq,) = await triggers(balances, "a")
    assert await svc.on_trigger("a", seq) == "succeeded"
    (auto,) = await svc.payments("a")
    assert (auto.id, auto.gateway_key) == (f"a:ar:{seq}:1", f"a/a:ar:{seq}:1")
    # one made, one to be made: either taken by a top-up would answer as that recharge, or
    # leave the trigger's attempt unable to record its payment
    for taken in (auto.id, f"a:ar:{seq + 1}:1"):
        with pytest.raises(PaymentError) as e:
            await svc.top_up("a", 55 * USD, taken)
        assert e.value.code == "payment_id_reused"
    # b's ids are b's: its payment of that id is its own, and a's recharges go on
    pb = await svc.top_up("b", 20 * USD, auto.id)
    assert (pb.account_id, pb.status, pb.gateway_key) == ("b", "succeeded", f"b/{auto.id}")
    world.clock.now += timedelta(minutes=1)
    await balances.apply_debits({"a": [debit(2, 55 * USD)]}, 1_700_000_000)
    seq2 = (await triggers(balances, "a"))[-1]
    assert await svc.on_trigger("a", seq2) == "succeeded"
    assert [p.id for p in await svc.payments("a")] == [f"a:ar:{seq2}:1", auto.id]
    assert gw.charge_count == 3
    assert await drift(pool, balances, "a", 70 * USD) == 0


async def test_an_auto_recharge_cut_off_keeps_its_id_and_key(world: World) -> None:
    gw = LosesAnswers()
    world = world._replace(gateway=gw)
    pool, balances, _, _, clock = world
    svc = payment_service(world)
    await open_account(pool, balances, "a", "30.00")
    await svc.save_method("a", "pm_card_visa")
    await svc.set_auto_recharge("a", True, 20 * USD, 50 * USD)
    await balances.apply_debits({"a": [debit(1, 15 * USD)]}, 1_700_000_000)
    (seq,) = await triggers(balances, "a")
    assert await svc.on_trigger("a", seq) == "pending"
    assert await svc.on_trigger("a", seq) == "in_flight"  # redelivered: nothing new
    gw.answering = True
    clock.now += timedelta(minutes=5)
    await svc.recover()
    (p,) = await svc.payments("a")
    assert (p.id, p.status, p.captured) == (f"a:ar:{seq}:1", "succeeded", 55 * USD)
    assert set(gw.keys) == {f"a/a:ar:{seq}:1"} and gw.charge_count == 1
    assert await _credits(pool, "a") == [(p.id, 55 * USD)]


async def test_migration_0009_keeps_the_payments_it_finds_and_their_keys(
    services: Services,
) -> None:
    async with database_before(services.admin_dsn, 9) as db:
        conn = db.conn
        await conn.execute(
            "INSERT INTO price_lists (id, inbound_per_min, sms_per_part) VALUES ('std', 1, 1);"
            "INSERT INTO accounts (id, price_list_id) VALUES ('a', 'std'), ('b', 'std');"
            "INSERT INTO payments (id, account_id, kind, trigger_seq, amount, captured,"
            " currency, status, credited_at) VALUES"
            " ('p1', 'a', 'manual', NULL, 20000000, 20000000, 'USD', 'succeeded', now()),"
            " ('a:ar:3:1', 'a', 'auto', 3, 50000000, 0, 'USD', 'pending', NULL),"
            " ('p2', 'b', 'manual', NULL, 10000000, 0, 'USD', 'declined', NULL)"
        )
        before = [dict(r) for r in await conn.fetch("SELECT * FROM payments ORDER BY id")]
        assert "0009_payment_scope.sql" in await migrate(conn)
        after = [dict(r) for r in await conn.fetch("SELECT * FROM payments ORDER BY id")]
        # every row as it was, each keeping the key it was charged with: its bare id
        assert [{k: v for k, v in r.items() if k != "gateway_key"} for r in after] == before
        assert [r["gateway_key"] for r in after] == [r["id"] for r in before]
        insert = (
            "INSERT INTO payments (id, account_id, kind, amount, currency, status,"
            " gateway_key) VALUES ($1, $2, 'manual', 10000000, 'USD', 'pending', $3)"
        )
        with pytest.raises(asyncpg.UniqueViolationError) as e:
            await conn.execute(insert, "p1", "b", "p1")  # a's charge: never shared
        assert e.value.constraint_name == "payments_gateway_key_key"
        await conn.execute(insert, "p1", "b", "b/p1")  # b's own p1
        with pytest.raises(asyncpg.UniqueViolationError) as e:
            await conn.execute(insert, "p1", "a", "a/p1")  # a has one
        assert e.value.constraint_name == "payments_pkey"
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, "p8", "b", "b/p9")  # another payment's key
        pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            store = PaymentStore(pool)
            legacy = await store.payment("a", "a:ar:3:1")
            assert legacy is not None and legacy.gateway_key == "a:ar:3:1"
            assert await store.payment("b", "a:ar:3:1") is None
            # what recover would retry, each with the key it was first charged with
            unsettled = await store.unsettled(legacy.updated_at + timedelta(days=1), 10)
            assert {(p.account_id, p.id): p.gateway_key for p in unsettled} == {
                ("a", "a:ar:3:1"): "a:ar:3:1",
                ("b", "p1"): "b/p1",
            }
        finally:
            await pool.close()
