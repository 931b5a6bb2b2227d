"""The ``SignalPublisher`` contract, run against the real implementation on a real broker.

Each test states one promise of ``metering.publish.SignalPublisher`` that the processor relies
on; ``publishers`` lists the implementations held to it (Kafka on the test's own broker; no
test needs a fake). ``read`` gives back what a consumer of each topic would see.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from balance.values import RECHARGE_REQUESTED, PendingSignal
from contracts import topics
from contracts.payments import RechargeRequested
from contracts.signals import Signal
from infra.kafkatools import read_all
from metering.batch import Reason, Rejected
from metering.publish import KafkaSignalPublisher, SignalPublisher
from tests.helpers import Rec

pytestmark = pytest.mark.kafka


@dataclass(frozen=True)
class Published:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


Read = Callable[[str, int], Awaitable[list[Published]]]


class Spy:
    """A real producer that remembers the acknowledgements it handed out."""

    def __init__(self, real: AIOKafkaProducer) -> None:
        self.real = real
        self.acks: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, value: Any = None, key: Any = None, **kw: Any) -> Any:
        fut = await self.real.send(topic, value, key, **kw)
        self.acks.append(fut)
        return fut


@dataclass
class Harness:
    publisher: SignalPublisher
    read: Read
    spy: Spy
    producer: AIOKafkaProducer


@pytest.fixture(params=["kafka"])
async def harness(request: pytest.FixtureRequest, kafka: str) -> AsyncIterator[Harness]:
    # linger_ms: the records wait in the client a while, so a publish that did not await
    # their acknowledgement would return before the broker has them.
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=200)
    await producer.start()
    spy = Spy(producer)

    async def read(topic: str, expect: int) -> list[Published]:
        records = await read_all(kafka, topic, expect=expect or None, idle_s=1.0)
        return [Published(r.key, r.value, dict(r.headers)) for r in records]

    try:
        yield Harness(KafkaSignalPublisher(spy), read, spy, producer)
    finally:
        await producer.stop()


def rejected(
    reason: Reason = "schema", *, value: bytes = b"{}", key: bytes | None = b"acc_1"
) -> Rejected:
    rec = Rec(topics.CALL_EVENTS, 3, 41, key, value)
    return Rejected(record=rec, reason=reason, detail="why: \x00 and \u00e9", type="call.hangup")


async def test_a_dead_letter_is_the_record_unchanged_with_its_reason_and_coordinates(
    harness: Harness,
) -> None:
    await harness.publisher.publish([rejected("unknown_account", value=b'{"a": 1}')], [])
    (dead,) = await harness.read(topics.DEAD_LETTER, 1)
    assert (dead.key, dead.value) == (b"acc_1", b'{"a": 1}')
    assert dead.headers["error.reason"] == b"unknown_account"
    assert dead.headers["error.detail"] == "why: \x00 and \u00e9".encode()
    assert (
        dead.headers["error.topic"],
        dead.headers["error.partition"],
        dead.headers["error.offset"],
    ) == (topics.CALL_EVENTS.encode(), b"3", b"41")
    assert "error.truncated" not in dead.headers


async def test_a_record_too_large_to_publish_is_dead_lettered_as_a_bounded_copy(
    harness: Harness,
) -> None:
    big = b"x" * (600 * 1024)
    long_key = b"k" * 5_000
    await harness.publisher.publish([rejected(value=big, key=long_key)], [])
    (dead,) = await harness.read(topics.DEAD_LETTER, 1)
    assert dead.value == big[: 64 * 1024] and dead.headers["error.truncated"] == b"614400"
    assert dead.key == long_key[:256] and dead.headers["error.key_truncated"] == b"5000"


async def test_signals_go_to_call_control_as_cloudevents_keyed_by_account_in_order(
    harness: Harness,
) -> None:
    ends = int(datetime.now(UTC).timestamp()) + 30
    before = datetime.now(UTC)
    await harness.publisher.publish(
        [],
        [
            ("acc_1", PendingSignal(1, "account.low_balance", "balance_below_threshold")),
            ("acc_1", PendingSignal(2, "call.terminate", "insufficient_credit", "c9", ends)),
            ("acc_1", PendingSignal(3, "account.hold", "insufficient_credit")),
        ],
    )
    got = await harness.read(topics.CONTROL_SIGNALS, 3)
    assert {p.key for p in got} == {b"acc_1"}
    assert {p.headers["content-type"] for p in got} == {b"application/cloudevents+json"}
    signals = [Signal.model_validate_json(p.value or b"") for p in got]
    assert [(s.type, s.data.seq, s.id) for s in signals] == [
        ("account.low_balance", 1, "acc_1:1"),
        ("call.terminate", 2, "acc_1:2"),
        ("account.hold", 3, "acc_1:3"),
    ]
    terminate = signals[1].data
    assert terminate.call_id == "c9"
    assert terminate.terminate_at == datetime.fromtimestamp(ends, UTC)
    assert all(before - timedelta(seconds=1) <= s.time <= datetime.now(UTC) for s in signals)
    assert await harness.read(topics.RECHARGE_REQUESTS, 0) == []


async def test_a_recharge_request_goes_to_the_recharge_worker_not_to_call_control(
    harness: Harness,
) -> None:
    await harness.publisher.publish(
        [], [("acc_2", PendingSignal(7, RECHARGE_REQUESTED, "below_auto_recharge_threshold"))]
    )
    (got,) = await harness.read(topics.RECHARGE_REQUESTS, 1)
    assert got.key == b"acc_2"
    req = RechargeRequested.model_validate_json(got.value or b"")
    assert (req.id, req.data.seq, req.data.reason) == (
        "acc_2:7",
        7,
        "below_auto_recharge_threshold",
    )
    assert orjson.loads(got.value or b"")["subject"] == "acc_2"
    assert await harness.read(topics.CONTROL_SIGNALS, 0) == []


async def test_publish_returns_only_once_the_broker_acknowledged_every_record(
    harness: Harness,
) -> None:
    await harness.publisher.publish(
        [rejected(), rejected("oversized")],
        [("acc_1", PendingSignal(1, "account.hold", "insufficient_credit"))],
    )
    assert len(harness.spy.acks) == 3
    assert all(f.done() and f.exception() is None for f in harness.spy.acks)


async def test_a_publish_the_broker_cannot_take_raises(harness: Harness) -> None:
    await harness.producer.stop()
    with pytest.raises(Exception):  # noqa: B017  # whatever the client raises, never silence
        await harness.publisher.publish(
            [], [("acc_1", PendingSignal(1, "account.hold", "insufficient_credit"))]
        )
