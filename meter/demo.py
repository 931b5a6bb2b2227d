"""``meter demo``: the service's main job end to end on embedded defaults.

Starts what is not configured, seeds accounts and a price list, runs the metering processor,
drives simulated switch traffic for a bounded time with live progress, then drains and
reconciles: events produced vs charged, dead letters by reason, Redis balances vs the ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from balance.accounts import create_accounts, put_price_list
from contracts import topics
from infra.kafkatools import read_all
from infra.settings import Settings
from infra.stack import running_stack
from meter.demo_recharge import CAP, DECLINED, RechargeDemo
from meter.traffic import TrafficGenerator, demo_accounts, demo_price_list
from metering.processor import BatchOutcome
from metering.worker import connect, run_metering
from ops.reconcile import reconcile


@dataclass(slots=True)
class LiveStats:
    records: int = 0
    charged: int = 0
    duplicates: int = 0
    charged_micros: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    signals: Counter[str] = field(default_factory=Counter)

    def add(self, o: BatchOutcome) -> None:
        self.records += o.records
        self.charged += o.charged
        self.duplicates += o.duplicates
        self.charged_micros += o.charged_micros
        self.dead.update(o.dead_letters)
        self.signals.update(s.type for _, s in o.signals)


def _say(line: str) -> None:
    print(line, flush=True)


async def _count_topic(bootstrap: str, topic: str, header: str | None) -> Counter[str]:
    """Count a topic's messages by a header, or by CloudEvent type."""
    import orjson

    counts: Counter[str] = Counter()
    for m in await read_all(bootstrap, topic):
        if header:
            counts[dict(m.headers).get(header, b"?").decode()] += 1
        else:
            counts[orjson.loads(m.value)["type"]] += 1
    return counts


async def run_demo(
    settings: Settings, n_accounts: int, seconds: float, rate: int, keep: bool
) -> int:
    root = Path(settings.data_dir) / f"demo-{int(time.time())}"
    if settings.kafka_session_timeout_ms == Settings().kafka_session_timeout_ms:
        # A quicker group join for a short demo; production keeps the default.
        settings = dataclasses.replace(settings, kafka_session_timeout_ms=3_000)
    _say(f"meter demo: {n_accounts} accounts, {rate} events/s for {seconds:.0f} s")
    _say(f"  embedded services under {root} (only those not configured by METER_* variables)")
    try:
        async with running_stack(settings, root) as s, connect(s) as conns:
            return await _demo(s, conns, n_accounts, seconds, rate)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


