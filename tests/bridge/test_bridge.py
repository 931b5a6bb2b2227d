"""The signal bridge on a fake switch (the real Kamailio: tests/deploy/test_kamailio.py): what
each signal ends, in seq order per account, stale ones dropped, the switch retried."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bridge.enforce import SignalBridge, SignalIn, parse_signal
from bridge.switch import Dialog, SwitchUnavailable
from bridge.worker import run_bridge
from contracts import topics
from contracts.signals import make_signal
from infra.clock import SettableClock
from infra.settings import Settings
from tests.conftest import eventually

T0 = datetime.now(UTC).replace(microsecond=0)


class FakeSwitch:
    """Dialogs by call id, each of an account; ``down`` fails that many calls first."""

    def __init__(self) -> None:
        self.dialogs: dict[str, tuple[str, int]] = {}  # call_id -> (account, created_at)
        self.ended: list[str] = []
        self.down = 0
        self.calls = 0

    def add(self, account: str, call_id: str, created: datetime = T0) -> None:
        self.dialogs[call_id] = (account, int(created.timestamp()))

    def _maybe_down(self) -> None:
        self.calls += 1
        if self.down:
            self.down -= 1
            raise SwitchUnavailable("connection refused")

    async def end_call(self, call_id: str) -> int:
        self._maybe_down()
        if self.dialogs.pop(call_id, None) is None:
            return 0
        self.ended.append(call_id)
        return 1

    async def account_calls(self, account_id: str) -> Sequence[Dialog]:
        self._maybe_down()
        return [
            Dialog(1, i, c, at)
            for i, (c, (a, at)) in enumerate(self.dialogs.items())
            if a == account_id
        ]

    async def end_dialog(self, dialog: Dialog) -> bool:
        self._maybe_down()
        return await self.end_call(dialog.call_id) == 1


def sig(type_: str, account: str, seq: int, at: datetime = T0, **extra: object) -> SignalIn:
    s = make_signal(type_, account, seq, "test", at, **extra)  # type: ignore[arg-type]
    parsed = parse_signal(s.model_dump_json().encode())
    assert parsed is not None
    return parsed


def noop() -> None:
    return None


async def test_a_terminate_whose_moment_passed_ends_the_call_now() -> None:
    sw = FakeSwitch()
    sw.add("a", "c1")
    sw.add("a", "c2")
    b = SignalBridge(sw, clock=SettableClock(T0 + timedelta(seconds=5)))
    s = sig("call.terminate", "a", 1, call_id="c1", terminate_at=T0)
    assert await b.handle(s, noop) == "applied"
    assert sw.ended == ["c1"] and "c2" in sw.dialogs


async def test_a_terminate_due_later_ends_the_call_at_its_moment_and_only_then_is_done() -> None:
    sw = FakeSwitch()
    sw.add("a", "c1")
    clock = SettableClock(T0)
    b = SignalBridge(sw, clock=clock)
    done: list[bool] = []
    s = sig("call.terminate", "a", 1, call_id="c1", terminate_at=T0 + timedelta(seconds=30))
    assert await b.handle(s, lambda: done.append(True)) == "scheduled"
    await asyncio.sleep(0.6)
    assert sw.ended == [] and not done
    clock.advance(30)

    async def ended() -> bool:
        return sw.ended == ["c1"] and done == [True]

    await eventually(ended, within=3)
    await b.close()


async def test_stale_and_repeated_signals_are_dropped_in_seq_order_per_account() -> None:
    sw = FakeSwitch()
    sw.add("a", "c1")
    sw.add("b", "c2")
    b = SignalBridge(sw, clock=SettableClock(T0))
    assert await b.handle(sig("account.hold", "a", 5), noop) == "applied"
    assert await b.handle(sig("account.suspend", "a", 4), noop) == "stale"  # older than hold
    assert await b.handle(sig("account.hold", "a", 5), noop) == "stale"  # a redelivery
    assert sw.ended == [] and sw.calls == 0  # hold leaves live calls alone
    assert await b.handle(sig("account.suspend", "b", 1), noop) == "applied"  # its own seq
    assert sw.ended == ["c2"]
    assert await b.handle(sig("number.hold", "a", 6, number="+442071234567"), noop) == "ignored"


async def test_a_suspend_ends_every_live_call_of_the_account_made_before_it() -> None:
    sw = FakeSwitch()
    for c in ("c1", "c2", "c3"):
        sw.add("a", c)
    sw.add("a", "later", T0 + timedelta(seconds=60))  # after a resume, when a replay arrives
    sw.add("other", "c4")
    b = SignalBridge(sw, clock=SettableClock(T0 + timedelta(seconds=90)))
    assert await b.handle(sig("account.suspend", "a", 1), noop) == "applied"
    assert sorted(sw.ended) == ["c1", "c2", "c3"]
    assert set(sw.dialogs) == {"later", "c4"}


async def test_an_unreachable_switch_is_retried_and_the_lag_shows() -> None:
    sw = FakeSwitch()
    sw.add("a", "c1")
    sw.down = 3
    clock = SettableClock(T0)
    b = SignalBridge(sw, clock=clock)
    task = asyncio.create_task(b.handle(sig("account.suspend", "a", 1), noop))
    await asyncio.sleep(0.05)
    clock.advance(7)
    assert b.lag_s == 7
    assert await asyncio.wait_for(task, 5) == "applied"
    assert sw.ended == ["c1"] and b.lag_s == 0


def test_records_that_are_not_signals_are_skipped() -> None:
    for raw in (None, b"", b"{not json", b"[]", b'{"type":"call.terminate"}'):
        assert parse_signal(raw) is None
    extra = make_signal("account.hold", "a", 1, "r", T0).model_dump(mode="json")
    extra["data"]["new_field"] = 1  # the contract may grow
    assert parse_signal(orjson.dumps(extra)) is not None


async def test_the_bridge_process_commits_past_a_pending_terminate_only_once_done(
    settings: Settings,
) -> None:
    sw = FakeSwitch()
    sw.add("a", "now")
    sw.add("a", "soon")
    sw.add("b", "b1")
    now = datetime.now(UTC)
    signals = [
        make_signal(
            "call.terminate",
            "a",
            1,
            "r",
            now,
            call_id="soon",
            terminate_at=now + timedelta(seconds=2),
        ),
        make_signal("call.terminate", "a", 2, "r", now, call_id="now", terminate_at=now),
        make_signal("account.suspend", "b", 1, "r", now),
        make_signal("account.suspend", "b", 1, "r", now),  # a redelivery
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for s in signals:
            await producer.send_and_wait(
                topics.CONTROL_SIGNALS, s.model_dump_json().encode(), s.data.account_id.encode()
            )
    finally:
        await producer.stop()
    seen: list[tuple[str, str]] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_bridge(settings, stop, switch=sw, on_signal=lambda t, o: seen.append((t, o)))
    )
    try:

        async def all_ended() -> bool:
            return sorted(sw.ended) == ["b1", "now", "soon"]

        await eventually(all_ended, within=20)
        assert sw.ended.index("now") < sw.ended.index("soon")
        assert ("account.suspend", "stale") in seen
        await asyncio.sleep(0.5)  # one more commit round
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.bridge_group
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topics.CONTROL_SIGNALS) or set()
        committed = [
            await consumer.committed(TopicPartition(topics.CONTROL_SIGNALS, p)) for p in parts
        ]
        assert sum(c or 0 for c in committed) == len(signals)
    finally:
        await consumer.stop()
