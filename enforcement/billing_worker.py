"""``meter run billing``, the billing clock: keep the numbers inventory from
``telephony.number-events`` (a consumer group of its own), begin each subscription's period
(its plan's fee, its allowance: ``enforcement.subscriptions``), renew, hold and release
numbers on the clock (``enforcement.numbers``), and issue last month's invoices, apply their
payments and follow them past due (``enforcement.invoices``).

The metering workers read the same topic for what it charges (activations) and dead-letter
what is not valid; this worker skips what is not valid, by the same rules, without a dead letter
of its own (one per bad record is the metering workers'). A record is committed once its step
is done; a step that fails (Redis or PostgreSQL away) is retried, in order, and every step is
idempotent, so a record read again after a crash or a rebalance changes nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pydantic
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError
from redis.exceptions import RedisError

from balance.errors import OutcomeUnknown, Refused, StoreBusy
from balance.store import RedisBalances
from contracts import topics
from contracts.events import (
    MIN_EVENT_TIME,
    NumberActivated,
    NumberDeactivated,
    NumberRenewalDue,
    parse_inbound,
    period_problem,
)
from contracts.payments import Notification
from enforcement.invoices import CardPayments, InvoiceRules, Invoices
from enforcement.numbers import NumberEvent, NumberLifecycle, NumberRules
from enforcement.subscriptions import Subscriptions
from infra import metrics
from infra.clock import Clock, system_clock
from infra.db import create_pool
from infra.redisclient import redis_client, warm_up
from infra.settings import Settings
from rating.catalog import Catalog

log = logging.getLogger(__name__)

#: Between two attempts of a step that failed for want of Redis or PostgreSQL.
RETRY_S = 1.0


def valid_event(
    key: bytes | None, value: bytes | None, *, now: float, max_skew_s: int, max_bytes: int
) -> NumberEvent | str:
    """The number event in a record, or why it is skipped (the metering workers dead-letter
    it with that reason)."""
    if value is None:
        return "schema"
    if len(value) > max_bytes:
        return "oversized"
    try:
        ev = parse_inbound(value)
    except pydantic.ValidationError:
        return "schema"
    if not isinstance(ev, NumberActivated | NumberRenewalDue | NumberDeactivated):
        return "wrong_topic"
    if not ev.subject_matches():
        return "schema"
    if key is not None and key != ev.subject.encode():
        return "key_mismatch"
    epoch = ev.time.timestamp()
    if epoch > now + max_skew_s:
        return "future_timestamp"
    if epoch < MIN_EVENT_TIME:
        return "timestamp_out_of_range"
    if isinstance(ev, NumberRenewalDue):
        utc = datetime.fromtimestamp(int(epoch), UTC)
        if period_problem(ev.data.period, utc.year, utc.month):
            return "bad_period"
    return ev


#: Redis or PostgreSQL away or busy: the step is retried (each is idempotent). A ``Refused``
#: (a script refused its arguments) is not among them: the same step would fail the same way,
#: so it is logged, counted as ``failed`` and left (no record holds its partition up).
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    RedisError,
    OutcomeUnknown,
    StoreBusy,
)


async def run_billing(
    settings: Settings,
    stop: asyncio.Event,
    *,
    clock: Clock = system_clock,
    on_step: Callable[[str], None] | None = None,
    payments: Callable[[asyncpg.Pool, RedisBalances], CardPayments] | None = None,
) -> None:
    """Consume number events and tick the lifecycle every ``billing_scan_interval_s`` until
    ``stop`` is set. ``payments``: builds the card payments invoices' auto-pay uses (the roof,
    ``meter``, gives the payment service; None: auto-pay waits for Pay Now). Notices go to
    ``billing.notifications``. ``on_step(outcome)`` for tests."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(settings.database_url, max_size=4)
        stack.push_async_callback(pool.close)
        r = redis_client(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            health_check_interval=30,
        )
        stack.push_async_callback(r.aclose)
        await warm_up(r)
        catalog = Catalog(pool)
        await catalog.refresh()
        balances = RedisBalances(
            r,
            clock=clock,
            wait_replicas=settings.redis_wait_replicas,  # an invoice paid from credit waits
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        subscriptions = Subscriptions(pool, balances, clock=clock)
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False
        )
        await producer.start()
        stack.push_async_callback(producer.stop)
        due_days, suspend_days, warn_days = settings.invoice_rules()
        invoices = Invoices(
            pool,
            balances,
            payments=None if payments is None else payments(pool, balances),
            notify=_Notices(producer),
            rules=InvoiceRules(
                due_days=due_days,
                suspend_after_days=suspend_days,
                warn_days=warn_days,
                run_delay_s=settings.invoice_run_delay_s,
            ),
            clock=clock,
        )
        lifecycle = NumberLifecycle(
            pool,
            balances,
            catalog.lookup,
            rules=NumberRules(
                grace_s=settings.number_grace_s, recharge_wait_s=settings.number_recharge_wait_s
            ),
            clock=clock,
        )
        consumer = AIOKafkaConsumer(
            topics.NUMBER_EVENTS,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.billing_worker_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(settings.kafka_session_timeout_ms // 4, 100),
        )
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        log.info("numbers: keeping the inventory from %s", topics.NUMBER_EVENTS)
        loop = asyncio.get_running_loop()
        next_tick = loop.time()

        async def step(work: Callable[[], Awaitable[str]]) -> str:
            """``work`` until it succeeds (or ``stop``): its failures are Redis's or
            PostgreSQL's, retried in order; ``failed`` for one refused."""
            while True:
                try:
                    return await work()
                except Refused as exc:
                    log.error("numbers: step refused, left: %s", exc)
                    metrics.NUMBER_STEPS.labels("failed").inc()
                    return "failed"
                except _TRANSIENT as exc:
                    log.warning("numbers: step failed (%r); retrying", exc)
                    metrics.NUMBER_STEPS.labels("failed").inc()
                    if stop.is_set():
                        raise
                    await asyncio.sleep(RETRY_S)

        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=200)
            for records in batch.values():
                for rec in records:
                    ev = valid_event(
                        rec.key,
                        rec.value,
                        now=clock(),
                        max_skew_s=settings.max_clock_skew_s,
                        max_bytes=settings.max_message_bytes,
                    )
                    if isinstance(ev, str):
                        outcome = "ignored"  # the metering workers dead-letter it
                        metrics.NUMBER_STEPS.labels(outcome).inc()
                    else:
                        outcome = await step(functools.partial(lifecycle.on_event, ev))
                    if on_step is not None:
                        on_step(outcome)
            if batch:
                try:
                    await consumer.commit()
                except CommitFailedError:
                    log.warning("numbers: commit failed after a rebalance; read again")
                except KafkaError as exc:
                    log.warning("numbers: commit failed (%r); retried with the next", exc)
            if loop.time() >= next_tick:
                next_tick = loop.time() + settings.billing_scan_interval_s
                await step(functools.partial(_tick, subscriptions, lifecycle, invoices, on_step))


class _Notices:
    """Invoices' notices on ``billing.notifications``, keyed by account (best effort: the
    invoice row is the record; ``enforcement.invoices`` logs a notice that could not go)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def notify(self, notification: Notification) -> None:
        await self._producer.send_and_wait(
            topics.NOTIFICATIONS,
            notification.model_dump_json().encode(),
            notification.subject.encode(),
        )


async def _tick(
    subscriptions: Subscriptions,
    lifecycle: NumberLifecycle,
    invoices: Invoices,
    on_step: Callable[[str], None] | None,
) -> str:
    """The clock's work: periods begun (plan fees, allowances) before numbers are renewed, so
    that a period's fee and its numbers' months are taken in that order; then last month's
    invoices (once it is over), payments applied, past due."""
    counts = await subscriptions.tick()
    for work in (lifecycle.tick, invoices.tick):
        for outcome, n in (await work()).items():
            counts[outcome] = counts.get(outcome, 0) + n
    if on_step is not None:
        for outcome, n in counts.items():
            for _ in range(n):
                on_step(outcome)
    return "ticked"