async def _demo(s: Settings, conns: object, n_accounts: int, seconds: float, rate: int) -> int:
    from metering.worker import Connections

    assert isinstance(conns, Connections)
    rng = random.Random(42)
    # Number fees too, so that the number events of the traffic cost something.
    plist = demo_price_list().model_copy(
        update={"number_monthly_fee": 1_000_000, "one_time_fees": {"number_setup": 500_000}}
    )
    await put_price_list(conns.pool, plist)
    specs = demo_accounts(n_accounts, rng)
    await create_accounts(conns.pool, conns.balances, specs)
    opening = sum(a.balance for a in specs)
    # Every other thin account (they run dry) pays by card with auto-recharge on.
    payments = RechargeDemo(
        s,
        conns,
        [a.id for i, a in enumerate(specs) if i % 20 == 0],
        log=Path(s.data_dir) / "recharge-worker.log",
    )
    await payments.setup(specs)
    payments.start_worker()
    _say(
        f"  seeded price list {plist.id!r} ({len(plist.outbound)} prefixes) and "
        f"{len(specs)} accounts, opening balances {opening / 1e6:,.2f} USD"
    )

    _say(
        f"  auto-recharge on for {len(payments.auto_accounts)} accounts, plus {CAP} (will hit"
        f" the 24 h cap) and {DECLINED} (its card declines); recharge worker pid"
        f" {payments.worker.pid if payments.worker else '?'}"
    )
    stats = LiveStats()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_metering(s, stop, on_batch=stats.add, conns=conns))
    heavy_stop = asyncio.Event()
    heavy = asyncio.create_task(payments.drive(heavy_stop))
    gen = TrafficGenerator([a.id for a in specs], number_share=0.002)
    producer = conns.producer
    start = time.monotonic()
    sent = 0
    next_report = start + 1.0
    last_records = 0
    tick = 0.02
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate) - sent
        futures = []
        for _ in range(max(due, 0)):
            m = gen.next()
            futures.append(await producer.send(m.topic, m.value, m.key))
            sent += 1
        if futures:
            await asyncio.gather(*futures)
        if worker.done():
            break
        if now >= next_report:
            _say(
                f"  t={now - start:4.0f}s produced={sent:>8} consumed={stats.records:>8} "
                f"({stats.records - last_records:>6} ev/s) charged={stats.charged:>8} "
                f"dup={stats.duplicates:>5} dead={sum(stats.dead.values()):>4} "
                f"holds={stats.signals['account.hold']:>4} "
                f"low={stats.signals['account.low_balance']:>4}"
            )
            last_records = stats.records
            next_report += 1.0
        await asyncio.sleep(tick)

    _say("  traffic stopped; waiting for the recharge demo accounts, then draining ...")
    heavy_deadline = time.monotonic() + 120
    while not heavy.done() and time.monotonic() < heavy_deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # drive() ends once the cap account has had its 11th call
    heavy_stop.set()
    await heavy
    # Drained = every record produced was processed and committed (on_batch runs after the
    # commit). Broker end offsets are not used: Tansu reports the last batch's base offset.
    sent += payments.heavy_calls
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not worker.done() and stats.records < sent:  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # polls a counter the worker's callback bumps
    drained = stats.records >= sent
    await payments.settle()
    await asyncio.sleep(1.5)  # the relay publishes the last resume / hold signals
    stop.set()
    await worker
    if not drained:
        _say(f"  not drained: consumed {stats.records} of {sent}")

    p = gen.produced
    charged_rows = await conns.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE kind IN ('call', 'sms', 'fee')"
    )
    dead = await _count_topic(s.kafka_bootstrap, topics.DEAD_LETTER, "error.reason")
    signals = await _count_topic(s.kafka_bootstrap, topics.CONTROL_SIGNALS, None)
    rec = await reconcile(conns.pool, conns.balances)
    on_hold = 0
    for a in specs:
        st = await conns.balances.get(a.id)
        on_hold += st is not None and st.status == "hold"

    payments.stop_worker()
    ok_charged = charged_rows == p.unique_valid + payments.heavy_calls
    ok_dead = dict(dead) == dict(p.malformed)
    _say("")
    _say("reconciliation")
    _say(f"  drained                       {'yes' if drained else 'NO'}")
    _say(
        f"  events produced               {sent} ({p.unique_valid} distinct valid, "
        f"{p.acknowledged} number renewals and deactivations (no hot-path charge), "
        f"{p.duplicates} duplicates, {sum(p.malformed.values())} malformed, "
        f"{payments.heavy_calls} calls to drain the recharge demo accounts)"
    )
    _say(
        f"  distinct events in the ledger {charged_rows}  "
        f"{'== produced' if ok_charged else '!= produced  <-- MISMATCH'}"
    )
    _say(f"  duplicates seen               {stats.duplicates} (charged once each)")
    _say(f"  charged                       {stats.charged_micros / 1e6:,.6f} USD")
    _say(
        f"  dead letters by reason        {dict(sorted(dead.items()))}  "
        f"{'== injected' if ok_dead else '!= injected ' + str(dict(p.malformed))}"
    )
    _say(f"  signals published             {dict(sorted(signals.items()))}")
    _say(f"  accounts on hold              {on_hold}")
    _say(
        f"  Redis vs ledger               {rec.accounts} accounts, "
        f"drift {rec.drift_micros} micro-units, {len(rec.mismatched)} mismatched"
    )
    ok_payments = await payments.report(_say)
    ok = drained and ok_charged and ok_dead and rec.ok and ok_payments
    _say("OK" if ok else "FAILED")
    sys.stdout.flush()
    return 0 if ok else 1
