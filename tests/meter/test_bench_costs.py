"""``meter bench metering``'s per-event costs read what each server spent, not a guess."""

from __future__ import annotations

from meter.bench_costs import CostMeter
from metering.worker import Connections


async def test_costs_per_event_count_what_redis_and_postgresql_did(conns: Connections) -> None:
    meter = CostMeter(conns.redis, conns.pool)
    await meter.start()
    script = conns.redis.register_script(
        "for i = 1, 2000 do redis.call('SET', KEYS[1], i) end return 1"
    )
    await conns.pool.execute("CREATE TABLE IF NOT EXISTS cost_probe (x bigint)")
    for _ in range(10):
        await script(keys=["cost-probe"])
        await conns.pool.execute("INSERT INTO cost_probe SELECT g FROM generate_series(1, 20000) g")
    costs = await meter.per_event(10)
    # 2,000 commands per "event" inside the scripts, and their server time
    assert 2_000 <= costs["redis_commands_per_event"] < 2_100
    assert costs["redis_script_us_per_event"] > 0
    assert costs["redis_cpu_us_per_event"] > 0
    # the session's PostgreSQL is on this machine: its processes' CPU and its WAL are read
    assert costs["pg_cpu_us_per_event"] > 0
    assert costs["pg_wal_bytes_per_event"] > 20_000 * 8
    assert costs["python_cpu_us_per_event"] >= 0
    assert set(await meter.per_event(1, "x_")) == {"x_" + k for k in costs}
