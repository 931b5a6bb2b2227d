"""The metering hot path end to end against the real broker, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import typing
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaConnectionError

from balance.values import PendingSignal
from contracts import topics
from infra import metrics
from infra.kafkatools import read_all
from infra.ledger import Ledger, PostgresLedger
from infra.settings import Settings
from meter.traffic import call_hangup, message_sent
from metering.batch import Reason
from metering.processor import BatchOutcome, MeteringProcessor
from metering.publish import Outbox, SignalPublisher, SignalsNotPublished
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests import harness
from tests.conftest import Seeder, eventually
from tests.helpers import Rec, expected_cost, produce

DESTS = ["+14155550123", "+442071234567", "+447911123456", "+33142685300", "+5255123456"]


async def ledger_usage_rows(conns: Connections) -> int:
    n = await conns.pool.fetchval("SELECT count(*) FROM ledger WHERE kind IN ('call', 'sms')")
    return int(n)


def traffic(accounts: list[str], n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = rng.choice(accounts)
        if i % 5 == 0:
            out.append(message_sent(a, f"m{i}", rng.choice(DESTS), rng.randint(1, 3)))
        else:
            out.append(
                call_hangup(a, f"c{i}", rng.choice(DESTS), rng.choice([0, 1, 6, 7, 59, 61, 300]))
            )
    return out


async def test_every_event_published_twice_is_charged_once(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    accounts = [f"acc_{i}" for i in range(6)]
    await seed(*accounts, balance="500.00")
    events = traffic(accounts, 400)
    calls = [e for e in events if e["type"] == "call.hangup"]
    sms = [e for e in events if e["type"] == "message.sent"]
    for _ in range(2):
        await produce(conns.producer, topics.CALL_EVENTS, calls)
        await produce(conns.producer, topics.MESSAGE_EVENTS, sms)
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: _seen(outcomes, 800))
    assert await ledger_usage_rows(conns) == 400
    assert sum(o.charged for o in outcomes) == 400
    assert sum(o.duplicates for o in outcomes) == 400
    for a in accounts:
        cost = sum(expected_cost(e) for e in events if e["subject"] == a)
        st = await conns.balances.get(a)
        assert st is not None and st.balance == 500_000_000 - cost, a
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0


async def _seen(outcomes: list[BatchOutcome], n: int) -> bool:
    return sum(o.records for o in outcomes) >= n


class CrashingLedger(PostgresLedger):
    """The process 'dies' after Redis applied the batch and before the ledger write."""

    async def write_usage(self, fresh: Any, replayed: Any = (), signals: Any = ()) -> set[bytes]:
        raise ConnectionResetError("simulated crash before the ledger write")


async def test_duplicate_applied_in_redis_but_missing_in_ledger_gets_its_row(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    events = [call_hangup("acc_1", f"c{i}", "+442071234567", 61) for i in range(5)]
    records = [
        Rec(topics.CALL_EVENTS, 0, i, b"acc_1", orjson.dumps(e)) for i, e in enumerate(events)
    ]
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    def processor(ledger: Ledger) -> MeteringProcessor:
        return harness.processor(conns, catalog, ledger=ledger)

    with pytest.raises(ConnectionResetError):
        await processor(CrashingLedger(conns.pool)).process(records)
    cost = 5 * expected_cost(events[0])
    assert (await conns.balances.get("acc_1")).balance == 10_000_000 - cost  # type: ignore[union-attr]
    assert await ledger_usage_rows(conns) == 0  # Redis has them, the ledger does not

    out = await processor(PostgresLedger(conns.pool)).process(records)  # the replay after restart
    assert (out.charged, out.duplicates) == (0, 5)
    assert await ledger_usage_rows(conns) == 5
    assert (await conns.balances.get("acc_1")).balance == 10_000_000 - cost  # type: ignore[union-attr]
    amounts = await conns.pool.fetch("SELECT amount FROM ledger WHERE kind = 'call'")
    assert sorted(r["amount"] for r in amounts) == [-expected_cost(events[0])] * 5
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_each_bad_input_is_dead_lettered_and_the_partition_goes_on(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    good = [call_hangup("acc_1", f"g{i}", "+442071234567", 60) for i in range(4)]
    schema = call_hangup("acc_1", "b1", "+442071234567", 60)
    del schema["data"]["to"]
    negative = call_hangup("acc_1", "b2", "+442071234567", -3)
    absurd = call_hangup("acc_1", "b3", "+442071234567", 5_000_000)
    ghost = call_hangup("ghost_1", "b4", "+442071234567", 60)
    conflict = call_hangup("acc_1", "g0", "+442071234567", 600)  # same id as good[0]
    oversized = call_hangup("acc_1", "b5", "+442071234567", 60)
    oversized["blob"] = "z" * 70_000
    no_rate = call_hangup("acc_1", "b6", "+999123456", 60)
    future = call_hangup(
        "acc_1", "b8", "+442071234567", 60, at=datetime.now(UTC) + timedelta(days=1)
    )
    wrong_topic = message_sent("acc_1", "b9", "+442071234567", 1)  # an SMS on the call topic
    unsupported = call_hangup("acc_1", "b10", "+442071234567", 60)
    unsupported["type"] = "call.ringing"
    bad: list[tuple[str, bytes]] = [
        ("not_json", b"{not json"),
        ("schema", orjson.dumps(schema)),
        ("negative_duration", orjson.dumps(negative)),
        ("absurd_duration", orjson.dumps(absurd)),
        ("key_mismatch", orjson.dumps(call_hangup("acc_2", "b7", "+442071234567", 60))),
        ("duplicate_id_different_payload", orjson.dumps(conflict)),
        ("oversized", orjson.dumps(oversized)),
        ("no_rate_for_destination", orjson.dumps(no_rate)),
        ("future_timestamp", orjson.dumps(future)),
        ("wrong_topic", orjson.dumps(wrong_topic)),
        ("unsupported_type", orjson.dumps(unsupported)),
    ]
    # Everything under one key: one partition, bad events between good ones.
    stream: list[dict[str, Any] | bytes] = [good[0]]
    for i, (_, raw) in enumerate(bad):
        stream.append(raw)
        if i % 3 == 2:
            stream.append(good[1 + i // 3])
    stream.append(good[3])
    await produce(conns.producer, topics.CALL_EVENTS, stream, key=b"acc_1")
    await produce(conns.producer, topics.CALL_EVENTS, [ghost])  # keyed by its own account
    bad.append(("unknown_account", orjson.dumps(ghost)))
    stream.append(ghost)

    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: _seen(outcomes, len(stream)))
    dead = await read_all(settings.kafka_bootstrap, topics.DEAD_LETTER, expect=len(bad))
    reasons = sorted(dict(m.headers)["error.reason"].decode() for m in dead)
    assert reasons == sorted(r for r, _ in bad)
    by_reason = {dict(m.headers)["error.reason"].decode(): m for m in dead}
    for reason, raw in bad:
        m = by_reason[reason]
        assert m.value == raw, reason  # copied unchanged
        assert m.key == (b"ghost_1" if reason == "unknown_account" else b"acc_1")  # original key
        assert dict(m.headers)["error.detail"], reason
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 10_000_000 - 4 * expected_cost(good[0])
    assert await ledger_usage_rows(conns) == 4


def test_every_dead_letter_reason_is_one_the_metrics_and_the_readme_know() -> None:
    # A reason added to the Literal alone would count under a label never created at zero.
    assert sorted(typing.get_args(Reason)) == sorted(metrics.DEAD_LETTER_REASONS)


async def test_hold_is_published_once_when_an_account_runs_dry(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    from dataclasses import replace

    # 0.015 per call: low after ~67 calls, dry after ~134, in batches of 17.
    await seed("acc_dry", balance="2.00", low="1.00")
    await seed("acc_rich", balance="100.00")
    burst = [call_hangup("acc_dry", f"c{i}", "+442071234567", 60) for i in range(300)]
    burst += [call_hangup("acc_rich", f"r{i}", "+442071234567", 60) for i in range(50)]
    await produce(conns.producer, topics.CALL_EVENTS, burst)
    small_batches = replace(settings, batch_max_records=17)  # the run-out spans many batches
    async with harness.running_worker(small_batches, conns) as outcomes:
        await eventually(lambda: _seen(outcomes, len(burst)))
    signals = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, idle_s=1.5)
    ]
    dry = [s for s in signals if s["subject"] == "acc_dry"]
    assert [s["type"] for s in dry] == ["account.low_balance", "account.hold"]
    assert [s["data"]["seq"] for s in dry] == [1, 2]
    assert not [s for s in signals if s["subject"] == "acc_rich"]
    assert await conns.balances.pending_outbox("acc_dry") == []  # acknowledged after publish
    rows = await conns.pool.fetch("SELECT seq, type FROM signals WHERE account_id = 'acc_dry'")
    assert sorted((r["seq"], r["type"]) for r in rows) == [
        (1, "account.low_balance"),
        (2, "account.hold"),
    ]


class HoldFirstLedger(PostgresLedger):
    """Writes only once the batch's hold is readable on the signals topic: a processor that
    publishes after its ledger write never gets its write done (the test times out)."""

    def __init__(self, pool: Any, bootstrap: str, account: str) -> None:
        super().__init__(pool)
        self._bootstrap, self._account = bootstrap, account
        self.seen_before_write: list[str] = []

    async def write_usage(self, fresh: Any, replayed: Any = (), signals: Any = ()) -> set[bytes]:
        if signals:
            held = await read_all(self._bootstrap, topics.CONTROL_SIGNALS, expect=1, timeout_s=10)
            self.seen_before_write = [
                orjson.loads(m.value)["type"]
                for m in held
                if orjson.loads(m.value)["subject"] == self._account
            ]
        return await super().write_usage(fresh, replayed, signals)


async def _dry_processor(
    conns: Connections,
    seed: Seeder,
    *,
    ledger: Ledger | None = None,
    publisher: SignalPublisher | None = None,
) -> MeteringProcessor:
    """``acc_dry`` with 0.10 (a 10-minute UK call costs 0.15), and a processor on ``conns``."""
    await seed("acc_dry", balance="0.10")
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    return harness.processor(conns, catalog, ledger=ledger, publisher=publisher)


def _dry_calls(account: str, n: int) -> list[Rec]:
    events = [call_hangup(account, f"c{i}", "+442071234567", 600) for i in range(n)]
    return [
        Rec(topics.CALL_EVENTS, 0, i, account.encode(), orjson.dumps(e))
        for i, e in enumerate(events)
    ]


async def test_a_hold_is_on_the_topic_before_its_batch_is_in_the_ledger(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    # Hold latency (meter bench metering): the signal goes out while the ledger is written,
    # and leaves the outbox only once both are done.
    ledger = HoldFirstLedger(conns.pool, settings.kafka_bootstrap, "acc_dry")
    out = await (await _dry_processor(conns, seed, ledger=ledger)).process(_dry_calls("acc_dry", 1))
    assert ledger.seen_before_write == ["account.hold"]
    assert [(a, s.type) for a, s in out.signals] == [("acc_dry", "account.hold")]
    assert await conns.balances.pending_outbox("acc_dry") == []
    rows = await conns.pool.fetch("SELECT seq, type FROM signals WHERE account_id = 'acc_dry'")
    assert [(r["seq"], r["type"]) for r in rows] == [(1, "account.hold")]


async def test_signals_sent_before_a_failed_ledger_write_stay_in_the_outbox_until_logged(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    records = _dry_calls("acc_dry", 1)
    processor = await _dry_processor(conns, seed, ledger=CrashingLedger(conns.pool))
    with pytest.raises(ConnectionResetError):
        await processor.process(records)
    # Sent, but neither logged nor dropped from the outbox: the replay (or the relay) does both.
    assert [s.type for s in await conns.balances.pending_outbox("acc_dry")] == ["account.hold"]
    assert await conns.pool.fetchval("SELECT count(*) FROM signals") == 0

    processor._ledger = PostgresLedger(conns.pool)  # the same process, the ledger back
    await processor.process(records)
    assert await conns.balances.pending_outbox("acc_dry") == []
    rows = await conns.pool.fetch("SELECT seq, type FROM signals WHERE account_id = 'acc_dry'")
    assert [(r["seq"], r["type"]) for r in rows] == [(1, "account.hold")]
    on_topic = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, expect=2)
    ]
    # Published again with the replay, the same seq: a consumer drops the repeat.
    assert [(s["type"], s["data"]["seq"]) for s in on_topic] == [("account.hold", 1)] * 2


class FirstPublishFails:
    """The real publisher, except that its first call fails, slowly, before sending."""

    def __init__(self, inner: SignalPublisher) -> None:
        self._inner, self.calls = inner, 0

    async def publish(self, dead_letters: Any, signals: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(0.1)
            raise KafkaConnectionError("simulated: the broker went away")
        await self._inner.publish(dead_letters, signals)


async def test_a_failed_send_is_never_overtaken_by_a_later_batchs_signal(
    settings: Settings, conns: Connections
) -> None:
    # Consumers drop a signal below the highest seq they saw: hold (1) must not arrive after
    # resume (2), which the next batch sent while the first batch's send was failing.
    publisher = FirstPublishFails(conns.publisher)
    outbox = Outbox(publisher, conns.balances)
    hold = ("acc_1", PendingSignal(1, "account.hold", "insufficient_balance"))
    resume = ("acc_1", PendingSignal(2, "account.resume", "recharged"))
    first, then = outbox.send([hold]), outbox.send([resume])
    with pytest.raises(KafkaConnectionError):
        await outbox.publish([], [hold], BatchOutcome(), first)
    with pytest.raises(SignalsNotPublished):
        await outbox.publish([], [resume], BatchOutcome(), then)
    assert publisher.calls == 1  # the second batch sent nothing
    # And both go out again with the replay, in order, since the map of what was sent is gone.
    assert outbox.pending([], [hold, resume]) == [hold, resume]
    await outbox.publish([], [hold, resume], BatchOutcome(), outbox.send([hold, resume]))
    on_topic = await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, expect=2)
    assert [orjson.loads(m.value)["data"]["seq"] for m in on_topic] == [1, 2]


class FirstPublishSlow:
    """The real publisher, except that its first call waits until ``release`` is set."""

    def __init__(self, inner: SignalPublisher) -> None:
        self._inner, self.calls, self.release = inner, 0, asyncio.Event()

    async def publish(self, dead_letters: Any, signals: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.release.wait()
        await self._inner.publish(dead_letters, signals)


async def test_the_relay_never_overtakes_a_batchs_signal_still_being_sent(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    # A batch's hold (seq 1) is on its way when an operator suspends the account (seq 2) and
    # the relay publishes the outbox: the suspension must not reach the topic first, or a
    # consumer, taking seq 2, drops the hold as stale.
    publisher = FirstPublishSlow(conns.publisher)
    processor = await _dry_processor(conns, seed, publisher=publisher)
    batch = asyncio.create_task(processor.process(_dry_calls("acc_dry", 1)))

    async def sending() -> bool:
        return publisher.calls == 1

    await eventually(sending)
    assert await conns.balances.set_status("acc_dry", "suspend", "operator")
    relay = asyncio.create_task(processor.relay_outboxes())
    await asyncio.sleep(0.5)  # without the chain, the relay's publish is done by now
    publisher.release.set()
    out = await batch
    assert await relay == 2  # the outbox held both: the hold is published again, harmlessly
    assert [s.type for _, s in out.signals] == ["account.hold"]
    on_topic = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, expect=3)
    ]
    assert [(s["type"], s["data"]["seq"]) for s in on_topic] == [
        ("account.hold", 1),
        ("account.hold", 1),
        ("account.suspend", 2),
    ]
    assert await conns.balances.pending_outbox("acc_dry") == []
    rows = await conns.pool.fetch("SELECT seq, type FROM signals WHERE account_id = 'acc_dry'")
    assert sorted((r["seq"], r["type"]) for r in rows) == [
        (1, "account.hold"),
        (2, "account.suspend"),
    ]


async def test_lost_redis_state_is_rebuilt_from_the_ledger(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    from dataclasses import replace

    accounts = ["acc_1", "acc_2"]
    await seed(*accounts, balance="50.00")
    first = traffic(accounts, 60, seed=3)
    await produce(
        conns.producer, topics.CALL_EVENTS, [e for e in first if e["type"] == "call.hangup"]
    )
    await produce(
        conns.producer, topics.MESSAGE_EVENTS, [e for e in first if e["type"] != "call.hangup"]
    )
    async with harness.running_worker(settings, conns) as outcomes:
        await eventually(lambda: _seen(outcomes, 60))
    await conns.redis.flushall()  # Redis lost everything, its memory of events included

    second = traffic(accounts, 40, seed=4)
    for e in second:
        e["id"] = "second-" + e["id"]
    await produce(
        conns.producer, topics.CALL_EVENTS, [e for e in second if e["type"] == "call.hangup"]
    )
    await produce(
        conns.producer, topics.MESSAGE_EVENTS, [e for e in second if e["type"] != "call.hangup"]
    )
    # A new group replays the whole topic: the first 60 again, then the 40 new ones.
    replay = replace(settings, consumer_group="replay")
    async with harness.running_worker(replay, conns) as outcomes:
        await eventually(lambda: _seen(outcomes, 100))
    # Redis had forgotten the first 60: it applied them again, the ledger said so, and the
    # debits were undone at once.
    assert sum(o.compensated for o in outcomes) == 60
    assert await ledger_usage_rows(conns) == 100
    for a in accounts:
        cost = sum(expected_cost(e) for e in first + second if e["subject"] == a)
        st = await conns.balances.get(a)
        assert st is not None and st.balance == 50_000_000 - cost, a
    assert (await reconcile(conns.pool, conns.balances)).ok
