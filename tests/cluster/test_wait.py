"""``WAIT`` after the debit round trip on the session's Redis Cluster, with one primary's replica
frozen (SIGSTOP: it acknowledges nothing): the batch fails on that node's ``WAIT`` instead of
being acknowledged, and a replay that writes nothing still waits for what its first try wrote.
A primary killed with its replica behind is tests/cluster/test_failover.py's."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from balance import keys
from balance.errors import NotReplicated
from balance.store import RedisBalances
from balance.values import Credit, Debit
from infra.clock import system_clock
from infra.redisclient import redis_client
from tests.cluster.redis_cluster import Node, RedisClusterHandle

pytestmark = pytest.mark.redis_cluster

DAY_S = 86_400
TIMEOUT_MS = 200
ACCOUNTS = [f"acc_{i}" for i in range(30)]  # on all three primaries


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RedisCluster]:
    c = redis_client(redis_url, socket_timeout=5, socket_connect_timeout=5)
    assert isinstance(c, RedisCluster)
    await c.initialize()
    yield c
    await c.aclose()


def batch(accounts: list[str], day: int, tag: str) -> dict[str, list[Debit]]:
    return {
        a: [
            Debit(
                hashlib.blake2b(f"{tag}:{a}:{i}".encode(), digest_size=16).digest(),
                hashlib.blake2b(b"", digest_size=8).digest(),
                1_000,
                day,
            )
            for i in range(2)
        ]
        for a in accounts
    }


async def victim_and_replica(
    cluster: RedisClusterHandle, client: RedisCluster
) -> tuple[Node, Node, list[str]]:
    """The primary of ``acc_0``, its replica, and the accounts on that primary; every account
    created and on the replicas."""
    plain = RedisBalances(client)
    for a in ACCOUNTS:
        await plain.create_account(a, balance=1_000_000, credit_limit=0, low_threshold=0)
    port = int(client.get_node_from_key(keys.account("acc_0")).port)
    victim = cluster.node(port)
    on_victim = [a for a in ACCOUNTS if client.get_node_from_key(keys.account(a)).port == port]
    assert 0 < len(on_victim) < len(ACCOUNTS)  # other primaries take part too
    # Several connections to each node in the client's pool (it hands them out in turn): a
    # WAIT sent on any connection but the one that carried the writes would answer at once.
    await asyncio.gather(*(plain.get(a) for a in ACCOUNTS * 4))
    assert len(client.get_node_from_key(keys.account("acc_0"))._connections) > 1
    for p in cluster.primaries():
        await asyncio.to_thread(cluster.wait_replicas_caught_up, p)
    [replica] = cluster.replicas_of(victim)
    return victim, replica, on_victim


async def test_the_batch_fails_on_the_node_whose_replica_acknowledged_nothing(
    cluster: RedisClusterHandle, client: RedisCluster
) -> None:
    now = int(system_clock())
    day = now // DAY_S
    victim, replica, on_victim = await victim_and_replica(cluster, client)
    plain = RedisBalances(client)
    waiting = RedisBalances(client, wait_replicas=1, wait_timeout_ms=TIMEOUT_MS)
    first, second = batch(ACCOUNTS, day, "first"), batch(ACCOUNTS, day, "second")

    with cluster.frozen(replica):
        # Without WAIT the primary acknowledges what its replica does not have.
        out = await plain.apply_debits(first, now)
        assert [o.codes for o in out] == ["nn"] * len(ACCOUNTS)
        # With it, the batch fails: that primary's WAIT, on the connection that carried its
        # calls, waited its whole timeout and counted no replica. (A WAIT on a connection that
        # had written nothing would have answered 1 at once.)
        t0 = time.monotonic()
        none_of = re.escape(f"0 of 1 replicas of {victim.addr} ")
        with pytest.raises(NotReplicated, match=none_of) as caught:
            await waiting.apply_debits(second, now)
        assert time.monotonic() - t0 >= TIMEOUT_MS / 1000
        assert str(caught.value).count("replicas of") == 1  # the other two nodes' WAITs passed

    await asyncio.to_thread(cluster.wait_replicas_caught_up, victim)
    # The replay, once the replica caught up: every debit applied once, and acknowledged now.
    again = await waiting.apply_debits(second, now)
    assert [o.codes for o in again] == ["dd"] * len(ACCOUNTS)
    for a in ACCOUNTS:
        st = await plain.get(a)
        assert st is not None and st.balance == 1_000_000 - 4_000, a
    assert on_victim


async def test_a_replay_that_writes_nothing_still_waits_for_its_first_try(
    cluster: RedisClusterHandle, client: RedisCluster, redis_url: str
) -> None:
    """The first try applied the batch over one client's connections (WAIT off); its replay
    over a new client finds every debit applied and writes nothing, so its connections have
    written nothing: only the mark before each WAIT makes that WAIT wait for the first try's
    writes, still not on the frozen replica."""
    now = int(system_clock())
    day = now // DAY_S
    victim, replica, _ = await victim_and_replica(cluster, client)
    first = batch(ACCOUNTS, day, "first")
    other = redis_client(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        waiting = RedisBalances(other, wait_replicas=1, wait_timeout_ms=TIMEOUT_MS)
        with cluster.frozen(replica):
            out = await RedisBalances(client).apply_debits(first, now)
            assert [o.codes for o in out] == ["nn"] * len(ACCOUNTS)
            none_of = re.escape(f"0 of 1 replicas of {victim.addr} ")
            with pytest.raises(NotReplicated, match=none_of):
                await waiting.apply_debits(first, now)
        await asyncio.to_thread(cluster.wait_replicas_caught_up, victim)
        again = await waiting.apply_debits(first, now)
        assert [o.codes for o in again] == ["dd"] * len(ACCOUNTS)
    finally:
        await other.aclose()


async def test_a_credit_waits_for_its_own_node_s_replica(
    cluster: RedisClusterHandle, client: RedisCluster
) -> None:
    # A payment's credit: on the frozen replica's primary it fails and is applied once on the
    # retry; on another primary, whose replica acknowledges, it succeeds with the wait on.
    victim, replica, on_victim = await victim_and_replica(cluster, client)
    elsewhere = next(a for a in ACCOUNTS if a not in on_victim)
    plain = RedisBalances(client)
    waiting = RedisBalances(client, wait_replicas=1, wait_timeout_ms=TIMEOUT_MS)

    with cluster.frozen(replica):
        none_of = re.escape(f"credit p1: 0 of 1 replicas of {victim.addr} ")
        with pytest.raises(NotReplicated, match=none_of):
            await waiting.credit("acc_0", "p1", 5_000, payment=True)
        ok = await waiting.credit(elsewhere, "p1", 5_000, payment=True)
        assert (ok.applied, ok.balance) == (True, 1_005_000)
        with pytest.raises(NotReplicated, match=re.escape(f"of {victim.addr} ")):
            await waiting.credit_many([Credit("acc_0", "c1", 1), Credit(elsewhere, "c1", 1)])

    await asyncio.to_thread(cluster.wait_replicas_caught_up, victim)
    # Applied on the primary all the same, each once: the retries change nothing.
    again = await waiting.credit("acc_0", "p1", 5_000, payment=True)
    assert (again.applied, again.balance) == (False, 1_005_001)
    outs = await waiting.credit_many([Credit("acc_0", "c1", 1), Credit(elsewhere, "c1", 1)])
    assert [o.applied for o in outs] == [False, False]
    for a in ("acc_0", elsewhere):
        st = await plain.get(a)
        assert st is not None and st.balance == 1_005_001, a
