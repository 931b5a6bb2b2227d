"""Redis's "not now" answers, as redis-py really raises them, from a redis-server of the test's
own: a primary turned replica (READONLY, as at a failover) and memory full (OOM). redis-py gives
both classes of their own and takes the code out of the message, so mapping them by the code
alone made them ``Refused``: the worker then took a failover for a poison record and isolated
the batch record by record, dead-lettering what it could not charge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from balance.errors import StoreBusy
from balance.store import RedisBalances
from balance.values import Debit
from infra.embedded.redis_server import start_redis
from metering.isolate import is_transient


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[aioredis.Redis]:
    handle = start_redis(tmp_path)
    client = aioredis.Redis.from_url(handle.url)
    try:
        yield client
    finally:
        await client.aclose()
        handle.stop()


def _debit(i: int) -> Debit:
    return Debit(i.to_bytes(16, "big"), b"\x00" * 8, 1_000, 20_000)


async def _refusal(balances: RedisBalances) -> BaseException:
    with pytest.raises(StoreBusy) as raised:
        await balances.apply_debits({"acc_1": [_debit(1), _debit(2)]}, 20_000 * 86_400)
    return raised.value


async def test_a_primary_turned_replica_is_not_now_never_a_refusal(
    own_redis: aioredis.Redis,
) -> None:
    balances = RedisBalances(own_redis)
    await balances.create_account("acc_1", balance=10_000_000, credit_limit=0, low_threshold=0)
    # A replica of nothing that answers: it stays a replica, and refuses writes.
    await own_redis.execute_command("REPLICAOF", "127.0.0.1", "1")
    exc = await _refusal(balances)
    assert "ReadOnlyError" in str(exc) and is_transient(exc)
    await own_redis.execute_command("REPLICAOF", "NO", "ONE")
    (out,) = await balances.apply_debits({"acc_1": [_debit(1)]}, 20_000 * 86_400)
    assert (out.codes, out.balance) == ("n", 10_000_000 - 1_000)  # the refused try wrote nothing


async def test_memory_full_is_not_now_never_a_refusal(own_redis: aioredis.Redis) -> None:
    balances = RedisBalances(own_redis)
    await balances.create_account("acc_1", balance=10_000_000, credit_limit=0, low_threshold=0)
    await own_redis.config_set("maxmemory", 1)
    exc = await _refusal(balances)
    assert "OutOfMemoryError" in str(exc) and is_transient(exc)
    await own_redis.config_set("maxmemory", 0)
