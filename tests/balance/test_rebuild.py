"""Rebuilding Redis from the ledger in bulk: ``RedisBalances.create_accounts`` (many accounts
per script call, ``load_accounts.lua``) writes exactly what ``create_account`` writes, and
``balance.accounts.rebuild_redis`` after a ``FLUSHALL`` gives every account back the state it
had. Against the test session's real Redis and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from balance import keys
from balance.accounts import (
    AccountSpec,
    BundleSpec,
    PlanSpec,
    create_accounts,
    put_bundle,
    put_plan,
    put_price_list,
    rebuild_redis,
)
from balance.bundles import buy_bundle
from balance.store import RedisBalances
from balance.values import NewAccount
from meter.traffic import call_hangup, demo_price_list
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests import harness
from tests.helpers import call_record

US = "+14155550123"

#: every field combination create_account takes: optional ones absent and present, each status
STATES = [
    NewAccount("a0", balance=0, credit_limit=0, low_threshold=0),
    NewAccount(
        "a1",
        balance=-5_000_000,
        credit_limit=10_000_000,
        low_threshold=2_000_000,
        status="low",
        seq=7,
        bucket="p1764547200,300,1764547200,1767225600;bx,60,1764547200,1765000000",
        recharge_threshold=20_000_000,
        recharge_trigger=6,
        hold_reason="recharge_cap",
        credited=("payment:p1", "payment:p2"),
    ),
    NewAccount(
        "a2",
        balance=9_223_372_036_854_775_807,
        credit_limit=0,
        low_threshold=0,
        status="hold",
        recharge_threshold=0,
    ),
    NewAccount(
        "a3",
        balance=1,
        credit_limit=0,
        low_threshold=0,
        status="suspended",
        hold_reason="past_due",
        credited=("payment:only",),
    ),
]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


#: account fields the scripts keep as their own caches, not state a rebuild owes: the highest
#: signal seq acknowledged (absent: debit.lua reads the outbox, empty, to find out) and the day
#: today's applied-events hash got its expiry (absent: it is set again)
CACHES = {b"ack", b"xd"}


async def dump(r: aioredis.Redis, account_id: str) -> tuple[dict[bytes, bytes], ...]:
    """An account's hash (its caches left out) and its credits hash."""
    fields: dict[bytes, bytes] = await r.hgetall(keys.account(account_id))  # type: ignore[misc]
    return (
        {k: v for k, v in fields.items() if k not in CACHES},
        await r.hgetall(keys.credits(account_id)),  # type: ignore[misc]
    )


def rebuilt_part(d: tuple[dict[bytes, bytes], ...]) -> tuple[dict[bytes, bytes], ...]:
    """What a rebuild owes of a dump: the whole account hash, and of the credits hash the
    payments (``load_into_redis``'s ``credited``). A bundle's grant memory (``grant:b<id>``)
    is not rebuilt: a purchase retried after a rebuild is answered from the book of record
    without asking Redis (``balance.bundles.buy_bundle``, tested there)."""
    fields, credits = d
    return fields, {k: v for k, v in credits.items() if k.startswith(b"payment:")}


