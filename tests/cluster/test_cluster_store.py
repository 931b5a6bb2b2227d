"""The balance store on a real Redis Cluster, through the service's own client factory: the
client the URL asks for, one script call per slot carrying that slot's accounts, pipelines of
scripts across every primary, scripts loaded again after NOSCRIPT, and the ops accounts count
covering every primary. (The retry policy's test, a timed-out script sent once on a cluster
too, is in tests/infra/test_redis_clients.py.)"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from balance import keys, slots
from balance.store import RedisBalances
from balance.values import Debit
from infra.clock import system_clock
from infra.redisclient import (
    InstrumentedRedisCluster,
    RedisClient,
    cluster_nodes,
    redis_client,
    warm_up,
)
from infra.settings import Settings, SettingsError
from ops.collector import count_accounts
from tests.cluster.redis_cluster import RedisClusterHandle

pytestmark = pytest.mark.redis_cluster

USD = 1_000_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RedisClient]:
    r = redis_client(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    assert isinstance(r, RedisCluster)
    await r.initialize()  # the slots map, for the tests to find where accounts live
    yield r
    await r.aclose()


def same_slot_accounts(n: int) -> list[str]:
    """``n`` account ids whose keys all fall in one hash slot."""
    seen: dict[int, list[str]] = {}
    for i in itertools.count():
        a = f"acc_{i}"
        group = seen.setdefault(slots.slot(a), [])
        group.append(a)
        if len(group) == n:
            return group
    raise AssertionError("unreachable")


def debit(i: int, amount: int) -> Debit:
    return Debit(i.to_bytes(16, "big"), b"\x00" * 8, amount, int(system_clock()) // 86_400)


async def evalsha_calls(port: int) -> int:
    r = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        stats = await r.info("commandstats")
    finally:
        await r.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def reset_stats(cluster: RedisClusterHandle) -> None:
    for n in cluster.primaries():
        r = aioredis.Redis(host="127.0.0.1", port=n.port)
        await r.config_resetstat()
        await r.aclose()


async def test_the_url_names_the_client_and_a_bad_cluster_url_stops_the_process(
    tmp_path: Path,
) -> None:
    assert cluster_nodes("redis+cluster://10.0.0.1:7000,[::1]:7001") == (
        [("10.0.0.1", 7000), ("::1", 7001)],
        None,
        None,
    )
    assert cluster_nodes("redis+cluster://u:p%40ss@h:1")[1:] == ("u", "p@ss")
    for bad in ("redis+cluster://h", "redis+cluster://h:x", "redis+cluster://h:1/3"):
        with pytest.raises(SettingsError, match="METER_REDIS_URL"):
            Settings.from_env({"METER_REDIS_URL": bad, "METER_DATA_DIR": str(tmp_path)})
    s = Settings.from_env({"METER_REDIS_URL": "redis+cluster://127.0.0.1:1"})
    c = redis_client(s.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    assert isinstance(c, InstrumentedRedisCluster)
    await c.aclose()
    plain = redis_client("redis://127.0.0.1:1/0", socket_timeout=1.0, socket_connect_timeout=1.0)
    assert isinstance(plain, aioredis.Redis)


async def test_one_script_call_carries_every_account_of_a_slot(
    client: RedisClient, cluster: RedisClusterHandle
) -> None:
    balances = RedisBalances(client, max_accounts_per_call=256)
    together = same_slot_accounts(5)
    # One account on every primary too, so the round trip spans the cluster.
    spread: dict[int, str] = {}
    for i in itertools.count():
        a = f"other_{i}"
        spread.setdefault(_port(client, a), a)
        if len(spread) == 3:
            break
    accounts = [*together, *spread.values()]
    for a in accounts:
        await balances.create_account(a, balance=10 * USD, credit_limit=0, low_threshold=0)
    home = _port(client, together[0])
    await balances.apply_debits({a: [debit(1, USD)] for a in accounts}, int(system_clock()))
    await reset_stats(cluster)  # the calls below only: the first one loaded the script

    batch = {a: [debit(2, USD), debit(3, USD)] for a in reversed(accounts)}
    out = await balances.apply_debits(batch, int(system_clock()))

    assert [o.account_id for o in out] == list(batch)  # the batch's order, not the slots'
    assert all(o.found and o.codes == "nn" and o.balance == 7 * USD for o in out)
    calls = {n.port: await evalsha_calls(n.port) for n in cluster.primaries()}
    # The five of one slot went in one call; each other account in a call of its own.
    assert sum(calls.values()) == 1 + len(spread)
    assert calls[home] == 1 + sum(1 for a in spread.values() if _port(client, a) == home)
    for a in accounts:
        st = await balances.get(a)
        assert st is not None and st.balance == 7 * USD


def _port(client: RedisClient, account_id: str) -> int:
    """The port of the primary holding ``account_id``."""
    assert isinstance(client, RedisCluster)
    return int(client.get_node_from_key(keys.account(account_id)).port)


async def test_a_cap_of_one_account_per_call_still_goes_in_one_round_trip(
    client: RedisClient,
) -> None:
    balances = RedisBalances(client, max_accounts_per_call=2)
    accounts = [*same_slot_accounts(3), "x1", "x2", "x3"]
    for a in accounts:
        await balances.create_account(a, balance=5 * USD, credit_limit=0, low_threshold=0)
    out = await balances.apply_debits({a: [debit(1, USD)] for a in accounts}, int(system_clock()))
    got = [(o.account_id, o.codes, o.balance) for o in out]
    assert got == [(a, "n", 4 * USD) for a in accounts]
    again = await balances.apply_debits({a: [debit(1, USD)] for a in accounts}, int(system_clock()))
    assert [o.codes for o in again] == ["d"] * len(accounts)


async def test_scripts_lost_by_every_primary_are_loaded_again(
    client: RedisClient, cluster: RedisClusterHandle
) -> None:
    balances = RedisBalances(client)
    accounts = [f"acc_{i}" for i in range(12)]
    for a in accounts:
        await balances.create_account(a, balance=5 * USD, credit_limit=0, low_threshold=0)
    for n in cluster.primaries():  # a failover to a replica has no scripts either
        r = aioredis.Redis(host="127.0.0.1", port=n.port)
        await r.script_flush()
        await r.aclose()
    out = await balances.apply_debits({a: [debit(1, USD)] for a in accounts}, int(system_clock()))
    assert all(o.codes == "n" for o in out)
    got = await balances.reserve_many([], now_s=0, grant_s=1, grace_s=1, max_s=1)
    assert got == []
    assert await balances.balances(accounts) == dict.fromkeys(accounts, 4 * USD)


async def test_ops_counts_the_accounts_of_every_primary(
    client: RedisClient, cluster: RedisClusterHandle
) -> None:
    balances = RedisBalances(client)
    accounts = [f"acc_{i}" for i in range(300)]
    for a in accounts:
        await balances.create_account(a, balance=USD, credit_limit=0, low_threshold=0)
    await balances.set_status("acc_7", "suspend", "operator")
    held = {_port(client, a) for a in accounts}
    assert held == {n.port for n in cluster.primaries()}  # spread over all three
    counts = await count_accounts(client)
    assert counts["active"] == 299 and counts["suspended"] == 1


async def test_a_warmed_up_client_takes_a_burst_of_first_calls(redis_url: str) -> None:
    """Every process warms its cluster client up at start (``infra.redisclient.warm_up``):
    measured, a cold redis-py cluster client failed 13 of 100 concurrent first calls."""
    r = redis_client(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    await warm_up(r)
    balances = RedisBalances(r)
    got = await asyncio.gather(
        *(
            balances.create_account(f"acc_{i}", balance=USD, credit_limit=0, low_threshold=0)
            for i in range(200)
        ),
        return_exceptions=True,
    )
    await r.aclose()
    assert got == [True] * 200


def test_a_cluster_between_layouts_is_a_retry_never_a_bad_record() -> None:
    """What the cluster client raises past its one retry (a failover outlasting it) is the
    store's ``StoreBusy`` or ``OutcomeUnknown``, which the hot path retries whole; as an
    ordinary exception it would read as a poison record and bisect the batch."""
    from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError

    from balance.errors import OutcomeUnknown, StoreBusy, map_error

    assert isinstance(map_error("debit", ClusterDownError("CLUSTERDOWN")), StoreBusy)
    assert isinstance(map_error("debit", SlotNotCoveredError("slot 7 not covered")), StoreBusy)
    assert isinstance(map_error("debit", RedisClusterException("TTL exhausted")), OutcomeUnknown)
