"""Small Kafka helpers for the demo, the benchmark and the tests (not the hot path)."""

from __future__ import annotations

import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


async def read_all(
    bootstrap: str,
    topic: str,
    *,
    idle_s: float = 1.0,
    timeout_s: float = 30.0,
    expect: int | None = None,
) -> list[Any]:
    """Every record of ``topic`` from the beginning, without a consumer group.

    Stops once ``expect`` records were read, or after ``idle_s`` without a new record (end
    offsets are not used: the embedded Tansu broker reports the last batch's base offset).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100, max_records=10_000)
            n = sum(len(v) for v in batch.values())
            for msgs in batch.values():
                out.extend(msgs)
            if n:
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                break
            if expect is None and time.monotonic() - last_new > idle_s:
                break
    finally:
        await consumer.stop()
    return out
