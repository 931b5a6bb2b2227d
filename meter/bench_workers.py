"""``meter bench metering --workers N``: aggregate events/s of one and of N metering worker
processes (``meter run metering``, each its own process) in one consumer group, in one run.

Phase 1 pre-fills the topics and lets one worker charge them; phase 2 pre-fills as many fresh
events and starts N workers in the same group, which go on from the group's commits. Both
phases are timed the same way, from the ledger's ``recorded_at`` (each batch's transaction
time): the rows between the phase's 10th and 90th percentile over the time between them, so a
process's start, the group's join and the tail of the last partitions are left out of both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings
from metering.worker import Connections

#: the project's root, where ``python -m meter.cli`` runs from
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Phase:
    workers: int
    events: int
    eps: float
    seconds: float


def start_worker(settings: Settings, group: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env |= {
        "METER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "METER_REDIS_URL": settings.redis_url,
        "METER_DATABASE_URL": settings.database_url,
        "METER_CONSUMER_GROUP": group,
        "METER_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "METER_BATCH_MAX_RECORDS": str(settings.batch_max_records),
        "METER_BATCH_TIMEOUT_MS": str(settings.batch_timeout_ms),
        "METER_DATA_DIR": str(settings.data_dir),
    }
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "meter.cli", "run", "metering"],
            cwd=_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _usage_rows(conns: Connections) -> int:
    return int(
        await conns.pool.fetchval("SELECT count(*) FROM ledger WHERE kind IN ('call', 'sms')")
    )


async def run_phase(
    settings: Settings,
    conns: Connections,
    group: str,
    workers: int,
    events: int,
    log: Path,
    *,
    within_s: float = 600.0,
) -> Phase:
    """Start ``workers`` processes in ``group``, wait until the ledger has ``events`` more
    usage rows than now, stop them (SIGTERM: each finishes its batch), and time the phase."""
    before = await _usage_rows(conns)
    since = await conns.pool.fetchval("SELECT now()")
    procs = [start_worker(settings, group, log) for _ in range(workers)]
    deadline = time.monotonic() + within_s
    try:
        while await _usage_rows(conns) < before + events:
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{workers} worker(s): {'one exited' if dead else 'too slow'}; see {log}"
                )
            await asyncio.sleep(0.25)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.to_thread(p.wait, 30)
            except subprocess.TimeoutExpired:
                p.kill()
    row = await conns.pool.fetchrow(
        "WITH r AS (SELECT recorded_at FROM ledger WHERE kind IN ('call', 'sms')"
        "  AND recorded_at >= $1)"
        " SELECT percentile_disc(0.1) WITHIN GROUP (ORDER BY recorded_at) AS t10,"
        "  percentile_disc(0.9) WITHIN GROUP (ORDER BY recorded_at) AS t90 FROM r",
        since,
    )
    assert row is not None  # an aggregate answers one row
    t10, t90 = row["t10"], row["t90"]
    middle = await conns.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE kind IN ('call', 'sms')"
        " AND recorded_at > $1 AND recorded_at <= $2",
        t10,
        t90,
    )
    seconds = (t90 - t10).total_seconds()
    return Phase(workers, events, middle / seconds if seconds > 0 else 0.0, seconds)
