"""Fuzzing the real metering worker: hostile records among valid ones, in the same batches.

Each example produces a mix of valid events (for several accounts, with call ids holding any
character a JSON string may hold but NUL) and hostile records (any bytes, JSON of any shape, a
valid event with one field replaced by any value or removed, any key, sizes up to near 1 MiB,
exact redeliveries) to the real broker, and lets the one worker that runs for the whole test
(real Redis, real PostgreSQL) take them. After each example:

- the consumer group's committed offsets reach the end of every partition written to;
- every valid event is in the ledger exactly once, at the amount its price says;
- every other record is either charged once (it was valid after all) or dead-lettered once
  with a reason and its coordinates, never both, never neither;
- Redis and the ledger agree for every account (drift 0, none missing).

``FUZZ_EXAMPLES`` sets the number of examples (CI: the default, derandomized so a run
is reproducible; a longer run on demand: ``FUZZ_EXAMPLES=500 ./run test
tests/metering/test_fuzz_worker.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contracts import topics
from infra.kafkatools import read_all
from infra.ledger import event_key
from infra.settings import Settings
from meter.traffic import call_hangup, message_sent
from metering.processor import BatchOutcome
from metering.worker import Connections, run_metering
from ops.reconcile import reconcile
from tests.conftest import Seeder, eventually
from tests.helpers import expected_cost

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
DESTS = ["+14155550123", "+442071234567", "+447911123456", "+33142685300", "+5255123456"]
ACCOUNTS = ("fz_a", "fz_b", "fz_c")
_counter = itertools.count()

# -- values ------------------------------------------------------------------------------------

# Any character a JSON text can carry (no lone surrogates: they are not UTF-8), NUL included,
# with the separators an encoding might trust weighted in.
_any_char = st.characters(codec="utf-8")
_separators = st.sampled_from(["\x00", "\n", "\t", "|", ";", ",", " ", "%", "%41", ":", "\r"])
hostile_text = st.lists(st.one_of(_any_char, _separators), max_size=40).map("".join)
#: text a valid identifier may hold: anything but NUL, 1..256 characters
ident_text = (
    st.lists(st.one_of(_any_char, _separators), min_size=1, max_size=60)
    .map(lambda cs: "".join(cs).replace("\x00", "") or "x")
    .map(lambda s: s[:256])
)
_offsets = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])
any_time = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_offsets
    ).map(lambda d: d.isoformat()),
    st.sampled_from(
        [
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-12-01T00:00:00",
            "now",
            "",
        ]
    ),
)
big_int = st.integers(min_value=-(2**70), max_value=2**70)
any_value: st.SearchStrategy[Any] = st.one_of(
    hostile_text,
    big_int,
    st.integers(min_value=-10, max_value=10),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    any_time,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
FIELDS = [
    "id",
    "source",
    "time",
    "subject",
    "type",
    "specversion",
    "datacontenttype",
    "data",
    "data.account_id",
    "data.call_id",
    "data.message_id",
    "data.to",
    "data.from",
    "data.direction",
    "data.billable_s",
    "data.answered_at",
    "data.ended_at",
    "data.parts",
    "data.hangup_cause",
    "data.elapsed_s",
]


@dataclass(frozen=True)
class Item:
    """One record to produce: ``expect`` is the ledger amount for a valid charged event,
    None for a valid event that is not charged (call.answered), and "hostile" otherwise."""

    topic: str
    key: bytes | None
    value: bytes
    expect: int | str | None
    account: str = ""

    def __repr__(self) -> str:  # bounded: a falsifying example may hold a 1 MiB record
        v = self.value if len(self.value) <= 300 else self.value[:300] + b"..."
        return f"Item({self.topic!r}, key={self.key!r}, value={v!r} ({len(self.value)} B))"


def _encode(ev: Any) -> bytes:
    # json, not orjson: integers past 64 bits must go through as the hostile values they are.
    return json.dumps(ev, ensure_ascii=False).encode()


@st.composite
def valid_item(draw: st.DrawFn, tag: str) -> Item:
    acct = draw(st.sampled_from(ACCOUNTS))
    n = next(_counter)
    ago = timedelta(seconds=draw(st.integers(min_value=0, max_value=3 * 86_400)))
    at = datetime.now(UTC) - ago
    kind = draw(st.sampled_from(["hangup", "hangup", "message", "answered"]))
    call_id = draw(ident_text)
    if kind == "message":
        ev = message_sent(
            acct, f"{tag}m{n}", draw(st.sampled_from(DESTS)), draw(st.integers(1, 5)), at=at
        )
        return Item(topics.MESSAGE_EVENTS, acct.encode(), _encode(ev), expected_cost(ev), acct)
    ev = call_hangup(
        acct,
        call_id,
        draw(st.sampled_from(DESTS)),
        draw(st.integers(0, 7_200)),
        direction=draw(st.sampled_from(["inbound", "outbound"])),
        event_id=f"{tag}c{n}",
        at=at,
    )
    if kind == "answered":
        ev["type"] = "call.answered"
        ev["id"] = f"{tag}a{n}"
        for k in ("ended_at", "billable_s", "hangup_cause"):
            del ev["data"][k]
        return Item(topics.CALL_EVENTS, acct.encode(), _encode(ev), None, acct)
    return Item(topics.CALL_EVENTS, acct.encode(), _encode(ev), expected_cost(ev), acct)


@st.composite
def hostile_item(draw: st.DrawFn, tag: str) -> Item:
    acct = draw(st.sampled_from(ACCOUNTS))
    topic = draw(st.sampled_from([topics.CALL_EVENTS, topics.MESSAGE_EVENTS]))
    key = draw(
        st.one_of(
            st.just(acct.encode()),
            st.none(),
            st.binary(max_size=300),
            st.sampled_from([a.encode() for a in ACCOUNTS]),
        )
    )
    shape = draw(st.sampled_from(["bytes", "json", "mutated", "mutated", "mutated", "huge"]))
    if shape == "bytes":
        value = draw(st.binary(max_size=2_000))
    elif shape == "json":
        value = _encode(
            draw(
                st.recursive(
                    any_value,
                    lambda c: (
                        st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=8), c, max_size=4)
                    ),
                    max_leaves=10,
                )
            )
        )
    else:
        base = draw(valid_item(tag))
        ev = json.loads(base.value)
        ev["id"] = f"{tag}h{next(_counter)}"  # its own id: never a conflict with a valid one
        if shape == "huge":
            # Near the producer's 1 MiB request limit: its unchanged copy would not fit.
            ev["blob"] = "z" * draw(st.sampled_from([70_000, 600_000, 1_040_000]))
        else:
            for _ in range(draw(st.integers(1, 3))):
                path = draw(st.sampled_from(FIELDS)).split(".")
                target = ev if len(path) == 1 else ev.get("data")
                if not isinstance(target, dict):
                    continue
                if draw(st.booleans()) and draw(st.booleans()):
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = draw(any_value)
                    if path == ["id"] and isinstance(target["id"], str):
                        # Any text, but its own: two records given the same hostile id (a
                        # sampled time string) would rightly conflict with each other
                        # (duplicate_id_different_payload), which is not what this checks.
                        target["id"] += f"~{next(_counter)}"
        value = _encode(ev)
    return Item(topic, key, value, "hostile")


@st.composite
def batch(draw: st.DrawFn) -> list[Item]:
    tag = f"x{uuid.uuid4().hex[:6]}:"
    items = draw(st.lists(st.one_of(valid_item(tag), hostile_item(tag)), min_size=1, max_size=24))
    if draw(st.booleans()):
        items.append(draw(st.sampled_from(items)))  # an exact redelivery
    return items


# -- the worker --------------------------------------------------------------------------------


@dataclass
class Harness:
    settings: Settings
    conns: Connections
    producer: AIOKafkaProducer
    offsets: AIOKafkaConsumer
    opening: dict[str, int]

    def __repr__(self) -> str:
        return f"Harness({self.settings.kafka_bootstrap})"


@pytest.fixture
async def harness(settings: Settings, conns: Connections, seed: Seeder) -> AsyncIterator[Harness]:
    await seed(*ACCOUNTS, balance="100000.00")
    outcomes: list[BatchOutcome] = []
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_metering(settings, stop, on_batch=outcomes.append, conns=conns)
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 * 1024 * 1024
    )
    offsets = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await producer.start()
    await offsets.start()
    try:
        yield Harness(settings, conns, producer, offsets, {a: 100_000_000_000 for a in ACCOUNTS})
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker, 30)
        await offsets.stop()
        await producer.stop()
    assert worker.done() and worker.exception() is None


async def _check(h: Harness, items: list[Item]) -> None:
    metas = await asyncio.gather(*[await h.producer.send(i.topic, i.value, i.key) for i in items])
    ends: dict[TopicPartition, int] = {}
    for m in metas:
        tp = TopicPartition(m.topic, m.partition)
        ends[tp] = max(ends.get(tp, 0), m.offset + 1)

    async def committed() -> bool:
        for tp, end in ends.items():
            at = await h.offsets.committed(tp)
            if at is None or at < end:
                return False
        return True

    # The committed offsets reach the end: no record, whatever its bytes, held a partition.
    await eventually(committed, within=60)

    coords = {(m.topic, m.partition, m.offset): i for m, i in zip(metas, items, strict=True)}
    dead: dict[tuple[str, int, int], list[str]] = {}
    for m in await read_all(h.settings.kafka_bootstrap, topics.DEAD_LETTER, idle_s=0.5):
        hd = dict(m.headers)
        c = (hd["error.topic"].decode(), int(hd["error.partition"]), int(hd["error.offset"]))
        if c in coords:
            dead.setdefault(c, []).append(hd["error.reason"].decode())
            assert len(m.value or b"") <= 512 * 1024
    pool = h.conns.pool
    for c, item in coords.items():
        reasons = dead.get(c, [])
        assert len(reasons) <= 1, (reasons, item.value[:200])  # dead-lettered once at most
        key = _key_of(item.value)
        row = None
        if key is not None:
            row = await pool.fetchrow(
                "SELECT account_id, amount FROM ledger WHERE event_key = $1", key
            )
        if isinstance(item.expect, int):
            # A valid event: charged exactly once (one row per key), at its price, never a
            # dead letter (a redelivery is a duplicate, not an error).
            assert not reasons, (reasons, item.value[:300])
            assert row is not None, item.value[:300]
            assert (row["account_id"], -row["amount"]) == (item.account, item.expect)
        elif item.expect is None:
            assert not reasons, (reasons, item.value[:300])  # a valid live-call update
        elif row is not None:
            assert not reasons, (reasons, item.value[:300])  # valid after all: charged, once
        elif not reasons:
            # Neither charged nor dead-lettered: only a valid event that charges nothing.
            assert _type_of(item.value) in UNCHARGED, item.value[:300]

    rec = await reconcile(pool, h.conns.balances)
    assert rec.drift_micros == 0 and not rec.mismatched, rec
    assert getattr(rec, "missing", 0) == 0  # every account has its Redis state
    # Money only ever left the accounts for what the ledger says, nothing else.
    for a in ACCOUNTS:
        spent = await pool.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1 AND kind <> "
            "'opening'",
            a,
        )
        st_ = await h.conns.balances.get(a)
        assert st_ is not None and st_.balance == h.opening[a] + spent


UNCHARGED = frozenset(("call.answered", "call.progress", "number.deactivated"))


def _type_of(value: bytes) -> object:
    with contextlib.suppress(ValueError, UnicodeError):
        ev = json.loads(value)
        if isinstance(ev, dict):
            return ev.get("type")
    return None


def _key_of(value: bytes) -> bytes | None:
    try:
        ev = json.loads(value)
        if (
            isinstance(ev, dict)
            and isinstance(ev.get("source"), str)
            and isinstance(ev.get("id"), str)
        ):
            return event_key(ev["source"], ev["id"])
    except (ValueError, UnicodeError):
        pass
    return None


@pytest.mark.timeout(120 + 12 * EXAMPLES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(items=batch())
async def test_no_record_stalls_the_stream_or_moves_money_it_should_not(
    harness: Harness, items: list[Item]
) -> None:
    await _check(harness, items)
