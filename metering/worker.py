"""The metering worker: the consume -> process -> commit loop around ``MeteringProcessor``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from balance.accounts import load_into_redis
from balance.store import RedisBalances
from contracts import topics
from infra import metrics
from infra.db import create_pool
from infra.ledger import PostgresLedger
from infra.redisclient import RedisClient, warm_up
from infra.redisclient import redis_client as make_redis_client
from infra.settings import Settings
from metering.batch import BatchOutcome
from metering.isolate import is_transient, isolate
from metering.processor import MeteringProcessor
from metering.publish import KafkaSignalPublisher
from rating.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Connections:
    pool: asyncpg.Pool
    redis: RedisClient
    producer: AIOKafkaProducer
    balances: RedisBalances

    @property
    def publisher(self) -> KafkaSignalPublisher:
        """The processor's ``SignalPublisher`` on ``producer`` (it holds nothing else)."""
        return KafkaSignalPublisher(self.producer)


def redis_client(settings: Settings) -> RedisClient:
    # A bounded socket timeout: a hung Redis surfaces as OutcomeUnknown, never a hung worker.
    # One node or a cluster, by the URL (infra.redisclient).
    return make_redis_client(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )


def kafka_producer(settings: Settings) -> AIOKafkaProducer:
    # No idempotent producer: idempotency is ours (event keys, signal seq), and the embedded
    # broker does not support it.
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
        enable_idempotence=False,
        request_timeout_ms=15_000,
    )


@contextlib.asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[Connections]:
    pool = await create_pool(settings.database_url, max_size=4)
    r = redis_client(settings)
    producer = kafka_producer(settings)
    try:
        await warm_up(r)
        await producer.start()
        yield Connections(
            pool,
            r,
            producer,
            RedisBalances(
                r,
                max_accounts_per_call=settings.redis_accounts_per_call,
                wait_replicas=settings.redis_wait_replicas,
                wait_timeout_ms=settings.redis_wait_timeout_ms,
            ),
        )
    finally:
        await producer.stop()
        await r.aclose()
        await pool.close()


def build_processor(settings: Settings, conns: Connections, catalog: Catalog) -> MeteringProcessor:
    """The processor ``run_metering`` runs, with every setting it takes (a test holds each one
    to reaching it: a setting dropped here is silently the processor's default)."""
    pool, balances = conns.pool, conns.balances

    async def rebuild(ids: list[str]) -> list[str]:
        return await load_into_redis(pool, balances, ids)

    return MeteringProcessor(
        balances=balances,
        ledger=PostgresLedger(pool),
        catalog=catalog,
        publisher=conns.publisher,
        rebuild=rebuild,  # type: ignore[arg-type]
        max_message_bytes=settings.max_message_bytes,
        max_call_s=settings.max_call_s,
        max_clock_skew_s=settings.max_clock_skew_s,
        # The same reservation rules as the API's authorizations (Settings.call_control).
        call_control=settings.call_control(),
    )


