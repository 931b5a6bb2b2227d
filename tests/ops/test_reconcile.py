"""Reconciliation after Redis lost accounts: the accounts not rebuilt yet are counted apart,
never as drift, so the drift alert and ``meter reconcile``'s exit code stay for money that is
wrong. Against the real Redis and PostgreSQL, and the CLI as a process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import REGISTRY

from balance import keys
from balance.accounts import load_into_redis
from contracts import topics
from infra.ledger import PostgresLedger
from infra.settings import Settings
from meter.traffic import call_hangup
from metering.worker import Connections, build_processor
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests.conftest import Seeder
from tests.helpers import Rec

ROOT = Path(__file__).resolve().parents[2]
UK = "+442071234567"
IDS = [f"acc_{i}" for i in range(6)]


def sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def accounts_with_usage(settings: Settings, conns: Connections, seed: Seeder) -> None:
    """Accounts with an opening credit and a charged call each in the ledger, Redis agreeing."""
    await seed(*IDS, balance="10.00")
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    events = [call_hangup(a, f"c{i}", UK, 61) for i, a in enumerate(IDS)]
    recs = [
        Rec(topics.CALL_EVENTS, 0, i, e["subject"].encode(), orjson.dumps(e))
        for i, e in enumerate(events)
    ]
    out = await build_processor(settings, conns, catalog).process(recs)
    assert out.charged == len(IDS)
    assert (await reconcile(conns.pool, conns.balances)).ok


async def meter_reconcile(settings: Settings) -> tuple[int, dict[str, Any]]:
    """``meter reconcile`` run as operations run it: its exit code and its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env |= {"METER_REDIS_URL": settings.redis_url, "METER_DATABASE_URL": settings.database_url}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meter.cli", "reconcile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode in (0, 1), done.stderr.decode()[-2000:]
    return done.returncode, orjson.loads(done.stdout)


async def test_accounts_redis_lost_are_missing_not_drift_and_meter_reconcile_exits_0(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await accounts_with_usage(settings, conns, seed)
    await conns.redis.flushall()  # Redis lost everything; nothing has been rebuilt yet

    drained = await reconcile(conns.pool, conns.balances)
    assert drained.ok
    assert (drained.accounts, drained.missing) == (len(IDS), len(IDS))
    assert (drained.drift_micros, drained.mismatched, drained.unsettled) == (0, {}, 0)
    assert sample("meter_reconcile_drift_micros") == 0
    assert sample("meter_reconcile_drift_accounts") == 0
    assert sample("meter_reconcile_missing_accounts") == len(IDS)

    # The live reconciliation of `meter run ops` neither re-reads them nor calls them unsettled.
    live = await reconcile(conns.pool, conns.balances, recheck_after_s=0.01)
    assert live.ok and (live.missing, live.drift_micros, live.unsettled) == (len(IDS), 0, 0)

    code, printed = await meter_reconcile(settings)
    assert code == 0
    assert printed["missing_accounts"] == len(IDS)
    assert (printed["drift_micros"], printed["drift_accounts"], printed["mismatched"]) == (0, 0, {})

    # Rebuilt (as their next event or authorization does), they are neither missing nor drift.
    assert sorted(await load_into_redis(conns.pool, conns.balances, IDS)) == IDS
    again = await reconcile(conns.pool, conns.balances)
    assert again.ok and (again.missing, again.drift_micros) == (0, 0)
    assert sample("meter_reconcile_missing_accounts") == 0


async def test_a_rebuilt_account_that_drifts_is_drift_beside_the_missing_ones(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await accounts_with_usage(settings, conns, seed)
    await conns.redis.flushall()
    assert await load_into_redis(conns.pool, conns.balances, ["acc_0"]) == ["acc_0"]
    await conns.redis.hincrby(keys.account("acc_0"), "bal", 777)  # Redis lost a debit
    ledger = (await PostgresLedger(conns.pool).balances(["acc_0"]))["acc_0"]

    rec = await reconcile(conns.pool, conns.balances)
    assert not rec.ok
    assert rec.mismatched == {"acc_0": (ledger + 777, ledger)}
    assert (rec.drift_micros, rec.missing) == (777, len(IDS) - 1)
    assert sample("meter_reconcile_drift_micros") == 777
    assert sample("meter_reconcile_drift_accounts") == 1
    assert sample("meter_reconcile_missing_accounts") == len(IDS) - 1

    code, printed = await meter_reconcile(settings)
    assert code == 1
    assert (printed["drift_micros"], printed["missing_accounts"]) == (777, len(IDS) - 1)
    assert printed["mismatched"] == {"acc_0": {"redis": ledger + 777, "ledger": ledger}}


async def test_an_account_deleted_between_re_reads_is_missing_not_drift_or_unsettled(
    conns: Connections, seed: Seeder
) -> None:
    """The runbook's fix for drift is ``DEL {a:ID}``; done while a live reconciliation
    re-reads, that account is then missing (its next event rebuilds it), not drift."""
    await seed("acc_fixed", "acc_ok", balance="10.00")
    await conns.redis.hincrby(keys.account("acc_fixed"), "bal", 500)

    async def operator_deletes_it() -> None:
        await asyncio.sleep(0.01)
        await conns.redis.delete(keys.account("acc_fixed"))

    task = asyncio.create_task(operator_deletes_it())
    live = await reconcile(conns.pool, conns.balances, recheck_after_s=0.05)
    await task
    assert live.ok
    assert (live.missing, live.drift_micros, live.unsettled) == (1, 0, 0)
