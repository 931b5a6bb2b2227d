"""``WAIT`` after the debit round trip on one node (the session's own redis-server, which has no
replica): asking for a replica fails the batch with a transient error after the timeout, 0
sends no ``WAIT`` at all. The cluster's side, with real replicas, is tests/cluster/test_wait.py."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from balance.errors import NotReplicated
from balance.store import RedisBalances
from balance.values import Credit, Debit
from infra.clock import system_clock
from infra.settings import Settings
from metering.isolate import is_transient
from metering.worker import connect

DAY_S = 86_400


def debits(n: int, day: int, *, tag: str = "") -> list[Debit]:
    return [
        Debit(
            hashlib.blake2b(f"{tag}{i}".encode(), digest_size=16).digest(),
            hashlib.blake2b(b"", digest_size=8).digest(),
            1_000,
            day,
        )
        for i in range(n)
    ]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def calls_of(r: aioredis.Redis, command: str) -> int:
    """How many times the server ran ``command`` (INFO commandstats), 0 if never."""
    stats = await r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_replica_asked_of_a_node_without_one_fails_the_batch_transiently(
    redis: aioredis.Redis,
) -> None:
    now = int(system_clock())
    day = now // DAY_S
    plain = RedisBalances(redis, max_accounts_per_call=2)
    waiting = RedisBalances(redis, max_accounts_per_call=2, wait_replicas=1, wait_timeout_ms=150)
    accounts = ["a", "b", "c"]  # two script calls in the round trip, one WAIT
    for a in accounts:
        await plain.create_account(a, balance=1_000_000, credit_limit=0, low_threshold=0)
    batch = {a: debits(2, day, tag=a) for a in accounts}
    waits = await calls_of(redis, "wait")

    t0 = time.monotonic()
    with pytest.raises(NotReplicated, match="0 of 1 replicas") as caught:
        await waiting.apply_debits(batch, now)
    elapsed = time.monotonic() - t0

    assert is_transient(caught.value)  # the worker rewinds and replays the batch
    assert elapsed >= 0.15  # WAIT waited its timeout for a replica: it had a write to wait for
    assert await calls_of(redis, "wait") == waits + 1  # one node, one connection: one WAIT
    # Redis applied the batch all the same (nothing can undo that); the replay finds it applied.
    again = await plain.apply_debits(batch, now)
    assert [o.codes for o in again] == ["dd", "dd", "dd"]
    for a in accounts:
        st = await plain.get(a)
        assert st is not None and st.balance == 1_000_000 - 2_000
    # The mark left nothing behind.
    assert sorted(await redis.keys("*wait*")) == []


async def test_zero_replicas_sends_no_wait(redis: aioredis.Redis) -> None:
    now = int(system_clock())
    day = now // DAY_S
    off = RedisBalances(redis, max_accounts_per_call=2, wait_replicas=0)
    on = RedisBalances(redis, max_accounts_per_call=2, wait_replicas=1, wait_timeout_ms=1)
    for a in ("a", "b", "c"):
        await off.create_account(a, balance=1_000_000, credit_limit=0, low_threshold=0)
    waits, scripts = await calls_of(redis, "wait"), await calls_of(redis, "evalsha")

    out = await off.apply_debits({a: debits(2, day, tag=a) for a in ("a", "b", "c")}, now)

    assert [o.codes for o in out] == ["nn", "nn", "nn"]
    assert await calls_of(redis, "wait") == waits
    assert await calls_of(redis, "evalsha") == scripts + 2  # the two debit calls, no mark
    # The same counters do see a WAIT and its mark when one is asked for.
    with pytest.raises(NotReplicated):
        await on.apply_debits({"a": debits(1, day, tag="x")}, now)
    assert await calls_of(redis, "wait") == waits + 1
    assert await calls_of(redis, "evalsha") == scripts + 2 + 2


async def test_the_worker_s_balances_wait_as_the_settings_say(settings: Settings) -> None:
    now = int(system_clock())
    wanted = replace(settings, redis_wait_replicas=1, redis_wait_timeout_ms=50)
    async with connect(wanted) as conns:
        await conns.balances.create_account("a", balance=1_000, credit_limit=0, low_threshold=0)
        with pytest.raises(NotReplicated, match=r"0 of 1 replicas .* within 50 ms"):
            await conns.balances.apply_debits({"a": debits(1, now // DAY_S)}, now)
    async with connect(settings) as conns:  # the default: off
        out = await conns.balances.apply_debits({"a": debits(1, now // DAY_S)}, now)
        assert out[0].codes == "d"


async def test_a_credit_asked_to_wait_for_a_missing_replica_fails_and_is_applied_once(
    redis: aioredis.Redis,
) -> None:
    # Money in waits as the debits do: a top-up credited only on a primary that then fails
    # over would vanish, its payment marked credited. NotReplicated leaves it to be retried.
    plain = RedisBalances(redis)
    waiting = RedisBalances(redis, wait_replicas=1, wait_timeout_ms=150)
    for a in ("pay", "many_1", "many_2"):
        await plain.create_account(a, balance=0, credit_limit=0, low_threshold=0)
    waits = await calls_of(redis, "wait")

    with pytest.raises(NotReplicated, match="credit p1: 0 of 1 replicas") as caught:
        await waiting.credit("pay", "p1", 5_000_000, payment=True)
    assert is_transient(caught.value)
    assert await calls_of(redis, "wait") == waits + 1
    again = await plain.credit("pay", "p1", 5_000_000, payment=True)  # the recovery's retry
    assert (again.applied, again.balance) == (False, 5_000_000)

    credits = [Credit("many_1", "c1", 1_000), Credit("many_2", "c2", 2_000)]
    with pytest.raises(NotReplicated, match="credit batch: 0 of 1 replicas"):
        await waiting.credit_many(credits)
    assert await calls_of(redis, "wait") == waits + 2  # one node: one WAIT for the batch
    assert [o.applied for o in await plain.credit_many(credits)] == [False, False]
    for a, balance in (("pay", 5_000_000), ("many_1", 1_000), ("many_2", 2_000)):
        st = await plain.get(a)
        assert st is not None and st.balance == balance
    # Without a wait asked, no WAIT.
    assert (await plain.credit("pay", "p2", 1)).applied
    assert await calls_of(redis, "wait") == waits + 2
    assert sorted(await redis.keys("*wait*")) == []