async def run_metering(
    settings: Settings,
    stop: asyncio.Event,
    *,
    on_batch: Callable[[BatchOutcome], None] | None = None,
    conns: Connections | None = None,
) -> None:
    """Consume the metered topics until ``stop`` is set. Offsets are committed per batch, only
    after the batch is in the ledger and its dead letters and signals are acknowledged."""
    async with contextlib.AsyncExitStack() as stack:
        if conns is None:
            conns = await stack.enter_async_context(connect(settings))
        catalog = Catalog(conns.pool, max_accounts=settings.catalog_max_accounts)
        await catalog.refresh()
        t = time.perf_counter()
        cached = await catalog.preload()
        log.info("catalog: %d accounts read in %.1f s", cached, time.perf_counter() - t)
        processor = build_processor(settings, conns, catalog)
        consumer = AIOKafkaConsumer(
            *topics.METERED,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
            # An empty fetch is held by the broker at most this long (aiokafka's default is
            # 500 ms): a caught-up worker otherwise sees a new record up to that late, and the
            # hold it causes reaches telephony that much later (meter bench metering's hold
            # latency). The batch's own wait (batch_timeout_ms) bounds it anyway.
            fetch_max_wait_ms=settings.batch_timeout_ms,
            # Oversized messages are dead-lettered by us, so the client must still fetch them.
            isolation_level="read_uncommitted",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(settings.kafka_session_timeout_ms // 4, 100),
        )
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        # Each batch allocates tens of thousands of short-lived objects; with the default
        # thresholds the cyclic GC walks every live object over and over (measured: about a
        # quarter of the hot path's time). Freeze what startup built and collect less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        timers = asyncio.create_task(_timers(processor, stop))
        try:
            await _consume(consumer, processor, settings, stop, on_batch)
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers


async def _timers(processor: MeteringProcessor, stop: asyncio.Event) -> None:
    """The outbox relay (every second) and the reservation sweep (every five). Several
    workers may run them at once: both are idempotent."""
    tick = 0
    while not stop.is_set():
        try:
            await processor.relay_outboxes()
            if tick % 5 == 0:
                await processor.sweep_reservations()
        except Exception:
            log.exception("timer failed; retrying in a second")
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def _consume(
    consumer: AIOKafkaConsumer,
    processor: MeteringProcessor,
    settings: Settings,
    stop: asyncio.Event,
    on_batch: Callable[[BatchOutcome], None] | None,
) -> None:
    """Batch N+1's first half (validate, rate, Redis) overlaps batch N's second half (ledger,
    publish); commits stay in order, each after its own batch's ledger write."""
    rewind: dict[TopicPartition, int] = {}  # where to restart each partition after a failure
    pending: (
        tuple[asyncio.Task[BatchOutcome], dict[TopicPartition, int], dict[str, int], int, float]
        | None
    )
    pending = None
    backoff = 0.1

    async def settle() -> None:
        nonlocal pending
        assert pending is not None
        task, offsets, per_topic, n, t0 = pending
        pending = None
        outcome = await task
        try:
            await consumer.commit(offsets)
            rewind.update(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions: the new owner replays, idempotently.
            log.warning("commit failed (%s); the batch will be replayed", exc)
        for topic, count in per_topic.items():
            metrics.EVENTS_CONSUMED.labels(topic).inc(count)
        metrics.BATCH_SIZE.observe(n)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        if on_batch is not None:
            on_batch(outcome)

    isolating = False  # the last failure was not transient: find the record that causes it

    def count(outcome: BatchOutcome) -> None:
        if on_batch is not None:
            on_batch(outcome)

    def rewind_all() -> None:
        assigned = consumer.assignment()
        for tp, offset in rewind.items():
            if tp in assigned:
                consumer.seek(tp, offset)

    while not stop.is_set():
        data = await consumer.getmany(
            timeout_ms=settings.batch_timeout_ms, max_records=settings.batch_max_records
        )
        try:
            if not data:
                if pending is not None:
                    await settle()
                continue
            t0 = time.perf_counter()
            for tp, msgs in data.items():
                rewind.setdefault(tp, msgs[0].offset)
            records = [r for msgs in data.values() for r in msgs]
            offsets = {tp: msgs[-1].offset + 1 for tp, msgs in data.items()}
            if isolating:
                # No overlap here: the batch by halves, then its commit (metering.isolate).
                await isolate(processor, records, count)
                try:
                    await consumer.commit(offsets)
                    rewind.update(offsets)
                except (CommitFailedError, KafkaError) as exc:
                    log.warning("commit failed (%s); the batch will be replayed", exc)
                isolating = False
                backoff = 0.1
                continue
            applied = await processor.apply(records)
            if pending is not None:
                await settle()
            per_topic: dict[str, int] = {}
            for tp, msgs in data.items():
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + len(msgs)
            task = asyncio.create_task(processor.finish(applied))
            pending = (task, offsets, per_topic, len(records), t0)
            backoff = 0.1
        except Exception as exc:
            # Nothing after the last commit counts: rewind and redo it. Every step is
            # idempotent, so what was already applied is not applied twice. A failure that
            # retrying cannot cure is redone by halves, to find the record behind it.
            if pending is not None:
                pending[0].cancel()
                with contextlib.suppress(BaseException):
                    await pending[0]
                pending = None
            if is_transient(exc):
                log.exception("batch failed; rewinding to the last committed offsets")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                log.exception("batch failed for good; redoing it by halves to isolate the record")
                isolating = True
            rewind_all()
    if pending is not None:
        await settle()
