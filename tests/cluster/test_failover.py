"""A primary of the Redis Cluster killed (SIGKILL), each test on a cluster of its own (AOF on).

Redis replicates asynchronously, so a write a primary acknowledged in the instant before it
died can be missing on the replica that takes over, whatever ``appendfsync`` says. The first
two tests make that instant as long as they like by freezing the replica (SIGSTOP: it
acknowledges nothing) before the kill: without ``WAIT`` the worker commits debits the replica
never got, and the failover loses them (drift); with it (``METER_REDIS_WAIT_REPLICAS``,
balance/pipeline.py) those batches fail instead, nothing is committed, and after the failover
the worker's replay charges every event once.

The last test kills a primary under load while a worker charges a stream of events (each
published twice), twice over: once with ``WAIT`` off, the primary's writes paused and its
replica let catch up before the kill (so Redis has nothing to lose and anything but drift 0
would be the service's fault), and once with ``WAIT`` on and no such help. Either way, once the
pipeline drains every event is charged once and reconciliation finds no drift."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from balance import keys
from contracts import topics
from infra.settings import Settings
from metering.worker import Connections, connect
from ops.reconcile import reconcile
from tests import harness
from tests.cluster.redis_cluster import Node, RedisClusterHandle, redis_cluster
from tests.conftest import Seeder, eventually
from tests.helpers import expected_cost, produce
from tests.metering.test_crash import usage_rows
from tests.metering.test_processor import traffic

pytestmark = [pytest.mark.redis_cluster, pytest.mark.slow]

#: What the worker waits for after each debit round trip, when it does.
WAIT = {"redis_wait_replicas": 1, "redis_wait_timeout_ms": 100}
START = 100_000_000  # every account's opening balance, micro-units ("100.00")


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterHandle]:
    """A cluster for this test alone: it kills a primary."""
    with redis_cluster(tmp_path / "redis-cluster") as handle:
        yield handle


@pytest.fixture
def redis_url(own_cluster: RedisClusterHandle) -> str:
    return own_cluster.url


async def primary_of_acc_0(
    conns: Connections, cluster: RedisClusterHandle, accounts: list[str]
) -> tuple[Node, list[str]]:
    """The primary of ``acc_0`` and the accounts on it."""
    assert isinstance(conns.redis, RedisCluster)
    await conns.redis.initialize()
    port = int(conns.redis.get_node_from_key(keys.account("acc_0")).port)
    on_it = [a for a in accounts if conns.redis.get_node_from_key(keys.account(a)).port == port]
    return cluster.node(port), on_it


async def publish(conns: Connections, events: list[dict[str, Any]], times: int = 1) -> None:
    calls = [e for e in events if e["type"] == "call.hangup"]
    sms = [e for e in events if e["type"] == "message.sent"]
    for _ in range(times):
        await produce(conns.producer, topics.CALL_EVENTS, calls)
        await produce(conns.producer, topics.MESSAGE_EVENTS, sms)


async def victim_with_its_replica(
    conns: Connections, seed: Seeder, cluster: RedisClusterHandle
) -> tuple[Node, Node, list[str]]:
    """Accounts seeded (on every replica too), the primary of ``acc_0``, its replica, and the
    accounts on that primary."""
    accounts = [f"acc_{i}" for i in range(12)]
    await seed(*accounts, balance="100.00")
    victim, on_victim = await primary_of_acc_0(conns, cluster, accounts)
    assert on_victim
    for p in cluster.primaries():
        await asyncio.to_thread(cluster.wait_replicas_caught_up, p)
    [replica] = cluster.replicas_of(victim)
    return victim, replica, on_victim


async def balances_of(conns: Connections, accounts: list[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for a in accounts:
        st = await conns.balances.get(a)
        out[a] = None if st is None else st.balance
    return out


async def test_without_wait_a_primary_killed_loses_the_debits_it_acknowledged(
    settings: Settings, conns: Connections, seed: Seeder, own_cluster: RedisClusterHandle
) -> None:
    victim, replica, on_victim = await victim_with_its_replica(conns, seed, own_cluster)
    events = traffic(on_victim, 200, seed=5)
    cost = sum(expected_cost(e) for e in events)
    assert cost > 0
    await publish(conns, events)

    with own_cluster.cut_off(replica, victim):
        async with harness.running_worker(settings, conns):

            async def committed() -> bool:
                return await usage_rows(conns) == len(events)

            await eventually(committed, within=60)
        # Every batch is in the ledger and its offsets committed (the worker stops after its
        # last commit); its debits are on the primary alone.
        own_cluster.kill(victim)
    by_itself = await asyncio.to_thread(own_cluster.wait_promoted, replica)
    print(f"failed over by itself: {by_itself}")
    await asyncio.to_thread(own_cluster.wait_healthy, 60)
    await conns.redis.aclose()  # read the new layout at the next call

    # The replica that took over never got the debits: each account is back at its opening
    # balance while the ledger has every charge, so Redis is higher by exactly their cost.
    assert await balances_of(conns, on_victim) == {a: START for a in on_victim}
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.drift_micros == cost and not rec.ok
    assert await usage_rows(conns) == len(events)
    # And nothing replays them: their offsets were committed.
    async with harness.running_worker(settings, conns):
        await asyncio.sleep(2.0)
    assert (await reconcile(conns.pool, conns.balances)).drift_micros == cost


async def test_with_wait_the_batch_fails_and_the_replay_after_the_failover_charges_once(
    settings: Settings, conns: Connections, seed: Seeder, own_cluster: RedisClusterHandle
) -> None:
    victim, replica, on_victim = await victim_with_its_replica(conns, seed, own_cluster)
    events = traffic(on_victim, 200, seed=5)
    expected = {
        a: START - sum(expected_cost(e) for e in events if e["subject"] == a) for a in on_victim
    }
    assert expected != {a: START for a in on_victim}
    await publish(conns, events)
    waiting = replace(settings, **WAIT)

    async with connect(waiting) as wconns:
        with own_cluster.cut_off(replica, victim):
            async with harness.running_worker(waiting, wconns) as outcomes:

                async def applied_on_the_primary() -> bool:
                    return await balances_of(conns, on_victim) == expected

                # The primary applies every debit, and each batch fails on its WAIT: no replica
                # acknowledged them. Nothing reaches the ledger, no batch finishes, no offset
                # is committed, however long it goes on (each try waits 100 ms, then backs off).
                await eventually(applied_on_the_primary, within=60)
                await asyncio.sleep(1.5)
                assert await usage_rows(conns) == 0
                assert outcomes == []
            own_cluster.kill(victim)
        by_itself = await asyncio.to_thread(own_cluster.wait_promoted, replica)
        print(f"failed over by itself: {by_itself}")
        await asyncio.to_thread(own_cluster.wait_healthy, 60)
        await conns.redis.aclose()  # read the new layout at the next call
        # The replica that took over lacks the debits the primary applied (as above)...
        assert await balances_of(conns, on_victim) == {a: START for a in on_victim}
        # ...and has no replica of its own until the old primary is back as one: until then
        # its WAIT counts none. Then the worker replays from its last commit.
        await asyncio.to_thread(own_cluster.start_node, victim)
        await asyncio.to_thread(own_cluster.wait_healthy, 60)
        async with harness.running_worker(waiting, wconns) as outcomes:

            async def drained() -> bool:
                return (
                    await usage_rows(conns) == len(events)
                    and (await reconcile(conns.pool, conns.balances)).ok
                )

            await eventually(drained, within=120, interval=0.2)
        assert sum(o.charged for o in outcomes) == len(events)

    assert victim.port not in {n.port for n in own_cluster.primaries()}
    assert await usage_rows(conns) == len(events)
    dup_keys = await conns.pool.fetchval(
        "SELECT count(*) FROM (SELECT source, event_id FROM ledger"
        " WHERE kind IN ('call', 'sms') GROUP BY 1, 2 HAVING count(*) > 1) d"
    )
    assert dup_keys == 0
    assert await balances_of(conns, on_victim) == expected
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0 and rec.missing == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("wait", [False, True], ids=["caught-up", "wait"])
async def test_a_primary_killed_under_load_fails_over_and_every_event_is_charged_once(
    settings: Settings,
    conns: Connections,
    seed: Seeder,
    own_cluster: RedisClusterHandle,
    wait: bool,
) -> None:
    accounts = [f"acc_{i}" for i in range(40)]
    await seed(*accounts, balance="1000.00")
    events = traffic(accounts, 8_000, seed=11)
    await publish(conns, events, times=2)  # every event published twice
    victim, on_victim = await primary_of_acc_0(conns, own_cluster, accounts)
    assert on_victim  # the kill hits accounts the stream is charging
    run = replace(settings, batch_max_records=300, **(WAIT if wait else {}))

    async with connect(run) as wconns, harness.running_worker(run, wconns):

        async def progressed() -> bool:
            return await usage_rows(conns) >= 1_500

        await eventually(progressed, within=60, interval=0.005)
        assert await usage_rows(conns) < len(events), "the stream ended before the kill"
        if not wait:
            # No write in flight on it, its replica caught up: then the kill loses nothing.
            await asyncio.to_thread(
                own_cluster.cli, victim.port, "client", "pause", "20000", "write"
            )
            await asyncio.to_thread(own_cluster.wait_replicas_caught_up, victim)
        own_cluster.kill(victim)
        await asyncio.to_thread(own_cluster.wait_healthy, 60)  # the replica took over
        if wait:
            # Its WAIT needs a replica: the old primary, back as the new one's.
            await asyncio.to_thread(own_cluster.start_node, victim)
            await asyncio.to_thread(own_cluster.wait_healthy, 60)
        await conns.redis.aclose()  # the test's own client (not the worker's): the new layout

        async def drained() -> bool:
            return (await usage_rows(conns)) >= len(events) and (
                await reconcile(conns.pool, conns.balances)
            ).ok

        await eventually(drained, within=120, interval=0.2)
        await asyncio.sleep(1.0)  # let it chew through the remaining duplicates

    assert victim.port not in {n.port for n in own_cluster.primaries()}
    assert await usage_rows(conns) == len(events)
    dup_keys = await conns.pool.fetchval(
        "SELECT count(*) FROM (SELECT source, event_id FROM ledger"
        " WHERE kind IN ('call', 'sms') GROUP BY 1, 2 HAVING count(*) > 1) d"
    )
    assert dup_keys == 0
    for a in accounts:
        cost = sum(expected_cost(e) for e in events if e["subject"] == a)
        st = await conns.balances.get(a)
        assert st is not None and st.balance == 1_000_000_000 - cost, a
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0 and rec.missing == 0
