"""Manual top-ups through the payment service against real Redis and PostgreSQL with the sandbox
gateway: the limits, idempotency by payment id, concurrent top-ups against the day limit, and
crediting only what the processor captured."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from balance.accounts import AccountSpec, create_accounts, put_price_list
from balance.store import RedisBalances
from infra.ledger import PostgresLedger
from meter.traffic import demo_price_list
from recharge.gateway import ChargeRequest, ChargeResult
from recharge.policy import PolicyRefusal
from recharge.sandbox import SandboxGateway
from recharge.service import PaymentError, PaymentService
from tests.calendar import CALENDAR_EDGES
from tests.recharge.world import (
    USD,
    Collected,
    World,
    drift,
    no_sleep,
    open_account,
    payment_service,
)


async def test_manual_top_ups_obey_the_limits_and_are_idempotent(world: World) -> None:
    pool, balances, gw, _, _ = world
    svc = payment_service(world)
    await open_account(pool, balances, "new", "0.00", age=timedelta(hours=1))
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
    assert await drift(pool, balances, "new") == 0
    # replacing the method means deleting it first
    assert await svc.delete_method("new")
    await svc.save_method("new", "pm_card_mastercard")


async def test_concurrent_top_ups_cannot_pass_the_day_limit_together(world: World) -> None:
    pool, balances, gw, _, _ = world
    svc = payment_service(world)
    await open_account(pool, balances, "new", "0.00", age=timedelta(hours=1))
    await svc.save_method("new", "pm_card_visa")
    results = await asyncio.gather(
        *(svc.top_up("new", 30 * USD, f"c{i}") for i in range(6)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, PolicyRefusal)]
    assert len(ok) == 3 and len(refused) == 3  # $90 of $100; a 4th $30 would be $120
    assert gw.total_captured == 90 * USD


class PartialCapture(SandboxGateway):
    """A processor that captured less than it was asked (e.g. a partial authorization)."""

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        r = await super().charge(request)
        return dataclasses.replace(r, captured=r.captured - 10_000)


async def test_only_what_was_captured_is_credited(
    pool: asyncpg.Pool, balances: RedisBalances
) -> None:
    await put_price_list(pool, demo_price_list())
    svc = PaymentService(pool, balances, PartialCapture(), Collected(), sleep=no_sleep)
    await open_account(pool, balances, "a", "0.00")
    await svc.save_method("a", "pm_card_visa")
    p = await svc.top_up("a", 20 * USD, "t1")
    assert (p.amount, p.captured) == (20 * USD, 19_990_000)
    st = await balances.get("a")
    assert st is not None and st.balance == 19_990_000
    assert (await PostgresLedger(pool).balances(["a"]))["a"] == 19_990_000


@pytest.mark.parametrize("edge", CALENDAR_EDGES)
async def test_the_new_account_days_count_from_the_injected_clock(
    world: World, edge: int | None
) -> None:
    """An account created by the injected clock's time (not PostgreSQL's): on its second day,
    exactly $150 may be topped up in all, whatever the real date."""
    pool, balances, _, _, clock = world
    created = datetime.fromtimestamp(edge if edge is not None else time.time(), UTC)
    spec = AccountSpec.model_validate({"id": "fresh", "price_list_id": "standard", "balance": "0"})
    await create_accounts(pool, balances, [spec], clock=lambda: created.timestamp())
    clock.now = created + timedelta(days=1, hours=1)
    svc = payment_service(world)
    await svc.save_method("fresh", "pm_card_visa")
    assert (await svc.top_up("fresh", 100 * USD, "d2a")).status == "succeeded"
    with pytest.raises(PolicyRefusal) as r:
        await svc.top_up("fresh", 50_010_000, "d2b")  # $150.01 on day two
    assert r.value.code == "payment_limit_exceeded"
    assert (await svc.top_up("fresh", 50 * USD, "d2c")).status == "succeeded"
    assert await drift(pool, balances, "fresh") == 0
