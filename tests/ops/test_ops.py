"""``meter run ops`` and the instrumentation of Redis and PostgreSQL, against the real broker,
Redis and PostgreSQL: consumer lag, accounts by state, live reconciliation, call latencies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from balance import keys
from contracts import topics
from infra import metrics
from infra.db import create_pool
from infra.instrument import instrumented_redis, redis_timer, sql_op
from infra.settings import Settings
from meter.traffic import call_hangup
from metering.worker import Connections
from ops.collector import OpsCollector, count_accounts, running_collector
from ops.reconcile import reconcile
from tests.conftest import Seeder, eventually
from tests.helpers import produce

ROOT = Path(__file__).resolve().parents[2]
UK = "+442071234567"


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def lag_gauges(group: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in metrics.CONSUMER_LAG.collect():
        for s in family.samples:
            if s.labels["group"] == group:
                out[(s.labels["topic"], s.labels["partition"])] = s.value
    return out


async def test_lag_counts_what_the_group_has_not_committed_and_drops_to_zero(
    settings: Settings, conns: Connections
) -> None:
    events = [call_hangup(f"acc_{i % 8}", f"c{i}", UK, 60) for i in range(200)]
    await produce(conns.producer, topics.CALL_EVENTS, events)
    async with running_collector(settings) as ops:
        before = await ops.collect_lag()
        assert {tp.topic for tp in before} == set(topics.METERED)
        assert len(before) == 4 * len(topics.METERED)  # 4 partitions per topic in the test broker
        # Tansu reports the last batch's base offset + 1 as the end offset, so before anything
        # is committed a partition with data shows at least 1 (a real broker: its record count).
        with_data = {tp for tp, n in before.items() if n > 0}
        assert with_data and all(tp.topic == topics.CALL_EVENTS for tp in with_data)
        assert lag_gauges(settings.consumer_group) == {
            (tp.topic, str(tp.partition)): float(n) for tp, n in before.items()
        }

        # A member of the group consumes everything and commits, as a worker does.
        member = AIOKafkaConsumer(
            *topics.METERED,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=2_000,
            heartbeat_interval_ms=500,
        )
        await member.start()
        try:
            seen = 0
            deadline = time.monotonic() + 30
            while seen < len(events) and time.monotonic() < deadline:
                batch = await member.getmany(timeout_ms=200)
                seen += sum(len(v) for v in batch.values())
                if batch:
                    await member.commit({tp: m[-1].offset + 1 for tp, m in batch.items()})
            assert seen == len(events)
        finally:
            await member.stop()
        after = await ops.collect_lag()
        assert set(after) == set(before)
        # Committed beyond Tansu's understated end offset: clamped at 0, never negative.
        assert all(n == 0 for n in after.values()), after
        assert set(lag_gauges(settings.consumer_group).values()) == {0.0}


async def test_accounts_are_counted_by_state_from_their_hashes_only(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_a", "acc_b", "acc_c", "acc_d", balance="10.00")
    r = conns.redis
    await r.hset(keys.account("acc_b"), "st", "hold")
    await r.hset(keys.account("acc_c"), "st", "hold")
    await r.hset(keys.account("acc_d"), "st", "suspended")
    # An account's other keys are not accounts.
    await r.hset(keys.credits("acc_a"), "x", 1)
    await r.hset(keys.applied("acc_a", 20_000), "k", "1|f")
    await r.rpush(keys.outbox("acc_b"), "1|account.hold|credit_exhausted")
    await r.hset(keys.reservations("acc_a"), "call-1", "1")
    await r.zadd(keys.RESERVATION_EXPIRY, {"acc_a\x00call-1": 1, "acc_b\x00call-2": 2})
    async with running_collector(settings) as ops:
        counts = await ops.collect_accounts()
    assert counts == {"active": 1, "low": 0, "hold": 2, "suspended": 1}
    assert sample("meter_accounts", state="hold") == 2
    assert sample("meter_accounts", state="low") == 0
    assert sample("meter_reservations_live") == 2


async def test_counting_accounts_is_cheap_at_a_few_thousand(redis_url: str) -> None:
    r = instrumented_redis(redis_url)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(5_000):
            state = "low" if i % 10 else "hold"
            pipe.hset(keys.account(f"acc_{i}"), mapping={"bal": 1, "st": state})
            pipe.hset(keys.applied(f"acc_{i}", 20_000), "k", "1|f")  # twice the keys to walk
        await pipe.execute()
        t0 = time.perf_counter()
        counts = await count_accounts(r)
        elapsed = time.perf_counter() - t0
    finally:
        await r.aclose()
    assert counts["low"] == 4_500 and counts["hold"] == 500
    # About ten SCAN steps and pipelines for 10k keys: well under a second here.
    assert elapsed < 2.0, elapsed


async def test_live_reconciliation_reports_drift_not_batches_in_flight(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_drift", "acc_settles", "acc_busy", "acc_ok", balance="10.00")
    r = conns.redis
    await r.hincrby(keys.account("acc_drift"), "bal", 500)  # Redis lost a debit: real drift
    await r.hincrby(keys.account("acc_settles"), "bal", -300)  # debited, ledger row in flight
    stop = asyncio.Event()

    async def ledger_lands() -> None:
        # Stands in for the ledger write landing: the difference goes away before the re-read.
        await asyncio.sleep(0.01)
        await r.hincrby(keys.account("acc_settles"), "bal", 300)

    async def busy() -> None:
        while not stop.is_set():  # a new in-flight batch at every read
            await r.hincrby(keys.account("acc_busy"), "bal", -7)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(ledger_lands()), asyncio.create_task(busy())]
    try:
        live = await reconcile(conns.pool, conns.balances, recheck_after_s=0.05, rechecks=3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert live.accounts == 4
    assert live.mismatched == {"acc_drift": (10_000_500, 10_000_000)}
    assert live.drift_micros == 500
    assert live.unsettled == 1  # acc_busy: never the same twice, so not called drift
    assert sample("meter_reconcile_drift_micros") == 500
    assert sample("meter_reconcile_drift_accounts") == 1
    assert sample("meter_reconcile_unsettled_accounts") == 1

    # Without re-reads (a drained pipeline, `meter reconcile`) every difference counts at once.
    drained = await reconcile(conns.pool, conns.balances)
    assert set(drained.mismatched) == {"acc_drift", "acc_busy"} and drained.unsettled == 0


class FailingAccounts(OpsCollector):
    async def _accounts(self) -> None:
        raise ConnectionError("simulated: Redis refused the SCAN")


async def test_collectors_run_on_their_periods_and_one_failing_does_not_stop_the_others(
    settings: Settings,
) -> None:
    from dataclasses import replace

    fast = replace(
        settings, ops_lag_interval_s=0.1, ops_accounts_interval_s=0.1, ops_reconcile_interval_s=0
    )
    errors_before = sample("meter_ops_errors_total", collector="accounts") or 0.0
    async with running_collector(fast) as base:
        ops = FailingAccounts(
            fast,
            pool=base._pool,
            redis=base._redis,
            consumer=base._consumer,
        )
        started = time.time()
        stop = asyncio.Event()
        task = asyncio.create_task(ops.run(stop))
        await asyncio.sleep(0.6)
        stop.set()
        await asyncio.wait_for(task, 10)
    assert sample("meter_ops_interval_seconds", collector="lag") == 0.1
    assert (sample("meter_ops_last_success_timestamp_seconds", collector="lag") or 0) > started
    # The failing one keeps its start time as "last success" and counts its failures.
    accounts_last = sample("meter_ops_last_success_timestamp_seconds", collector="accounts")
    assert accounts_last is not None and accounts_last <= started + 0.05
    errors = (sample("meter_ops_errors_total", collector="accounts") or 0) - errors_before
    assert 3 <= errors <= 8, errors
    assert sample("meter_ops_interval_seconds", collector="reconcile") == 0  # off, and says so


async def test_redis_and_postgres_latency_is_observed_per_command_and_statement(
    redis_url: str, database_url: str
) -> None:
    def count(name: str, **labels: str) -> float:
        return sample(name + "_count", **labels) or 0.0

    before = {
        "ping": count("meter_redis_command_duration_seconds", command="ping"),
        "pipeline": count("meter_redis_command_duration_seconds", command="pipeline"),
        "evalsha": count("meter_redis_command_duration_seconds", command="evalsha"),
        "timer": count("meter_redis_command_duration_seconds", command="lua_batch"),
        "select": count("meter_postgres_query_duration_seconds", op="select"),
        "create": count("meter_postgres_query_duration_seconds", op="create"),
    }
    r = instrumented_redis(redis_url)
    pool = await create_pool(database_url, max_size=2)
    try:
        assert await r.ping()
        pipe = r.pipeline(transaction=False)
        pipe.set("k1", 1).get("k1")
        assert await pipe.execute() == [True, b"1"]
        script = r.register_script("return 1")
        assert await script() == 1  # EVALSHA (after a NOSCRIPT and a SCRIPT LOAD)
        plain = aioredis.Redis.from_url(redis_url)
        with redis_timer("lua_batch"):
            await plain.ping()
        await plain.aclose()
        for _ in range(3):
            assert await pool.fetchval("SELECT 1") == 1
        await pool.execute("CREATE TEMP TABLE t_metrics (x int)")
    finally:
        await r.aclose()
        await pool.close()
    await asyncio.sleep(0)  # asyncpg calls query loggers with call_soon
    redis_calls = "meter_redis_command_duration_seconds"
    assert count(redis_calls, command="ping") == before["ping"] + 1
    assert count(redis_calls, command="pipeline") == before["pipeline"] + 1
    assert count(redis_calls, command="evalsha") >= before["evalsha"] + 1
    assert count(redis_calls, command="lua_batch") == before["timer"] + 1
    assert count("meter_postgres_query_duration_seconds", op="select") >= before["select"] + 3
    assert count("meter_postgres_query_duration_seconds", op="create") == before["create"] + 1


def test_statement_labels_are_bounded() -> None:
    assert sql_op("SELECT 1") == "select"
    assert sql_op("\n  insert into ledger ...") == "insert"
    assert sql_op("(SELECT 1) UNION (SELECT 2)") == "select"
    assert sql_op("WITH x AS (SELECT 1) SELECT * FROM x") == "with"
    assert sql_op("VACUUM ledger") == "other"
    assert sql_op("") == "other"


def start_ops(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "meter.cli", "run", "ops"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_meter_run_ops_serves_metrics_logs_json_and_stops_on_sigterm(
    settings: Settings, conns: Connections, seed: Seeder, tmp_path: Path
) -> None:
    await seed("acc_1", "acc_2")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env.update(
        {
            "METER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "METER_REDIS_URL": settings.redis_url,
            "METER_DATABASE_URL": settings.database_url,
            "METER_CONSUMER_GROUP": settings.consumer_group,
            "METER_METRICS_PORT": str(port),
            "METER_LOG_FORMAT": "json",
            "METER_OPS_LAG_INTERVAL_S": "0.5",
            "METER_OPS_ACCOUNTS_INTERVAL_S": "0.5",
            "METER_OPS_RECONCILE_INTERVAL_S": "0.5",
        }
    )
    log = tmp_path / "ops.log"
    proc = start_ops(env, log)
    try:
        body = ""

        async def scraped() -> bool:
            nonlocal body
            with contextlib.suppress(OSError):
                body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            return (
                'meter_accounts{state="active"} 2.0' in body
                and "meter_consumer_lag_records{" in body
                and 'meter_ops_last_success_timestamp_seconds{collector="reconcile"}' in body
                and "meter_reconcile_drift_micros 0.0" in body
            )

        await eventually(scraped, within=30, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.strip()]
    assert lines, "no log lines"
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    assert any(x["msg"].startswith("ops: lag every 0.5s") for x in lines)


def test_meter_run_ops_refuses_to_watch_embedded_services() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    out = subprocess.run(
        [sys.executable, "-m", "meter.cli", "run", "ops"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "METER_KAFKA_BOOTSTRAP" in out.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        body: bytes = resp.read()
        return body.decode()
