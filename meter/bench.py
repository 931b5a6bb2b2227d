"""``meter bench metering``: the hot path's events/s, and the bare baseline loop on the same data.

Both loops read the same pre-filled topics in one run, on this machine, beside the same broker,
Redis and PostgreSQL, so their ratio means something even on a noisy shared machine:

- baseline: getmany -> orjson decode -> one Lua call per batch (HINCRBY per account, no
  idempotency) -> COPY into a table without constraints -> commit. The least any loop must do.
- metering: the real processor (validation, rating, idempotent debits, ledger with
  ON CONFLICT, dead letters, signals) through ``run_metering``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from balance import keys
from balance.accounts import AccountSpec, create_accounts, put_price_list, rebuild_redis
from contracts import topics
from infra import metrics
from infra.settings import Settings
from infra.stack import running_stack
from meter.bench_costs import CostMeter
from meter.bench_hold import hold_latency
from meter.bench_workers import run_phase
from meter.traffic import call_hangup, demo_price_list, encode, message_sent
from metering.processor import BatchOutcome
from metering.worker import Connections, connect, run_metering
from ops.reconcile import reconcile

_BASELINE_LUA = """
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'bal', -tonumber(ARGV[i]))
end
return #KEYS
"""


def _say(line: str) -> None:
    print(line, flush=True)


async def _prefill(conns: Connections, n_events: int, accounts: list[str], tag: str = "") -> None:
    """``n_events`` events over ``accounts``; ``tag`` prefixes their ids (another set)."""
    rng = random.Random(11)
    dests = [
        "+14155550123",
        "+442071234567",
        "+447911123456",
        "+4915112345678",
        "+33142685300",
        "+919812345678",
        "+5255123456",
        "+61212345678",
    ]
    futures = []
    for i in range(n_events):
        a = rng.choice(accounts)
        if i % 5 == 0:
            topic, ev = topics.MESSAGE_EVENTS, message_sent(a, f"{tag}m{i}", rng.choice(dests), 1)
        else:
            topic = topics.CALL_EVENTS
            ev = call_hangup(a, f"{tag}c{i}", rng.choice(dests), rng.randint(0, 600))
        futures.append(await conns.producer.send(topic, encode(ev), a.encode()))
        if len(futures) >= 20_000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)


async def _baseline(
    settings: Settings, conns: Connections, n_events: int, meter: CostMeter, costs: dict[str, float]
) -> float:
    """Events/s of the bare loop over the same records; its costs per event into ``costs``
    (``baseline_*``), over the same events as the events/s."""
    await conns.pool.execute(
        "CREATE TABLE IF NOT EXISTS bench_baseline (event_key bytea, account_id text,"
        " amount bigint, event_time timestamptz, source text, event_id text)"
    )
    script = conns.redis.register_script(_BASELINE_LUA)
    consumer = AIOKafkaConsumer(
        *topics.METERED,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"bench-baseline-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=32 << 20,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(settings.kafka_session_timeout_ms // 4, 100),
    )
    await consumer.start()
    done = 0
    first = 0
    start = 0.0
    try:
        while done < n_events:
            data = await consumer.getmany(timeout_ms=50, max_records=settings.batch_max_records)
            if not data:
                continue
            totals: dict[str, int] = {}
            rows = []
            for msgs in data.values():
                for m in msgs:
                    ev = orjson.loads(m.value)
                    a = ev["subject"]
                    totals[a] = totals.get(a, 0) + 1_000
                    rows.append(
                        (
                            ev["id"].encode()[:16].ljust(16, b"\0"),
                            a,
                            -1_000,
                            _parse_time(ev["time"]),
                            ev["source"],
                            ev["id"],
                        )
                    )
            await script(keys=["bench:{a:" + a + "}" for a in totals], args=list(totals.values()))
            await conns.pool.copy_records_to_table("bench_baseline", records=rows)
            await consumer.commit({tp: msgs[-1].offset + 1 for tp, msgs in data.items()})
            done += len(rows)
            if not first:  # timed from the end of the first batch, as the hot path is
                first, start = done, time.perf_counter()
                await meter.start()
        end = time.perf_counter()
        costs.update(await meter.per_event(done - first, "baseline_"))
    finally:
        await consumer.stop()
    return (done - first) / (end - start)


def _parse_time(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text)


async def _metering(
    settings: Settings, conns: Connections, n_events: int, meter: CostMeter, costs: dict[str, float]
) -> tuple[float, int]:
    """Events/s of the real worker. Like the baseline, timed from the end of its first batch
    (group join, the catalog's read-ahead and warm-up excluded), counting the records after
    it; its costs per event into ``costs``, over the same records."""
    s = dataclasses.replace(settings, consumer_group=f"bench-metering-{uuid.uuid4().hex[:6]}")
    seen = 0
    charged = 0
    first = 0
    start = 0.0
    finished = asyncio.Event()
    stop = asyncio.Event()
    started: asyncio.Future[None] | None = None

    def on_batch(o: BatchOutcome) -> None:
        nonlocal seen, charged, start, first, started
        if not first:
            first, start = o.records, time.perf_counter()
            started = asyncio.ensure_future(meter.start())
        seen += o.records
        charged += o.charged
        if seen >= n_events:
            finished.set()

    task = asyncio.create_task(run_metering(s, stop, on_batch=on_batch, conns=conns))
    await finished.wait()
    end = time.perf_counter()
    assert started is not None  # set with the first batch, before finished
    await started
    costs.update(await meter.per_event(seen - first))
    stop.set()
    await task
    return (seen - first) / (end - start), charged


def _stage_breakdown() -> dict[str, float]:
    out = {}
    for metric in metrics.STAGE_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                out[sample.labels["stage"]] = round(sample.value, 3)
    return out


#: the tables one account costs at creation: its row and its opening ledger row
_ACCOUNT_TABLES = ("accounts", "ledger")


async def _pg_bytes(conns: Connections, tables: tuple[str, ...]) -> int:
    """pg_total_relation_size (heap, TOAST, indexes) of ``tables``, summed."""
    return int(
        await conns.pool.fetchval(
            "SELECT sum(pg_total_relation_size(t::regclass))::bigint FROM unnest($1::text[]) t",
            list(tables),
        )
    )


async def _create(conns: Connections, n_accounts: int, chunk: int = 10_000) -> list[str]:
    """``n_accounts`` accounts through ``create_accounts`` (a chunk per transaction)."""
    ids = [f"acc_{i:07d}" for i in range(n_accounts)]
    for i in range(0, n_accounts, chunk):
        specs = [
            AccountSpec.model_validate(
                {"id": a, "price_list_id": "standard", "balance": "1000000.00"}
            )
            for a in ids[i : i + chunk]
        ]
        await create_accounts(conns.pool, conns.balances, specs)
    return ids


async def _memory_usage(conns: Connections, ids: list[str], sample: int = 1_000) -> float:
    """Mean ``MEMORY USAGE`` (bytes, all of the value sampled) of the account hash of up to
    ``sample`` accounts spread over ``ids``."""
    picked = ids[:: max(len(ids) // sample, 1)][:sample]
    sizes = [await conns.redis.memory_usage(keys.account(a), samples=0) for a in picked]
    return sum(int(n or 0) for n in sizes) / max(len(picked), 1)


async def run_bench(
    settings: Settings,
    n_events: int,
    n_accounts: int,
    out: Path | None,
    *,
    rebuild: bool = False,
    workers: int = 1,
) -> int:
    """The bench (module docstring). ``rebuild``: then flush the bench's own Redis and time
    rebuilding every account from the ledger. ``workers`` > 1: instead of the baseline and the
    in-process hot path, one worker process, then ``workers`` (``meter.bench_workers``)."""
    if rebuild and settings.redis_url:
        _say("bench metering --rebuild flushes its Redis: the embedded one only")
        return 2
    settings = dataclasses.replace(settings, kafka_session_timeout_ms=3_000)
    root = Path(settings.data_dir) / f"bench-{int(time.time())}"
    ok = True
    async with running_stack(settings, root) as s, connect(s) as conns:
        await put_price_list(conns.pool, demo_price_list())
        info0 = await conns.redis.info("memory")
        pg0 = await _pg_bytes(conns, _ACCOUNT_TABLES)
        t = time.perf_counter()
        ids = await _create(conns, n_accounts)
        create_s = time.perf_counter() - t
        info1 = await conns.redis.info("memory")
        pg1 = await _pg_bytes(conns, _ACCOUNT_TABLES)
        per_account_bytes = (info1["used_memory"] - info0["used_memory"]) / n_accounts
        sampled_bytes = await _memory_usage(conns, ids)
        pg_per_account = (pg1 - pg0) / n_accounts
        _say(
            f"bench metering: {n_events} events over {n_accounts} accounts, "
            f"batches of up to {s.batch_max_records}"
        )
        _say(
            f"  created {n_accounts} accounts in {create_s:.1f} s; per account: Redis "
            f"{per_account_bytes:.0f} bytes (used_memory), {sampled_bytes:.0f} bytes (MEMORY "
            f"USAGE of its hash, sampled), PostgreSQL {pg_per_account:.0f} bytes (accounts + "
            f"ledger, pg_total_relation_size)"
        )
        t = time.perf_counter()
        await _prefill(conns, n_events, ids)
        _say(f"  pre-filled the topics in {time.perf_counter() - t:.1f} s")
        figures: dict[str, Any] = {
            "events": n_events,
            "accounts": n_accounts,
            "create_accounts_s": round(create_s, 2),
            "redis_bytes_per_account": round(per_account_bytes),
            "redis_memory_usage_per_account": round(sampled_bytes),
            "pg_bytes_per_account": round(pg_per_account),
        }
        ledger0 = await _pg_bytes(conns, ("ledger",))
        if workers > 1:
            charged = await _workers(s, conns, n_events, ids, workers, root, figures)
        else:
            charged = await _in_process(s, conns, n_events, info1, figures)
            hold = await hold_latency(s, conns, ids, worker_log=root / "hold-worker.log")
            _say(
                f"  credit exhausted -> account.hold on the topic, at {hold['hold_load_eps']:,}"
                f" events/s: p50 {hold['hold_latency_ms_p50']} ms, p99"
                f" {hold['hold_latency_ms_p99']} ms, max {hold['hold_latency_ms_max']} ms"
                f" ({hold['hold_probes_seen']} of {hold['hold_probes_sent']} probes; target p99"
                f" <= 100 ms)"
            )
            figures |= hold
            # The same at a tenth of the load: what a hold takes when the worker is not near its
            # capacity (the figure above is mostly queueing where 10,000 events/s is most of it).
            light = await hold_latency(
                s, conns, ids, rate=1_000, worker_log=root / "hold-light-worker.log"
            )
            _say(
                f"  the same at {light['hold_load_eps']:,} events/s: p50"
                f" {light['hold_latency_ms_p50']} ms, p99 {light['hold_latency_ms_p99']} ms, max"
                f" {light['hold_latency_ms_max']} ms ({light['hold_probes_seen']} of"
                f" {light['hold_probes_sent']} probes)"
            )
            figures |= {
                "hold_light_" + k.removeprefix("hold_"): v
                for k, v in light.items()
                if k != "hold_worker"
            }
        ledger1 = await _pg_bytes(conns, ("ledger",))
        figures["pg_ledger_bytes_per_event"] = round((ledger1 - ledger0) / max(charged, 1))
        _say(
            f"  PostgreSQL: the ledger grew {figures['pg_ledger_bytes_per_event']} bytes per "
            f"charged event (rows and indexes)"
        )
        rec = await reconcile(conns.pool, conns.balances)
        _say(f"  reconciliation: {rec.accounts} accounts, drift {rec.drift_micros}")
        figures["charged"] = charged
        figures["drift"] = rec.drift_micros
        ok = rec.ok and charged == n_events * (2 if workers > 1 else 1)
        if rebuild:
            ok = await _rebuild(conns, figures) and ok
        if out:
            await asyncio.to_thread(out.write_text, json.dumps(figures, indent=2) + "\n")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


async def _in_process(
    s: Settings, conns: Connections, n_events: int, info1: dict[str, Any], figures: dict[str, Any]
) -> int:
    """The baseline loop, then the real hot path in this process, on the pre-filled topics;
    each one's costs per event (``meter.bench_costs``)."""
    meter = CostMeter(conns.redis, conns.pool)
    base_costs: dict[str, float] = {}
    baseline = await _baseline(s, conns, n_events, meter, base_costs)
    _say(f"  baseline loop (decode -> one Lua -> COPY -> commit): {baseline:>10,.0f} events/s")
    costs: dict[str, float] = {}
    hot, charged = await _metering(s, conns, n_events, meter, costs)
    _say(f"  metering hot path (run_metering):                   {hot:>10,.0f} events/s")
    _say(f"  per event, hot path: {_costs_line(costs, '')}")
    _say(f"  per event, baseline: {_costs_line(base_costs, 'baseline_')}")
    ratio = hot / baseline
    _say(
        f"  ratio hot path / baseline: {ratio:.2f}  (target >= 0.80; absolute target "
        f">= 100,000 events/s)"
    )
    info2 = await conns.redis.info("memory")
    per_event_bytes = (info2["used_memory"] - info1["used_memory"]) / max(charged, 1)
    _say(f"  Redis memory: {per_event_bytes:.0f} bytes per applied-event id (kept {2}+ days)")
    _say(f"  stage seconds (sum): {_stage_breakdown()}")
    figures |= {
        "baseline_eps": round(baseline),
        "metering_eps": round(hot),
        "ratio": round(ratio, 3),
        "redis_bytes_per_event_id": round(per_event_bytes),
        "stages_s": _stage_breakdown(),
        **costs,
        **base_costs,
    }
    return charged


def _costs_line(costs: dict[str, float], prefix: str) -> str:
    names = {
        "python_cpu_us": "Python {} us",
        "redis_script_us": "Redis scripts {} us",
        "redis_cpu_us": "Redis CPU {} us",
        "redis_commands": "{} Redis commands",
        "pg_cpu_us": "PostgreSQL CPU {} us",
        "pg_wal_bytes": "WAL {} bytes",
    }
    return ", ".join(
        text.format(costs[f"{prefix}{k}_per_event"])
        for k, text in names.items()
        if f"{prefix}{k}_per_event" in costs
    )


async def _workers(
    s: Settings,
    conns: Connections,
    n_events: int,
    ids: list[str],
    workers: int,
    root: Path,
    figures: dict[str, Any],
) -> int:
    """One worker process on the pre-filled events, then ``workers`` on as many fresh ones."""
    group = f"bench-workers-{uuid.uuid4().hex[:6]}"
    log = root / "workers.log"
    one = await run_phase(s, conns, group, 1, n_events, log)
    _say(f"  1 worker process:  {one.eps:>10,.0f} events/s")
    await _prefill(conns, n_events, ids, tag="w")
    many = await run_phase(s, conns, group, workers, n_events, log)
    _say(
        f"  {workers} worker processes: {many.eps:>10,.0f} events/s aggregate "
        f"({many.eps / one.eps:.2f}x one)"
    )
    figures |= {
        "workers": workers,
        "one_worker_eps": round(one.eps),
        "workers_eps": round(many.eps),
        "workers_speedup": round(many.eps / one.eps, 3),
    }
    return int(
        await conns.pool.fetchval("SELECT count(*) FROM ledger WHERE kind IN ('call', 'sms')")
    )


async def _rebuild(conns: Connections, figures: dict[str, Any]) -> bool:
    """FLUSHALL the bench's own Redis, rebuild every account from the ledger, reconcile."""
    await conns.redis.flushall()
    t = time.perf_counter()
    loaded = await rebuild_redis(conns.pool, conns.balances)
    took = time.perf_counter() - t
    rec = await reconcile(conns.pool, conns.balances)
    _say(
        f"  rebuilt {loaded} accounts from the ledger after FLUSHALL in {took:.1f} s "
        f"({loaded / took:,.0f}/s; target <= 30 s at 1M); then drift {rec.drift_micros}, "
        f"missing {rec.missing}"
    )
    figures |= {
        "rebuild_s": round(took, 2),
        "rebuild_accounts": loaded,
        "rebuild_accounts_per_s": round(loaded / took),
        "rebuild_drift": rec.drift_micros,
        "rebuild_missing": rec.missing,
    }
    return rec.ok and rec.missing == 0 and loaded == figures["accounts"]
