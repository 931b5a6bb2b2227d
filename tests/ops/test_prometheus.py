"""A real Prometheus scrapes the running service on loopback and finds every metric operations
reads; it loads the project's alert rules, evaluates them without error and without firing on a
healthy service, and accepts every query of the Grafana dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client import REGISTRY, start_http_server

from contracts import topics
from infra.settings import Settings
from meter.traffic import call_hangup
from metering.worker import Connections
from ops.collector import running_collector
from tests import harness
from tests.conftest import Seeder, eventually
from tests.helpers import produce, require_binary
from tests.ops.test_ops import free_port

ROOT = Path(__file__).resolve().parents[2]
UK = "+442071234567"  # 0.015 per started minute in the demo price list


def http_get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def spawn_prometheus(
    binary: str, tmp_path: Path, port: int, metrics_port: int
) -> subprocess.Popen[bytes]:
    """Prometheus on loopback ``port``, scraping ``metrics_port`` every second and evaluating the
    project's alert rules every second."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "meter-metering",  # the production job name, so the rules match
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as out:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/-/ready", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextlib.asynccontextmanager
async def prometheus_server(tmp_path: Path, metrics_port: int) -> AsyncIterator[str]:
    """A real Prometheus (see ``spawn_prometheus``) until the block ends; yields its base URL."""
    port = free_port()
    proc = spawn_prometheus(require_binary("prometheus"), tmp_path, port, metrics_port)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    try:
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(ready, base):
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector of ``promql``; a query Prometheus rejects fails the test."""
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        answer = http_get(url)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{promql!r}: {exc.read().decode()}") from None
    assert answer["status"] == "success", (promql, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


#: Counters this test moves, as (name, labels, by at least): the registry is the process's, so
#: other tests may have moved them before; Prometheus must see this test's share on top.
MOVED: list[tuple[str, dict[str, str], int]] = [
    ("meter_events_consumed_total", {"topic": "telephony.call-events"}, 17),
    ("meter_events_charged_total", {"type": "call.hangup"}, 16),
    ("meter_dead_letters_total", {"reason": "not_json"}, 1),
    ("meter_batch_records_count", {}, 1),
    ("meter_batch_duration_seconds_count", {}, 1),
    ("meter_signals_published_total", {"type": "account.hold"}, 1),
    ("meter_redis_command_duration_seconds_count", {}, 1),
    ("meter_postgres_query_duration_seconds_count", {}, 1),
]
#: Everything else issue 6 names, as PromQL -> the least value of its summed result.
PRESENT = {
    'up{job="meter-metering"}': 1,
    "meter_batch_duration_seconds_bucket": 0,
    "meter_consumer_lag_records": 0,
    "meter_authorize_duration_seconds_count": 0,
    "meter_authorize_decisions_total": 0,
    "meter_reservations_live": 0,
    'meter_accounts{state="hold"}': 1,  # acc_dry, counted in this test's Redis
    'meter_accounts{state="active"}': 1,
    "meter_recharges_total": 0,
    "meter_recharge_cap_hits_total": 0,
    "meter_reconcile_drift_micros": 0,
    "meter_ops_last_success_timestamp_seconds": 1,
}


def selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}" if inner else name


def local_total(name: str, labels: dict[str, str]) -> float:
    """This process's current value of ``selector(name, labels)``, summed over other labels."""
    return sum(
        s.value
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_prometheus_scrapes_the_running_service(
    settings: Settings, conns: Connections, seed: Seeder, tmp_path: Path
) -> None:
    require_binary("prometheus")  # before any set-up: skip or fail at once
    await seed("acc_rich", balance="100.00")
    await seed("acc_dry", balance="0.05", low="0.02")  # runs dry after 4 one-minute calls
    events: list[dict[str, Any] | bytes] = [
        call_hangup(a, f"{a}-{i}", UK, 60) for i in range(8) for a in ("acc_rich", "acc_dry")
    ]
    await produce(conns.producer, topics.CALL_EVENTS, events)
    await produce(conns.producer, topics.CALL_EVENTS, [b"{not json"], key=b"acc_rich")

    expected = {
        selector(name, labels): local_total(name, labels) + by for name, labels, by in MOVED
    }
    expected.update(PRESENT)
    metrics_port = free_port()
    server, thread = start_http_server(metrics_port, addr="127.0.0.1")
    fast = replace(
        settings,
        ops_lag_interval_s=0.5,
        ops_accounts_interval_s=0.5,
        ops_reconcile_interval_s=0.5,
    )
    stop_ops = asyncio.Event()
    try:
        async with (
            harness.running_worker(settings, conns) as outcomes,
            running_collector(fast, recheck_after_s=0.1) as ops,
        ):
            ops_task = asyncio.create_task(ops.run(stop_ops))

            async def all_consumed() -> bool:
                return sum(o.records for o in outcomes) >= len(events) + 1

            await eventually(all_consumed)
            async with prometheus_server(tmp_path, metrics_port) as base:
                missing: dict[str, str] = {}

                async def everything_scraped() -> bool:
                    missing.clear()
                    for promql, least in expected.items():
                        result = await asyncio.to_thread(query, base, promql)
                        total = sum(float(s["value"][1]) for s in result)
                        if not result or total < least:
                            missing[promql] = f"{total} < {least}" if result else "absent"
                    return not missing

                try:
                    await eventually(everything_scraped, within=30, interval=0.5)
                except AssertionError:
                    raise AssertionError(f"not seen by Prometheus: {missing}") from None
                drift = await asyncio.to_thread(query, base, "meter_reconcile_drift_micros")
                assert [s["value"][1] for s in drift] == ["0"]

                await check_rules_evaluate_and_stay_quiet(base)
                await asyncio.to_thread(check_dashboard_queries, base)
            stop_ops.set()
            await asyncio.wait_for(ops_task, 10)
    finally:
        stop_ops.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


async def check_rules_evaluate_and_stay_quiet(base: str) -> None:
    """Every rule of alerts.yml loaded, evaluated without error, and none active."""
    state: dict[str, Any] = {}

    async def evaluated() -> bool:
        rules = await asyncio.to_thread(http_get, base + "/api/v1/rules")
        groups = rules["data"]["groups"]
        state["rules"] = [r for g in groups for r in g["rules"]]
        alerts = await asyncio.to_thread(http_get, base + "/api/v1/alerts")
        state["alerts"] = alerts["data"]["alerts"]
        return (
            bool(state["rules"])
            and all(r.get("lastEvaluation", "").startswith("20") for r in state["rules"])
            and not state["alerts"]
        )

    try:
        await eventually(evaluated, within=15, interval=0.5)
    except AssertionError:
        raise AssertionError(orjson.dumps(state).decode()[:3000]) from None
    names = {r["name"] for r in state["rules"]}
    assert "MeterBalanceDrift" in names and "MeterConsumerLagGrowing" in names
    for rule in state["rules"]:
        assert rule["health"] == "ok", rule


def check_dashboard_queries(base: str) -> None:
    """Every panel query parses and runs (Grafana's $__rate_interval as Prometheus sees it)."""
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "meter.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        query(base, expr.replace("$__rate_interval", "1m"))
