"""``meter bench metering``'s hold latency: from the record that exhausts an account's credit
being produced to its ``account.hold`` being readable on ``billing.control-signals``, under load.

The hot path's throughput phase runs on a backlog (pre-filled topics): a probe produced then
would wait behind the backlog in its partition, and the figure would be the backlog's, not the
service's. So this phase loads the real worker with a steady stream at ``rate`` events/s (below
what it sustains, as production runs) and, among it, every ``1 / probes_per_s`` s one call that
exhausts a probe account (balance 0.10, a call costing more). For each probe: the time its
record was handed to the producer, and the time a consumer reading the signals topic (from its
end, no group) got the probe account's ``account.hold``. Both clocks are this process's
monotonic clock. ``meter bench metering`` runs the worker as a ``meter run metering`` process of
its own, as production does (``hold_worker`` "process"): in the bench's own event loop, the
load generator's sends and the reader's wake-ups waited behind each batch's Python, and the
figure was partly the bench's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from balance.accounts import AccountSpec, create_accounts
from contracts import topics
from infra.settings import Settings
from meter.bench_workers import start_worker
from meter.traffic import call_hangup, encode, message_sent
from metering.worker import Connections, run_metering

#: A call to the UK (0.015 a minute) of 10 minutes costs 0.15: more than a probe's 0.10.
_PROBE_BALANCE = "0.10"
_PROBE_CALL_S = 600
_PROBE_DEST = "+442071234567"


async def _watch(proc: subprocess.Popen[bytes]) -> None:
    """Returns when the worker process exits (its task is cancelled at the end)."""
    await asyncio.to_thread(proc.wait)


def _percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``p`` % at or below it."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


async def hold_latency(
    settings: Settings,
    conns: Connections,
    accounts: list[str],
    *,
    rate: int = 10_000,
    seconds: float = 10.0,
    probes_per_s: float = 10.0,
    worker_log: Path | None = None,
    drain_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run the worker under ``rate`` events/s for ``seconds`` with probes among them; the
    figures (milliseconds): ``hold_latency_ms_p50``, ``_p99``, ``_max``, and how many probes
    were sent and seen. ``worker_log``: run the worker as a ``meter run metering`` process
    writing there (``hold_worker`` "process"), else in this process ("in_process"). The clock
    starts once the worker caught up with what the topics held (within ``drain_timeout_s``)."""
    n_probes = max(1, int(seconds * probes_per_s))
    tag = uuid.uuid4().hex[:6]
    probe_ids = [f"probe_{tag}_{i:04d}" for i in range(n_probes)]
    await create_accounts(
        conns.pool,
        conns.balances,
        [
            AccountSpec.model_validate(
                {"id": a, "price_list_id": "standard", "balance": _PROBE_BALANCE}
            )
            for a in probe_ids
        ],
    )
    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    signals = AIOKafkaConsumer(
        topics.CONTROL_SIGNALS,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        # The broker may hold an empty fetch this long: short, or the measuring adds to it.
        fetch_max_wait_ms=10,
    )
    await signals.start()
    await signals.seek_to_end()
    for tp in signals.assignment():
        await signals.position(tp)  # the end, resolved now: nothing older is read
    stop_reading = asyncio.Event()
    all_seen = asyncio.Event()  # set by the reader once every probe sent so far was seen

    async def read() -> None:
        while not stop_reading.is_set():
            batch = await signals.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batch.values():
                for rec in records:
                    with contextlib.suppress(ValueError):
                        sig = orjson.loads(rec.value)
                        if sig.get("type") == "account.hold" and sig.get("subject") in sent_at:
                            seen_at.setdefault(sig["subject"], now)
            if len(seen_at) == len(sent_at):
                all_seen.set()

    s = dataclasses.replace(settings, consumer_group=f"bench-hold-{tag}")
    stop = asyncio.Event()
    proc: subprocess.Popen[bytes] | None = None
    if worker_log is None:
        worker = asyncio.create_task(run_metering(s, stop, conns=conns))
    else:
        # The worker in a process of its own, as production runs it: the load generator and
        # this reader do not share its event loop (or its GIL).
        proc = start_worker(s, s.consumer_group, worker_log)
        worker = asyncio.create_task(_watch(proc))
    reader = asyncio.create_task(read())
    rng = random.Random(7)
    produced = 0
    try:
        # Warm: the worker's group is new, so it starts at the earliest record and goes
        # through what the topics already hold (the throughput phase's backlog, all of it
        # duplicates by now) before it reaches a probe; the figure would be that backlog's
        # drain time (the p99 of seconds measured before). So one warm-up event goes to every
        # partition of both topics, behind the backlog, and the clock starts once the ledger
        # has all of them: every partition is then caught up.
        warm = 0
        for topic in (topics.CALL_EVENTS, topics.MESSAGE_EVENTS):
            for p in sorted(await conns.producer.partitions_for(topic)):
                event_id = f"{tag}-warm-{warm}"
                ev = (
                    call_hangup(accounts[0], event_id, _PROBE_DEST, 1)
                    if topic == topics.CALL_EVENTS
                    else message_sent(accounts[0], event_id, _PROBE_DEST, 1)
                )
                await (
                    await conns.producer.send(topic, encode(ev), accounts[0].encode(), partition=p)
                )
                warm += 1
        async with asyncio.timeout(drain_timeout_s):
            while await conns.pool.fetchval(
                "SELECT count(*) FROM ledger WHERE account_id = $1 AND ref LIKE $2",
                accounts[0],
                f"{tag}-warm-%",
            ) < warm:
                if worker.done():
                    await worker  # the worker died: say why
                    raise RuntimeError("the metering worker stopped before it caught up")
                await asyncio.sleep(0.1)
        start = time.perf_counter()
        i = probe = 0
        tick = 0.01  # produce in 10 ms slices
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(elapsed * rate) - i
            futures = []
            for _ in range(max(0, due)):
                a = rng.choice(accounts)
                if i % 5 == 0:
                    topic, ev = topics.MESSAGE_EVENTS, message_sent(a, f"{tag}m{i}", _PROBE_DEST, 1)
                else:
                    topic = topics.CALL_EVENTS
                    ev = call_hangup(a, f"{tag}c{i}", _PROBE_DEST, rng.randint(0, 300))
                futures.append(await conns.producer.send(topic, encode(ev), a.encode()))
                i += 1
            if probe < n_probes and elapsed >= probe / probes_per_s:
                a = probe_ids[probe]
                ev = call_hangup(a, f"{tag}p{probe}", _PROBE_DEST, _PROBE_CALL_S)
                sent_at[a] = time.perf_counter()
                futures.append(
                    await conns.producer.send(topics.CALL_EVENTS, encode(ev), a.encode())
                )
                probe += 1
            if futures:
                await asyncio.gather(*futures)
            await asyncio.sleep(tick)
        produced = i
        all_seen.clear()
        if len(seen_at) < len(sent_at):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_seen.wait(), 30)
    finally:
        stop.set()
        stop_reading.set()
        if proc is not None:
            worker.cancel()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await reader
        await signals.stop()
    lat = [(seen_at[a] - sent_at[a]) * 1000 for a in sent_at if a in seen_at]
    return {
        "hold_worker": "in_process" if proc is None else "process",
        "hold_load_eps": round(produced / seconds),
        "hold_probes_sent": len(sent_at),
        "hold_probes_seen": len(lat),
        "hold_latency_ms_p50": round(_percentile(lat, 50), 1) if lat else None,
        "hold_latency_ms_p99": round(_percentile(lat, 99), 1) if lat else None,
        "hold_latency_ms_max": round(max(lat), 1) if lat else None,
    }
