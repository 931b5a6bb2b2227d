"""Records that once stopped a partition, each named, and the isolation behind validation.

Three classes were seen holding a partition forever (the batch rewound and retried without
end): a CloudEvent ``time`` before 1970 (which also shifted the debit arguments of the other
accounts in the same Lua call), a NUL character in a text field (Redis took it, the ledger COPY
refused it), and a record near 1 MiB (its unchanged dead-letter copy exceeded the producer's
request size). Each is here against the real worker, broker, Redis and PostgreSQL; then the
Lua encoding on its own, and the isolation of a record that fails for a reason no retry cures.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from balance.errors import OutcomeUnknown
from balance.store import RedisBalances
from balance.values import Debit, Draw, Tariff
from contracts import topics
from infra.kafkatools import read_all
from infra.ledger import PostgresLedger
from infra.settings import Settings
from meter.traffic import call_hangup, message_sent
from metering.isolate import is_transient, isolate
from metering.processor import BatchOutcome, MeteringProcessor, Record
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from tests import harness
from tests.conftest import Seeder, eventually
from tests.helpers import Rec, expected_cost

DEST = "+442071234567"


async def send_all(
    settings: Settings, items: Sequence[tuple[str, bytes | None, bytes]]
) -> dict[TopicPartition, int]:
    """Produce ``(topic, key, value)`` in order; the end offset of each partition written."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        metas = await asyncio.gather(*[await producer.send(t, v, k) for t, k, v in items])
    finally:
        await producer.stop()
    ends: dict[TopicPartition, int] = {}
    for m in metas:
        tp = TopicPartition(m.topic, m.partition)
        ends[tp] = max(ends.get(tp, 0), m.offset + 1)
    return ends


