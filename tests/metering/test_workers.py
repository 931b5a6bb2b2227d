"""Two metering workers (``meter run metering`` processes) in one consumer group, one SIGKILLed
mid-stream: the survivor takes its partitions within the session timeout and every event is
charged exactly once (invariant 1), reconciliation finding drift 0 (invariant 2)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts import topics
from infra.settings import Settings
from metering.worker import Connections
from ops.reconcile import reconcile
from tests.conftest import Seeder, eventually
from tests.helpers import expected_cost, produce
from tests.metering.test_crash import start_worker, usage_rows
from tests.metering.test_processor import traffic

#: start_worker's METER_KAFKA_SESSION_TIMEOUT_MS
SESSION_TIMEOUT_S = 2.0
#: after the session timeout: the group's rejoin (the embedded broker holds a join for about
#: half the session timeout), the survivor's first batch on the partitions and its commit.
#: That batch is the survivor's backlog, on two cores shared with the test's broker, Redis and
#: PostgreSQL: with other tests running beside it, the last partition moved 5.5, 6.2 and
#: 7.2 s after the kill (4 s of margin failed twice so). Still far below a default session
#: timeout (45 s), which is what the bound is there to catch.
TAKEOVER_MARGIN_S = 6.0


async def committed(settings: Settings, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets (-1: none yet), read without joining the group."""
    c = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await c.start()
    try:
        return {tp: (await c.committed(tp)) or -1 for tp in tps}
    finally:
        await c.stop()


async def partitions(settings: Settings) -> tuple[list[TopicPartition], dict[TopicPartition, int]]:
    """Every metered topic's partitions and their end offsets."""
    c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await c.start()
    try:
        tps = [
            TopicPartition(t, p) for t in topics.METERED for p in c.partitions_for_topic(t) or ()
        ]
        return tps, await c.end_offsets(tps)
    finally:
        await c.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_two_workers_one_killed_mid_stream_the_survivor_takes_over_and_charges_once(
    settings: Settings, conns: Connections, seed: Seeder, tmp_path: Path
) -> None:
    accounts = [f"acc_{i}" for i in range(40)]
    await seed(*accounts, balance="1000.00")
    events = traffic(accounts, 60_000, seed=18)
    calls = [e for e in events if e["type"] == "call.hangup"]
    sms = [e for e in events if e["type"] == "message.sent"]
    for _ in range(2):  # every event published twice
        await produce(conns.producer, topics.CALL_EVENTS, calls)
        await produce(conns.producer, topics.MESSAGE_EVENTS, sms)
    tps, ends = await partitions(settings)
    loaded = [tp for tp in tps if ends[tp] > 0]
    assert len(loaded) >= 4, ends  # enough partitions with records for two owners

    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    a, b = (start_worker(settings, log) for log in logs)
    survivor_ok = False
    try:
        # Both started and charging, then one killed while most partitions have records left
        # (some of them its own: nothing says which, so the bound below is measured on every
        # partition left behind).
        async def both_charging() -> bool:
            assert a.poll() is None and b.poll() is None, logs[0].read_text()[-2000:]
            return await usage_rows(conns) >= 3_000

        await eventually(both_charging, within=90, interval=0.02)
        at_kill = await committed(settings, loaded)
        behind = [tp for tp in loaded if at_kill[tp] < ends[tp]]
        assert len(behind) >= len(loaded) // 2, (at_kill, ends)  # killed mid-stream, not at the end
        a.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        a.wait(30)

        # The survivor: every partition left behind moves on (its own at once, the dead one's
        # once the group has rebalanced), within the session timeout and the rejoin.
        moved: dict[TopicPartition, float] = {}
        while len(moved) < len(behind) and time.monotonic() - killed_at < 60:
            now = await committed(settings, behind)
            for tp in behind:
                if tp not in moved and now[tp] > at_kill[tp]:
                    moved[tp] = time.monotonic() - killed_at
            await asyncio.sleep(0.05)
        assert b.poll() is None, logs[1].read_text()[-3000:]
        assert len(moved) == len(behind), (moved, behind)
        takeover_s = max(moved.values())
        print(f"survivor moved every partition left behind within {takeover_s:.2f} s of the kill")
        assert takeover_s <= SESSION_TIMEOUT_S + TAKEOVER_MARGIN_S, moved

        async def drained() -> bool:
            return (await usage_rows(conns)) >= len(events) and (
                await reconcile(conns.pool, conns.balances)
            ).ok

        await eventually(drained, within=120, interval=0.2)
        await eventually(
            lambda: committed_all(settings, loaded, ends), within=60, interval=0.2
        )  # the duplicates too: every record read, nothing charged twice
        survivor_ok = True
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
        assert b.wait(30) == 0 or not survivor_ok, logs[1].read_text()[-3000:]

    assert await usage_rows(conns) == len(events)
    assert await conns.pool.fetchval(
        "SELECT count(DISTINCT (source, event_id)) FROM ledger WHERE kind IN ('call', 'sms')"
    ) == len(events)
    for acct in accounts:
        cost = sum(expected_cost(e) for e in events if e["subject"] == acct)
        st = await conns.balances.get(acct)
        assert st is not None and st.balance == 1_000_000_000 - cost, acct
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0


async def committed_all(
    settings: Settings, tps: list[TopicPartition], ends: dict[TopicPartition, int]
) -> bool:
    done = await committed(settings, tps)
    return all(done[tp] >= ends[tp] for tp in tps)