@pytest.mark.parametrize("per_call", [1, 3, 256])
async def test_many_accounts_created_in_one_round_trip_are_each_as_one_created_alone(
    redis: aioredis.Redis, per_call: int
) -> None:
    store = RedisBalances(redis, max_accounts_per_call=per_call)
    for a in STATES:
        assert await store.create_account(
            "one_" + a.account_id,
            balance=a.balance,
            credit_limit=a.credit_limit,
            low_threshold=a.low_threshold,
            status=a.status,
            seq=a.seq,
            bucket=a.bucket,
            recharge_threshold=a.recharge_threshold,
            recharge_trigger=a.recharge_trigger,
            hold_reason=a.hold_reason,
            credited=a.credited,
        )
    batch = [dataclasses.replace(a, account_id="many_" + a.account_id) for a in STATES]
    assert await store.create_accounts(batch) == [True] * len(STATES)
    for a in STATES:
        alone = await dump(redis, "one_" + a.account_id)
        assert await dump(redis, "many_" + a.account_id) == alone, a
        assert alone[0][b"bal"] == str(a.balance).encode()

    # An account that has its state is left as it was, and answers False, in the batch's order.
    before = await dump(redis, "many_a1")
    again = [
        NewAccount("fresh", balance=3, credit_limit=0, low_threshold=0),
        NewAccount("many_a1", balance=0, credit_limit=0, low_threshold=0),
    ]
    assert await store.create_accounts(again) == [True, False]
    assert await dump(redis, "many_a1") == before
    assert (await store.get("fresh")).balance == 3  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="twice"):
        await store.create_accounts([again[0], again[0]])


async def test_every_account_rebuilt_after_a_flush_has_the_state_it_had(
    conns: Connections,
) -> None:
    now = int(datetime.now(UTC).timestamp())
    await put_price_list(conns.pool, demo_price_list())
    await put_plan(conns.pool, PlanSpec(id="flat5", included_minutes=5))
    await put_bundle(
        conns.pool, BundleSpec.model_validate({"id": "b10", "minutes": 10, "price": "0.01"})
    )
    specs = [
        AccountSpec.model_validate(
            {"id": f"acc_{i:02d}", "price_list_id": "standard", "balance": "0.05"}
            | ({"plan_id": "flat5"} if i % 3 == 0 else {})
            | ({"low_balance_threshold": "0.058", "credit_limit": "0.01"} if i % 4 == 1 else {})
        )
        for i in range(13)
    ]
    await create_accounts(conns.pool, conns.balances, specs)
    ids = [s.id for s in specs]
    await buy_bundle(conns.pool, conns.balances, "acc_02", "b10", "p1", now=datetime.now(UTC))
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    p = harness.processor(conns, catalog)
    # Calls of every length: some accounts draw on their minutes, some go low, some to hold
    # (their signals recorded, seq > 0), some are untouched.
    calls = [
        call_hangup(a, f"c{i}_{n}", US, 120 * n + 30 * i)
        for i, a in enumerate(ids)
        for n in range(i % 4)
    ]
    out = await p.process([call_record(e, k) for k, e in enumerate(calls)])
    assert out.charged == len(calls)  # process(): Redis, the ledger, then the signals

    before = {a: await dump(conns.redis, a) for a in ids}
    states = {a: fields[b"st"] for a, (fields, _) in before.items()}
    assert {b"active", b"low", b"hold"} <= set(states.values()), states  # the case is not trivial
    assert any(int(fields[b"seq"]) > 0 for fields, _ in before.values())
    assert sum(b"min" in fields for fields, _ in before.values()) >= 4

    await conns.redis.flushall()
    assert (await reconcile(conns.pool, conns.balances)).missing == len(ids)
    # Chunks smaller than the accounts, two at once: the walk over ids is what is tested.
    assert await rebuild_redis(conns.pool, conns.balances, chunk=4, in_flight=2, now=now) == len(
        ids
    )
    after = {a: await dump(conns.redis, a) for a in ids}
    assert {a: rebuilt_part(d) for a, d in after.items()} == {
        a: rebuilt_part(d) for a, d in before.items()
    }
    assert after["acc_02"][1] == {} and before["acc_02"][1] == {b"grant:bp1": b"-10000"}
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and (rec.missing, rec.drift_micros) == (0, 0)

    # Run again, or with some accounts lost: only those are loaded, the others left alone.
    assert await rebuild_redis(conns.pool, conns.balances, chunk=4) == 0
    await conns.redis.delete(keys.account("acc_05"), keys.account("acc_11"))
    assert await rebuild_redis(conns.pool, conns.balances, chunk=5) == 2
    assert {a: await dump(conns.redis, a) for a in ids} == after
