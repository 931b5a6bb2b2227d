"""``meter run bridge``: consume ``billing.control-signals`` (a consumer group of its own) and
enforce each signal on the switch (``bridge.enforce``), committing a partition's offset only
past signals that are enforced.

Partitioned by account, so one bridge owns an account's order. A ``call.terminate`` due later
holds its partition's committed offset back until it is enforced: a bridge that dies before
then leaves it to the next one, which reads it again (later signals of the partition are
enforced again too, harmlessly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from bridge.enforce import SignalBridge, parse_signal
from bridge.switch import KamailioRpc, SwitchControl
from contracts import topics
from infra.clock import Clock, system_clock
from infra.settings import Settings

log = logging.getLogger(__name__)


class Offsets:
    """Per partition: the records read and the ones not yet enforced; what may be committed
    is the lowest not enforced (or one past the last read)."""

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}
        self._open: dict[TopicPartition, set[int]] = {}
        self._committed: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offset: int) -> Callable[[], None]:
        """Record ``offset`` as read and open; the callable closes it (enforced)."""
        self._next[tp] = offset + 1
        pending = self._open.setdefault(tp, set())
        pending.add(offset)
        return lambda: pending.discard(offset)

    def due(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """What to commit now (partitions whose committable offset moved)."""
        out: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, nxt in self._next.items():
            pending = self._open.get(tp)
            at = min(pending) if pending else nxt
            if self._committed.get(tp, -1) < at:
                out[tp] = OffsetAndMetadata(at, "")
        return out

    def committed(self, done: dict[TopicPartition, OffsetAndMetadata]) -> None:
        for tp, om in done.items():
            self._committed[tp] = om.offset

    def forget(self) -> None:
        """After a rebalance: what was read is read again by whoever owns it now."""
        self._next.clear()
        self._open.clear()
        self._committed.clear()


async def run_bridge(
    settings: Settings,
    stop: asyncio.Event,
    *,
    switch: SwitchControl | None = None,
    clock: Clock = system_clock,
    on_signal: Callable[[str, str], None] | None = None,
) -> None:
    """Enforce signals until ``stop`` is set. ``switch``: Kamailio's JSON-RPC at
    ``settings.bridge_rpc_url`` unless given. ``on_signal(type, outcome)`` for tests."""
    async with contextlib.AsyncExitStack() as stack:
        if switch is None:
            rpc = KamailioRpc(settings.bridge_rpc_url, timeout_s=settings.bridge_rpc_timeout_s)
            stack.push_async_callback(rpc.close)
            switch = rpc
        bridge = SignalBridge(switch, clock=clock, stop=stop)
        stack.push_async_callback(bridge.close)
        consumer = AIOKafkaConsumer(
            topics.CONTROL_SIGNALS,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.bridge_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(settings.kafka_session_timeout_ms // 4, 100),
        )
        await consumer.start()
        stack.push_async_callback(consumer.stop)
        offsets = Offsets()
        log.info("bridge: enforcing %s on %s", topics.CONTROL_SIGNALS, settings.bridge_rpc_url)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in batch.items():
                for rec in records:
                    done = offsets.read(tp, rec.offset)
                    s = parse_signal(rec.value)
                    if s is None:
                        done()
                        continue
                    outcome = await bridge.handle(s, done)
                    if on_signal is not None:
                        on_signal(s.type, outcome)
            due = offsets.due()
            if due:
                try:
                    await consumer.commit(due)
                    offsets.committed(due)
                except CommitFailedError:
                    # Rebalanced: the partitions' new owner reads them from the last commit.
                    log.warning("bridge: commit failed after a rebalance")
                    offsets.forget()
                except KafkaError as exc:
                    log.warning("bridge: commit failed (%r); retried with the next", exc)
