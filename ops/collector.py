"""``meter run ops``: what no single worker can see, sampled for Prometheus.

- consumer lag of the metering group, per partition (``meter_consumer_lag_records``): the
  broker's end offset minus the group's committed offset, as Burrow or kafka-exporter measure
  it. It is the group's view, so a dead worker's partitions keep being reported.
- accounts by state (``meter_accounts{state}``), counted from the account hashes in Redis, and
  the live reservations (``meter_reservations_live``), the size of their expiry index.
- reconciliation drift (``meter_reconcile_drift_*``), with mismatches confirmed by re-reads,
  since the pipeline is live, and apart from it the accounts Redis lost and has not rebuilt yet
  (``meter_reconcile_missing_accounts``; see ``ops.reconcile``).

Each collector runs on its own period (settings ``ops_*_interval_s``; 0 = off). A failing
collector logs, counts ``meter_ops_errors_total`` and tries again next period; its
``meter_ops_last_success_timestamp_seconds`` then ages, which an alert watches. Run one ``ops``
process per deployment: its numbers are global, more of them only repeat each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio.cluster import ClusterNode, RedisCluster

from balance import keys
from balance.store import RedisBalances
from balance.values import ACCOUNT_STATES
from contracts import topics
from infra import metrics
from infra.db import create_pool
from infra.redisclient import RedisClient, redis_client, warm_up
from infra.settings import Settings
from ops.reconcile import Reconciliation, reconcile

log = logging.getLogger(__name__)

#: Matches account hashes (``{a:ID}``) and none of an account's other keys (``{a:ID}:...``).
ACCOUNT_KEY_PATTERN = keys.tag("*")
#: Keys per SCAN step. Each step holds Redis for its whole walk, and authorize answers within
#: 2 ms from the same Redis: measured here, a step of 250 takes about 0.2 ms of Redis time (1000:
#: up to 0.9 ms), and 100k accounts (300k keys) cost 0.3 s of Redis time and 2.2 s end to end.
SCAN_COUNT = 250
#: A live reconciliation re-reads mismatched accounts after this long (a batch's ledger write
#: lands within milliseconds; this leaves room for a slow one).
RECHECK_AFTER_S = 2.0


async def consumer_lag(
    consumer: AIOKafkaConsumer, topic_names: Sequence[str]
) -> dict[TopicPartition, int]:
    """Records not yet committed by ``consumer``'s group, per partition of ``topic_names``.

    ``consumer`` has a ``group_id`` and no subscription (it never joins the group). A partition
    the group never committed counts from its first offset. The result is clamped at 0: the
    embedded Tansu broker reports the last batch's base offset + 1 as the end offset, so there
    the true lag is understated and, once the group has caught up, looks negative.
    """
    tps = _partitions(consumer, topic_names)
    if not tps:
        await consumer._client.force_metadata_update()  # a topic created since start-up
        tps = _partitions(consumer, topic_names)
    if not tps:
        return {}
    ends = await consumer.end_offsets(tps)
    firsts = await consumer.beginning_offsets(tps)
    lag: dict[TopicPartition, int] = {}
    for tp in tps:
        committed = await consumer.committed(tp)
        start = firsts[tp] if committed is None else committed
        lag[tp] = max(0, ends[tp] - start)
    return lag


def _partitions(consumer: AIOKafkaConsumer, topic_names: Sequence[str]) -> list[TopicPartition]:
    return [
        TopicPartition(t, p)
        for t in topic_names
        for p in sorted(consumer.partitions_for_topic(t) or ())
    ]


async def count_accounts(redis: RedisClient) -> dict[str, int]:
    """Accounts per ``st`` field of their hash (every known state present, at 0 if none).

    A SCAN over the whole keyspace in steps of ``SCAN_COUNT`` keys, each followed by one
    pipelined ``HGET st`` for the accounts it found: O(keys) work spread thin, never one long
    command. On a Redis Cluster, every primary's keyspace in turn (each holds its own slots;
    replicas only repeat them).
    """
    counts: dict[str, int] = dict.fromkeys(ACCOUNT_STATES, 0)
    if isinstance(redis, RedisCluster):
        for node in redis.get_primaries():
            await _count_keyspace(redis, counts, node)
    else:
        await _count_keyspace(redis, counts, None)
    return counts


async def _count_keyspace(
    redis: RedisClient, counts: dict[str, int], node: ClusterNode | None
) -> None:
    """Add the accounts of one keyspace to ``counts``: the node's (one node's of a cluster:
    ``node``), by SCAN steps."""
    cursor = 0
    while True:
        if node is None:
            assert not isinstance(redis, RedisCluster)
            cursor, found = await redis.scan(
                cursor, match=ACCOUNT_KEY_PATTERN, count=SCAN_COUNT, _type="hash"
            )
        else:
            assert isinstance(redis, RedisCluster)
            # A cluster's SCAN answers {node name: cursor} and the keys (typed as a node's).
            reply: Any = await redis.scan(
                cursor,
                match=ACCOUNT_KEY_PATTERN,
                count=SCAN_COUNT,
                _type="hash",
                target_nodes=node,
            )
            cursors, found = reply
            cursor = int(cursors[node.name])
        if found:
            pipe = redis.pipeline(transaction=False)
            for key in found:
                pipe.hget(key, "st")
            for st in await pipe.execute():
                # A hash without st is active (RedisBalances.get reads it the same way).
                state = st.decode() if st else "active"
                counts[state] = counts.get(state, 0) + 1
        if cursor == 0:
            return


@dataclass(frozen=True, slots=True)
class _Collector:
    name: str
    interval_s: float
    run: Callable[[], Awaitable[None]]


class OpsCollector:
    """The ops collectors of one deployment, over connections it is given.

    ``await run(stop)`` collects each on its period until ``stop`` is set; ``collect_*`` run
    one collector once (tests, a one-off look).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool,
        redis: RedisClient,
        consumer: AIOKafkaConsumer,
        recheck_after_s: float = RECHECK_AFTER_S,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._consumer = consumer
        self._recheck_after_s = recheck_after_s
        self._balances = RedisBalances(redis)
        self._collectors = [
            _Collector("lag", settings.ops_lag_interval_s, self._lag),
            _Collector("accounts", settings.ops_accounts_interval_s, self._accounts),
            _Collector("reconcile", settings.ops_reconcile_interval_s, self._reconcile),
        ]

    async def collect_lag(self) -> dict[TopicPartition, int]:
        lag = await consumer_lag(self._consumer, topics.METERED)
        group = self._settings.consumer_group
        for tp, n in lag.items():
            metrics.CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(n)
        return lag

    async def collect_accounts(self) -> dict[str, int]:
        """Accounts by state, and the live reservations (one ZCARD of their expiry index)."""
        counts = await count_accounts(self._redis)
        for state, n in counts.items():
            metrics.ACCOUNTS.labels(state).set(n)
        metrics.RESERVATIONS_LIVE.set(await self._redis.zcard(keys.RESERVATION_EXPIRY))
        return counts

    async def collect_drift(self) -> Reconciliation:
        result = await reconcile(self._pool, self._balances, recheck_after_s=self._recheck_after_s)
        if result.mismatched:
            sample = dict(list(result.mismatched.items())[:20])
            log.error(
                "reconciliation: %d account(s) drift by %d micros in total; redis, ledger: %s",
                len(result.mismatched),
                result.drift_micros,
                sample,
                extra={"account_id": next(iter(sample))},
            )
        if result.missing:
            # Info, not an error: after a Redis loss, dormant accounts stay missing until their
            # next event, and their money is right in the ledger all along.
            log.info(
                "reconciliation: %d account(s) not in Redis yet (rebuilt from the ledger on"
                " their next event or authorization); not drift",
                result.missing,
            )
        return result

    async def _lag(self) -> None:
        await self.collect_lag()

    async def _accounts(self) -> None:
        await self.collect_accounts()

    async def _reconcile(self) -> None:
        await self.collect_drift()

    async def run(self, stop: asyncio.Event) -> None:
        """Run every enabled collector on its own period until ``stop`` is set.

        Each collector has its own task, so a long reconciliation never delays the lag. On
        ``stop`` they are cancelled wherever they are: they only read, and set gauges.
        """
        active = [c for c in self._collectors if c.interval_s > 0]
        now = time.time()
        for c in self._collectors:
            metrics.OPS_INTERVAL.labels(c.name).set(c.interval_s)  # 0: off, on purpose
        for c in active:
            # Until a first success, "last success" is the start: a collector that never
            # succeeds goes stale after a few periods like one that stopped succeeding.
            metrics.OPS_LAST_SUCCESS.labels(c.name).set(now)
        tasks = [asyncio.create_task(self._every(c, stop), name=f"ops-{c.name}") for c in active]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _every(self, c: _Collector, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._run_one(c)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), c.interval_s)

    async def _run_one(self, c: _Collector) -> None:
        t0 = time.perf_counter()
        try:
            await c.run()
        except Exception:
            # Next period retries; the ageing last-success timestamp is what pages someone.
            metrics.OPS_ERRORS.labels(c.name).inc()
            log.exception("ops collector %s failed", c.name)
        else:
            metrics.OPS_LAST_SUCCESS.labels(c.name).set(time.time())
        finally:
            metrics.OPS_DURATION.labels(c.name).set(time.perf_counter() - t0)


def ops_redis(settings: Settings) -> RedisClient:
    return redis_client(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )


@contextlib.asynccontextmanager
async def running_collector(
    settings: Settings, *, recheck_after_s: float = RECHECK_AFTER_S
) -> AsyncIterator[OpsCollector]:
    """An ``OpsCollector`` with its own PostgreSQL pool, Redis client and Kafka consumer."""
    pool = await create_pool(settings.database_url, max_size=2)
    redis = ops_redis(settings)
    # A group_id only to read the group's committed offsets: it never subscribes, so it never
    # joins the group or takes a partition from a worker.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    try:
        await warm_up(redis)
        await consumer.start()
        yield OpsCollector(
            settings,
            pool=pool,
            redis=redis,
            consumer=consumer,
            recheck_after_s=recheck_after_s,
        )
    finally:
        await consumer.stop()
        await redis.aclose()
        await pool.close()
