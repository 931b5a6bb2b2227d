"""The bench's hold-latency phase (``meter.bench_hold``) on the real broker, Redis and
PostgreSQL, small: every probe that exhausts its account's credit is seen as an
``account.hold`` on the signals topic, after it was produced, and nothing else counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import Settings
from meter.bench_hold import _percentile, hold_latency
from metering.worker import Connections
from tests.conftest import Seeder


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (_percentile(values, 50), _percentile(values, 99), _percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert _percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("worker", ["in_process", "process"])
async def test_every_probe_is_seen_as_its_accounts_hold(
    settings: Settings, conns: Connections, seed: Seeder, tmp_path: Path, worker: str
) -> None:
    await seed("load_a", "load_b", balance="1000.00")
    out = await hold_latency(
        settings,
        conns,
        ["load_a", "load_b"],
        rate=300,
        seconds=2.0,
        probes_per_s=4.0,
        worker_log=tmp_path / "worker.log" if worker == "process" else None,
    )
    assert out["hold_worker"] == worker
    assert out["hold_probes_sent"] == out["hold_probes_seen"] == 8
    assert (
        0 < out["hold_latency_ms_p50"] <= out["hold_latency_ms_p99"] <= out["hold_latency_ms_max"]
    )
    assert out["hold_load_eps"] > 0
    holds = await conns.pool.fetchval(
        "SELECT count(*) FROM signals WHERE type = 'account.hold' AND account_id LIKE 'probe_%'"
    )
    assert holds == 8  # one per probe, none for the loaded accounts
