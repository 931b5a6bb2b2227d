"""Invariant 1 across a real crash: the processor is SIGKILLed mid-stream and restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from contracts import topics
from infra.settings import Settings
from metering.worker import Connections
from ops.reconcile import reconcile
from tests.conftest import Seeder, eventually
from tests.helpers import expected_cost, produce
from tests.metering.test_processor import traffic

ROOT = Path(__file__).resolve().parents[2]


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update(
        {
            "METER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "METER_REDIS_URL": settings.redis_url,
            "METER_DATABASE_URL": settings.database_url,
            "METER_CONSUMER_GROUP": settings.consumer_group,
            "METER_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "METER_BATCH_MAX_RECORDS": "500",
            "METER_DATA_DIR": str(settings.data_dir),
        }
    )
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "meter.cli", "run", "metering"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def usage_rows(conns: Connections) -> int:
    return int(
        await conns.pool.fetchval("SELECT count(*) FROM ledger WHERE kind IN ('call', 'sms')")
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_killed_mid_stream_and_restarted_charges_every_event_once(
    settings: Settings, conns: Connections, seed: Seeder, tmp_path: Path
) -> None:
    accounts = [f"acc_{i}" for i in range(20)]
    await seed(*accounts, balance="1000.00")
    events = traffic(accounts, 12_000, seed=9)
    calls = [e for e in events if e["type"] == "call.hangup"]
    sms = [e for e in events if e["type"] == "message.sent"]
    for _ in range(2):  # every event published twice
        await produce(conns.producer, topics.CALL_EVENTS, calls)
        await produce(conns.producer, topics.MESSAGE_EVENTS, sms)

    log = tmp_path / "worker.log"
    kills = 0
    for _ in range(3):  # kill it up to three times, each time once it has made some progress
        proc = start_worker(settings, log)
        before = await usage_rows(conns)

        async def progressed(before: int = before, proc: subprocess.Popen[bytes] = proc) -> bool:
            n = await usage_rows(conns)
            return n >= min(before + 1_500, len(events)) or proc.poll() is not None

        await eventually(progressed, within=60, interval=0.005)
        assert proc.poll() is None, log.read_text()[-3000:]
        if await usage_rows(conns) >= len(events):
            proc.terminate()
            proc.wait(30)
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kills += 1
    assert kills >= 1, "the worker finished before it could be killed mid-stream"

    proc = start_worker(settings, log)
    try:

        async def drained() -> bool:
            return (await usage_rows(conns)) >= len(events) and (
                await reconcile(conns.pool, conns.balances)
            ).ok

        await eventually(drained, within=120, interval=0.2)
        await asyncio.sleep(1.0)  # let it chew through the remaining duplicates
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()[-3000:]

    assert await usage_rows(conns) == len(events)
    dup_keys = await conns.pool.fetchval(
        "SELECT count(*) FROM (SELECT source, event_id FROM ledger"
        " WHERE kind IN ('call', 'sms') GROUP BY 1, 2"
        " HAVING count(*) > 1) d"
    )
    assert dup_keys == 0
    for a in accounts:
        cost = sum(expected_cost(e) for e in events if e["subject"] == a)
        st = await conns.balances.get(a)
        assert st is not None and st.balance == 1_000_000_000 - cost, a
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0