async def all_committed(settings: Settings, ends: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:

        async def done() -> bool:
            for tp, end in ends.items():
                at = await consumer.committed(tp)
                if at is None or at < end:
                    return False
            return True

        await eventually(done, within=60)
    finally:
        await consumer.stop()


async def through_worker(
    settings: Settings,
    conns: Connections,
    items: Sequence[tuple[str, bytes | None, bytes]],
    *,
    dead: int,
) -> tuple[dict[TopicPartition, int], list[Any]]:
    """Produce ``items``, run the worker until the group has committed every one of them,
    then read the ``dead`` dead letters expected: (end offsets, dead letters)."""
    ends = await send_all(settings, items)
    async with harness.running_worker(settings, conns):
        await all_committed(settings, ends)
    return ends, await read_all(settings.kafka_bootstrap, topics.DEAD_LETTER, expect=dead)


def ev(e: dict[str, Any]) -> tuple[str, bytes | None, bytes]:
    topic = topics.MESSAGE_EVENTS if e["type"] == "message.sent" else topics.CALL_EVENTS
    return topic, e["subject"].encode(), orjson.dumps(e)


async def test_a_time_before_1970_is_dead_lettered_and_moves_no_other_accounts_money(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", "acc_2", "acc_3", balance="10.00")
    old = call_hangup("acc_1", "old", DEST, 60, at=datetime(1969, 12, 31, 23, 0, tzinfo=UTC))
    answered_early = call_hangup("acc_1", "early", DEST, 60)
    answered_early["data"]["answered_at"] = "1960-01-01T00:00:00Z"
    good = [call_hangup(a, f"g{a}{i}", DEST, 61 + i) for i in range(3) for a in ("acc_2", "acc_3")]
    good += [message_sent("acc_2", "m1", DEST, 3)]
    # Same partition and batch as the others: under one key, in between them.
    items = [ev(good[0]), ev(old), ev(good[1]), ev(answered_early), *map(ev, good[2:])]
    items[1] = (topics.CALL_EVENTS, b"acc_1", items[1][2])
    _, dead = await through_worker(settings, conns, items, dead=2)
    assert sorted(dict(m.headers)["error.reason"].decode() for m in dead) == [
        "timestamp_out_of_range",
        "timestamp_out_of_range",
    ]
    for a in ("acc_2", "acc_3"):
        cost = sum(expected_cost(e) for e in good if e["subject"] == a)
        st = await conns.balances.get(a)
        assert st is not None and st.balance == 10_000_000 - cost, a
    st1 = await conns.balances.get("acc_1")
    assert st1 is not None and st1.balance == 10_000_000
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_a_nul_in_any_text_is_dead_lettered_and_redis_and_the_ledger_agree(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    in_call = call_hangup("acc_1", "c\x00nul", DEST, 60)
    in_source = call_hangup("acc_1", "c2", DEST, 60, source="urn:sw\x00itch")
    in_extension = message_sent("acc_1", "m1", DEST, 1)
    in_extension["ext"] = {"note": "a\x00b"}
    escaped_backslash = call_hangup("acc_1", "c3\\u0000", DEST, 60)  # no NUL: a backslash
    items = [ev(in_call), ev(in_source), ev(in_extension), ev(escaped_backslash)]
    _, dead = await through_worker(settings, conns, items, dead=3)
    assert [dict(m.headers)["error.reason"] for m in dead] == [b"invalid_text"] * 3
    assert sorted(m.value for m in dead) == sorted(i[2] for i in items[:3])  # unchanged
    rows = await conns.pool.fetch("SELECT ref FROM ledger WHERE kind = 'call'")
    assert [r["ref"] for r in rows] == ["c3\\u0000"]
    assert (await reconcile(conns.pool, conns.balances)).ok


async def test_a_record_near_one_mib_is_dead_lettered_as_a_bounded_copy(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    huge = call_hangup("acc_1", "big", DEST, 60)
    huge["blob"] = "z" * 1_040_000
    after = call_hangup("acc_1", "after", DEST, 60)
    items = [ev(huge), ev(after)]
    items.append((topics.CALL_EVENTS, b"k" * 5_000, b"{}"))  # a key no account has
    ends, dead = await through_worker(settings, conns, items, dead=2)
    by_reason = {dict(m.headers)["error.reason"]: m for m in dead}
    big = by_reason[b"oversized"]
    h = dict(big.headers)
    assert int(h["error.truncated"]) == len(items[0][2])
    assert big.value == items[0][2][: 64 * 1024]
    tp = TopicPartition(h["error.topic"].decode(), int(h["error.partition"]))
    assert int(h["error.offset"]) == ends[tp] - 2  # its own coordinates: "after" followed it
    (keyed,) = [m for r, m in by_reason.items() if r != b"oversized"]
    assert keyed.key == b"k" * 256 and int(dict(keyed.headers)["error.key_truncated"]) == 5_000
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 10_000_000 - expected_cost(after)


def _key(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


async def test_no_value_shifts_another_in_the_debit_arguments(conns: Connections) -> None:
    b: RedisBalances = conns.balances
    now = int(datetime.now(UTC).timestamp())
    day = now // 86_400
    for a in ("a", "b", "c"):
        await b.create_account(a, balance=1_000_000, credit_limit=0, low_threshold=0)
    await b.reserve(
        "b",
        "x\n|;\t,y",
        "outbound",
        Tariff(60_000, 0, 1, 1),
        now_s=now,
        grant_s=60,
        grace_s=60,
        max_s=600,
    )
    fp = b"\x00" * 8
    out = await b.apply_debits(
        {
            # a negative day and a negative answered_at: once they shifted what followed
            "a": [Debit(_key(1), fp, 300, -1, draw=Draw(60, 1000, 0, -86_400))],
            "b": [Debit(_key(2), fp, 500, day, call_id="x\n|;\t,y")],
            "c": [Debit(_key(3), fp, 700, day, call_id="\n"), Debit(_key(4), fp, 11, day)],
        },
        now,
    )
    assert [(o.account_id, o.codes) for o in out] == [("a", "n"), ("b", "n"), ("c", "nn")]
    balances = {a: (await b.get(a)) for a in ("a", "b", "c")}
    assert {a: s.balance for a, s in balances.items() if s} == {
        "a": 1_000_000 - 300,
        "b": 1_000_000 - 500,
        "c": 1_000_000 - 711,
    }
    st = balances["b"]
    assert st is not None and st.reserved == 0  # the call with separators in its id was closed
    with pytest.raises(ValueError):
        Debit(_key(5), fp, -1, day)


class PoisonedProcessor(MeteringProcessor):
    """Fails a batch holding a given event id the way a bug would (not a service outage)."""

    def __init__(self, *args: Any, poison: str, error: Exception, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._poison = poison.encode()
        self._error = error

    async def process(self, records: Sequence[Record]) -> BatchOutcome:
        if any(self._poison in (r.value or b"") for r in records):
            raise self._error
        return await super().process(records)


async def _processor(conns: Connections, poison: str, error: Exception) -> PoisonedProcessor:
    catalog = Catalog(conns.pool)
    await catalog.refresh()

    async def rebuild(ids: Any) -> list[str]:
        return []

    return PoisonedProcessor(
        balances=conns.balances,
        ledger=PostgresLedger(conns.pool),
        catalog=catalog,
        publisher=conns.publisher,
        rebuild=rebuild,
        poison=poison,
        error=error,
    )


async def test_a_record_that_fails_for_good_is_isolated_and_the_rest_charged(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", "acc_2", balance="10.00")
    events = [call_hangup("acc_1" if i % 2 else "acc_2", f"c{i}", DEST, 60) for i in range(9)]
    records = [
        Rec(topics.CALL_EVENTS, 0, i, e["subject"].encode(), orjson.dumps(e))
        for i, e in enumerate(events)
    ]
    p = await _processor(conns, '"c5"', ValueError("a bug one record's bytes trigger"))
    outcomes: list[BatchOutcome] = []
    assert await isolate(p, records, outcomes.append, retry_pause_s=0) == 1
    assert sum(o.charged for o in outcomes) == 8
    assert sum(o.dead_letters.get("unprocessable", 0) for o in outcomes) == 1
    dead = await read_all(settings.kafka_bootstrap, topics.DEAD_LETTER, expect=1)
    assert dead[0].value == records[5].value
    h = dict(dead[0].headers)
    assert h["error.reason"] == b"unprocessable" and h["error.offset"] == b"5"
    assert b"ValueError" in h["error.detail"]
    assert (await reconcile(conns.pool, conns.balances)).ok
    # In order: the record after the poison was charged after those before it.
    refs = [
        r["ref"]
        for r in await conns.pool.fetch(
            "SELECT ref FROM ledger WHERE kind = 'call' ORDER BY entry_id"
        )
    ]
    assert refs == [f"c{i}" for i in range(9) if i != 5]


async def test_an_outage_is_never_taken_for_a_poison_record(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    events = [call_hangup("acc_1", f"c{i}", DEST, 60) for i in range(4)]
    records = [
        Rec(topics.CALL_EVENTS, 0, i, b"acc_1", orjson.dumps(e)) for i, e in enumerate(events)
    ]
    p = await _processor(conns, '"c2"', OutcomeUnknown("redis did not answer"))
    with pytest.raises(OutcomeUnknown):
        await isolate(p, records, lambda o: None, retry_pause_s=0)
    # Nothing was dead-lettered; what was charged before the outage is charged once.
    rows = await conns.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'call'")
    assert rows <= 2


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OutcomeUnknown("x"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (ValueError("x"), False),
        (UnicodeEncodeError("utf-8", "x", 0, 1, "surrogate"), False),
        (KeyError("x"), False),
    ],
)
def test_which_failures_retrying_cures(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_redis_answers_of_the_moment_are_transient_and_script_errors_are_not() -> None:
    from redis.exceptions import ResponseError

    assert is_transient(ResponseError("BUSY Redis is busy running a script"))
    assert is_transient(ResponseError("Command # 1 (EVALSHA ...) caused error: TRYAGAIN"))
    assert not is_transient(ResponseError("user_script:12: attempt to compare nil with number"))


def test_the_times_a_producer_clock_can_send_are_bounded() -> None:
    from contracts.events import MIN_EVENT_TIME

    assert datetime.fromtimestamp(MIN_EVENT_TIME, UTC) == datetime(2000, 1, 1, tzinfo=UTC)
    assert timedelta(seconds=MIN_EVENT_TIME) > timedelta(days=365 * 29)
