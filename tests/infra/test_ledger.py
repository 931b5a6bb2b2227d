"""The book of record and reconciliation: append-only, drift measured, old events checked."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import orjson
import pytest

from balance import keys
from contracts import topics
from infra import metrics
from infra.ledger import PostgresLedger
from meter.traffic import call_hangup
from metering.processor import MeteringProcessor
from metering.publish import KafkaSignalPublisher
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests import harness
from tests.conftest import Seeder
from tests.helpers import Rec, expected_cost


async def test_ledger_is_append_only(conns: Connections, seed: Seeder) -> None:
    await seed("acc_1")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conns.pool.execute("UPDATE ledger SET amount = 0")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conns.pool.execute("DELETE FROM ledger")


async def test_reconciler_measures_and_exports_drift(conns: Connections, seed: Seeder) -> None:
    await seed("acc_1", "acc_2", balance="10.00")
    ok = await reconcile(conns.pool, conns.balances)
    assert ok.ok and ok.accounts == 2 and ok.drift_micros == 0
    assert metrics.RECONCILE_DRIFT._value.get() == 0
    await conns.redis.hincrby(keys.account("acc_2"), "bal", -1234)  # Redis drifts
    bad = await reconcile(conns.pool, conns.balances)
    assert not bad.ok
    assert bad.mismatched == {"acc_2": (10_000_000 - 1234, 10_000_000)}
    assert bad.drift_micros == 1234
    assert metrics.RECONCILE_DRIFT._value.get() == 1234
    assert metrics.RECONCILE_DRIFT_ACCOUNTS._value.get() == 1


def processor(conns: Connections, catalog: Catalog, clock: Any) -> MeteringProcessor:
    return harness.processor(conns, catalog, clock=clock)


async def test_events_older_than_redis_memory_are_checked_in_the_ledger(
    conns: Connections, seed: Seeder
) -> None:
    """Redis keeps an event's memory two days past its day; a replay later than that must
    find the event in the ledger instead, or it would be charged twice."""
    await seed("acc_1", balance="10.00")
    ev = call_hangup("acc_1", "c1", "+442071234567", 61)
    rec = Rec(topics.CALL_EVENTS, 0, 0, b"acc_1", orjson.dumps(ev))
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    out = await processor(conns, catalog, time.time).process([rec])
    assert out.charged == 1
    # Three days later Redis has dropped that day's memory.
    for k in await conns.redis.keys(keys.tag("acc_1") + ":ev:*"):
        await conns.redis.delete(k)
    later = processor(conns, catalog, lambda: time.time() + 3 * 86_400)
    out = await later.process([rec])
    assert (out.charged, out.duplicates) == (0, 1)
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 10_000_000 - expected_cost(ev)
    assert (await reconcile(conns.pool, conns.balances)).ok


class SignalsDown:
    """A producer whose control-signal sends fail: the process 'dies' before publishing."""

    def __init__(self, real: Any) -> None:
        self._real = real

    async def send(self, topic: str, value: Any = None, key: Any = None, **kw: Any) -> Any:
        if topic == topics.CONTROL_SIGNALS:
            raise ConnectionResetError("simulated crash before the signal is published")
        return await self._real.send(topic, value, key, **kw)


async def test_a_state_change_is_published_after_a_crash_before_its_publish(
    settings: Any, conns: Connections, seed: Seeder
) -> None:
    from infra.kafkatools import read_all

    await seed("acc_1", balance="0.05")
    events = [call_hangup("acc_1", f"c{i}", "+442071234567", 60) for i in range(10)]
    recs = [Rec(topics.CALL_EVENTS, 0, i, b"acc_1", orjson.dumps(e)) for i, e in enumerate(events)]
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    async def rebuild(ids: Any) -> list[str]:
        return []

    crashing = MeteringProcessor(
        balances=conns.balances,
        ledger=PostgresLedger(conns.pool),
        catalog=catalog,
        publisher=KafkaSignalPublisher(SignalsDown(conns.producer)),
        rebuild=rebuild,
    )
    with pytest.raises(ConnectionResetError):
        await crashing.process(recs)
    st = await conns.balances.get("acc_1")
    assert st is not None and st.status == "hold"  # the state changed, nothing was published
    assert [s.type for s in await conns.balances.pending_outbox("acc_1")] == ["account.hold"]

    restarted = processor(conns, catalog, time.time)
    out = await restarted.process(recs)  # the replay: every event a duplicate
    assert (out.charged, out.duplicates) == (0, 10)
    signals = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, expect=1)
    ]
    assert [(s["type"], s["data"]["seq"]) for s in signals] == [("account.hold", 1)]
    assert await conns.balances.pending_outbox("acc_1") == []
