"""The usage stream processor: the metering hot path, one batch at a time.

Per batch, never per event::

    getmany -> validate (bad ones to the dead-letter topic) -> rate
      -> one pipelined Redis round trip applying every debit idempotently (debit.lua)
      -> one ledger statement, idempotent on the event key
      -> produce dead letters and the signals the batch caused, await them together
      -> commit offsets

Nothing is committed before it is in the ledger. A duplicate that Redis already applied still
gets its ledger row if it is missing (Redis's memory of an event is never proof that the ledger
has it), written with the amount Redis applied the first time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import orjson
from pydantic import ValidationError

from balance import keys
from balance.keys import DAY_S
from balance.protocol import BalanceStore
from balance.values import (
    RECHARGE_REQUESTED,
    AccountOutcome,
    Draw,
    PendingSignal,
    PlanPeriod,
    Tariff,
    Undraw,
)
from contracts import topics
from contracts.events import CallHangup, MessageSent, NumberData, NumberRenewalDueData
from contracts.payments import recharge_request
from contracts.signals import make_signal
from infra import metrics
from infra.ledger import Ledger, SignalRow, UsageRow, event_key
from infra.settings import CallControl
from metering.decode import FastHangup, FastMessage, decode
from rating.catalog import Catalog
from rating.plans import month_period
from rating.rating import NoRate, voice_cost

log = logging.getLogger(__name__)

_CONTROL = frozenset(("call.answered", "call.progress"))
_NUMBER = frozenset(("number.activated", "number.renewal_due", "number.deactivated"))
#: Events taken out of a batch before ``_rate``, in the one pass that already sorted out the
#: live-call updates: calls and messages pay nothing more for number events existing.
_SIDE = _CONTROL | _NUMBER

#: The one-time fee an activation charges when the account's price list defines it.
NUMBER_SETUP_FEE = "number_setup"
#: How far a renewal's ``period`` may be from the month of the event's own time. Inventory
#: announces a renewal at most a month ahead, and may catch up on a year's backlog after an
#: outage; anything further is a producer bug (a swapped year, "0000-01"), not a month to bill.
RENEWAL_MONTHS_AHEAD = 1
RENEWAL_MONTHS_BEHIND = 12

#: The earliest time an event, or a time inside one, may carry: 2000-01-01T00:00:00Z. Nothing
#: this service bills happened before it; an earlier stamp is a broken producer clock (a unix
#: time of 0, a year of 0001), and would otherwise become a negative day, a negative answered_at
#: or a billing month in 1969 downstream.
MIN_EVENT_TIME = 946_684_800

#: An event the hot path charges: decoded by msgspec, or by pydantic when msgspec declined.
Chargeable = FastHangup | FastMessage | CallHangup | MessageSent

#: Which event types belong on which inbound topic, and whether the hot path charges them.
#: True: charged (a debit and a ledger row); False: not a debit of its own (live-call updates
#: act on reservations; number.deactivated is acknowledged: numbers are paid a month ahead).
_TOPIC_TYPES: dict[str, dict[str, bool]] = {
    topics.CALL_EVENTS: {"call.hangup": True, "call.answered": False, "call.progress": False},
    topics.MESSAGE_EVENTS: {"message.sent": True},
    topics.NUMBER_EVENTS: {
        "number.activated": True,
        "number.renewal_due": True,
        "number.deactivated": False,
    },
}


class Record(Protocol):
    """What the processor reads of a consumed record (aiokafka's ``ConsumerRecord``)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Producer(Protocol):
    async def send(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        *,
        headers: list[tuple[str, bytes]] | None = ...,
    ) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Rejected:
    record: Record
    reason: str
    detail: str
    type: str = "unknown"  # the event type, when the record could be read


@dataclass(slots=True)
class Charge:
    record: Record
    type: str
    account_id: str
    event_key: bytes
    fingerprint: bytes
    amount: int
    kind: str
    quantity: int
    ref: str
    rate_ref: str
    time: datetime
    epoch: int  # the event's time in unix seconds
    day: int  # its UTC day number: the Redis bucket that remembers it
    call_id: str  # a hangup's call (its reservation is released with the charge), else ""
    source: str
    event_id: str
    code: str = ""  # set from Redis: n(ew), d(uplicate), c(onflict), k (ledger already has it)
    applied_amount: int = 0
    #: a call's draw on the minute bucket (``balance.values.Debit.draw``); None when
    #: ``amount`` is final
    draw: Draw | None = None
    included_s: int = 0  # set from Redis: seconds drawn from included minutes / bundles


@dataclass(slots=True)
class BatchOutcome:
    """What a batch did; the demo and the benchmark add these up."""

    records: int = 0
    charged: int = 0
    duplicates: int = 0
    call_updates: int = 0  # call.answered / call.progress applied to reservations
    acknowledged: int = 0  # taken, valid, and nothing to charge (number.deactivated)
    charged_micros: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    signals: list[tuple[str, PendingSignal]] = field(default_factory=list)
    compensated: int = 0


@dataclass(slots=True)
class Applied:
    """A batch between its two halves (see ``MeteringProcessor.apply``)."""

    outcome: BatchOutcome
    rejected: list[Rejected]
    charges: list[Charge]
    accounts: list[AccountOutcome]
    #: signals pending in the outboxes of accounts whose live calls this batch updated
    control_outbox: list[tuple[str, PendingSignal]] = field(default_factory=list)


#: A dead letter carries the record unchanged up to this size (the producer's request limit is
#: 1 MiB, and the consumer fetches records of up to 8 MiB); past it, a bounded copy: the first
#: ``DEAD_LETTER_KEEP_BYTES`` with ``error.truncated`` (the original size) in its headers.
DEAD_LETTER_MAX_BYTES = 512 * 1024
DEAD_LETTER_KEEP_BYTES = 64 * 1024
#: No valid key is longer than an account id (64 characters): a longer one is cut to this.
DEAD_LETTER_MAX_KEY_BYTES = 256


def dead_letter(r: Rejected) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The value, key and headers of a rejected record's dead letter: the record unchanged
    with ``error.reason``, ``error.detail`` and its coordinates (``error.topic``,
    ``error.partition``, ``error.offset``), or a bounded copy of it when it is too large to
    publish (``error.truncated``, ``error.key_truncated``: the original sizes), so that a dead
    letter can always be produced and never holds its partition up."""
    rec = r.record
    value, key = rec.value, rec.key
    headers = [
        ("error.reason", r.reason.encode()),
        ("error.detail", r.detail.encode("utf-8", "backslashreplace")[:1000]),
        ("error.topic", rec.topic.encode()),
        ("error.partition", str(rec.partition).encode()),
        ("error.offset", str(rec.offset).encode()),
    ]
    if value is not None and len(value) > DEAD_LETTER_MAX_BYTES:
        headers.append(("error.truncated", str(len(value)).encode()))
        value = value[:DEAD_LETTER_KEEP_BYTES]
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY_BYTES:
        headers.append(("error.key_truncated", str(len(key)).encode()))
        key = key[:DEAD_LETTER_MAX_KEY_BYTES]
    return value, key, headers


def _fingerprint(value: bytes) -> bytes:
    """8 bytes of BLAKE2b over the record's bytes. A redelivery from Kafka is byte-identical;
    the same (source, id) with other bytes is dead-lettered, never charged again."""
    return hashlib.blake2b(value, digest_size=8).digest()


def _period_problem(period: str, year: int, month: int) -> str:
    """Why a renewal's ``period`` ("YYYY-MM", its form checked by the contract) cannot be
    billed for an event of ``year``-``month``; "" when it can."""
    ahead = int(period[:4]) * 12 + int(period[5:7]) - (year * 12 + month)
    if ahead > RENEWAL_MONTHS_AHEAD:
        return (
            f"period {period} is {ahead} months after the event's month {year:04d}-{month:02d};"
            f" a renewal may be due at most {RENEWAL_MONTHS_AHEAD} month ahead"
        )
    if -ahead > RENEWAL_MONTHS_BEHIND:
        return (
            f"period {period} is {-ahead} months before the event's month"
            f" {year:04d}-{month:02d}; a renewal may be at most {RENEWAL_MONTHS_BEHIND}"
            " months late"
        )
    return ""


def _future(rec: Record, ev: Any, field: str = "time", value: datetime | None = None) -> Rejected:
    detail = f"{field} {(value or ev.time).isoformat()} is in the future"
    return Rejected(rec, "future_timestamp", detail, ev.type)


def _too_early(rec: Record, ev: Any, field: str, value: datetime) -> Rejected:
    detail = f"{field} {value.isoformat()} is before 2000-01-01"
    return Rejected(rec, "timestamp_out_of_range", detail, ev.type)


def _nul_field(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) in decoded JSON that holds a NUL."""
    if isinstance(value, str):
        return path or "a value" if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if "\x00" in k:
                return f"a key of {path or 'the event'}"
            found = _nul_field(v, here)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_field(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _validation_reason(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False, include_input=False)
    if not errors:
        return "schema", str(exc)[:500]
    first = errors[0]
    if first["type"] == "json_invalid":
        return "not_json", f"not valid JSON: {first['msg']}"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return "unsupported_type", str(first["msg"])[:300]
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}")
    return "schema", "; ".join(parts)[:500]


class MeteringProcessor:
    """Processes one batch of records; the caller commits offsets after ``process`` returns.

    ``process`` raises if any step failed; the caller must then not commit and should re-read
    from the last committed offsets (every step is idempotent, so a replay charges nothing
    twice).
    """

    def __init__(
        self,
        *,
        balances: BalanceStore,
        ledger: Ledger,
        catalog: Catalog,
        producer: Producer,
        rebuild: Callable[[Sequence[str]], Awaitable[list[str]]],
        max_message_bytes: int = 65_536,
        max_call_s: int = 86_400,
        max_clock_skew_s: int = 300,
        clock: Callable[[], float] = time.time,
        call_control: CallControl | None = None,
    ) -> None:
        self._balances = balances
        self._ledger = ledger
        self._catalog = catalog
        self._producer = producer
        self._rebuild = rebuild
        self._max_bytes = max_message_bytes
        self._max_call_s = max_call_s
        self._skew_s = max_clock_skew_s
        self._clock = clock
        # Highest signal seq published per account: with batches overlapping, the outbox
        # read by batch N+1 may still hold what batch N publishes. Losing this map (restart)
        # only means a harmless re-publish, which consumers drop by seq.
        self._published: dict[str, int] = {}
        self._call_control = call_control or CallControl()

    async def process(self, records: Sequence[Record]) -> BatchOutcome:
        """The whole batch: ``finish(await apply(records))``."""
        return await self.finish(await self.apply(records))

    async def apply(self, records: Sequence[Record]) -> Applied:
        """First half: validate, rate, and apply the debits in Redis (idempotent).

        The worker overlaps this with the previous batch's ``finish``: Redis may run ahead of
        the ledger by one batch, which a replay after a crash repairs (see module docstring).
        """
        out = BatchOutcome(records=len(records))
        now = self._clock()
        t0 = time.perf_counter()
        rejected: list[Rejected] = []
        parsed: list[tuple[Record, Chargeable]] = []
        for rec in records:
            r = self._validate(rec, now)
            if type(r) is Rejected:
                rejected.append(r)
            else:
                parsed.append((rec, r))  # type: ignore[arg-type]
        await self._catalog.resolve({ev.subject for _, ev in parsed})
        control: list[tuple[Record, Any]] = []
        numbers: list[tuple[Record, Any]] = []
        side = [(r, ev) for r, ev in parsed if ev.type in _SIDE]
        if side:
            parsed = [(r, ev) for r, ev in parsed if ev.type not in _SIDE]
            for item in side:
                (control if item[1].type in _CONTROL else numbers).append(item)
        charges = self._rate(parsed, rejected, now)
        if numbers:
            charges += self._rate_numbers(numbers, rejected, now, out)
        t1 = time.perf_counter()
        metrics.STAGE_SECONDS.labels("decode_rate").observe(t1 - t0)

        # Live-call updates first: a hangup later in the same batch then closes what they opened.
        control_outbox = await self._control(control, now, rejected) if control else []
        out.call_updates = len(control)
        await self._skip_known_old(charges, now)
        outcomes = await self._apply(charges, now, rejected)
        metrics.STAGE_SECONDS.labels("redis").observe(time.perf_counter() - t1)
        return Applied(out, rejected, charges, outcomes, control_outbox)

    async def _control(
        self, events: list[tuple[Record, Any]], now: float, rejected: list[Rejected]
    ) -> list[tuple[str, PendingSignal]]:
        """call.answered opens billing on the call's reservation (creating one for a call that
        was never authorized, e.g. inbound); call.progress extends it or orders the call
        ended where the credit runs out. Both are idempotent: a replay changes nothing."""
        cc = self._call_control
        now_s = int(now)
        for type_, n in Counter(ev.type for _, ev in events).items():
            metrics.CALL_UPDATES.labels(type_).inc(n)
        opens: list[tuple[str, str, str, Tariff]] = []
        updates: list[tuple[str, str, int, int]] = []
        for rec, ev in events:
            acct = self._catalog.get(ev.subject)
            if acct is None:
                rejected.append(
                    Rejected(rec, "unknown_account", f"no account {ev.subject!r}", ev.type)
                )
                continue
            d = ev.data
            if ev.type == "call.answered":
                try:
                    rate = acct.price_list.voice_rate(
                        d.direction, d.to, int(d.answered_at.timestamp())
                    )
                except NoRate as exc:
                    rejected.append(Rejected(rec, "no_rate_for_destination", str(exc), ev.type))
                    continue
                tariff = Tariff(
                    rate.rate_per_min, rate.connect_fee, rate.initial_s, rate.subsequent_s
                )
                opens.append((ev.subject, d.call_id, d.direction, tariff))
                updates.append((ev.subject, d.call_id, int(d.answered_at.timestamp()), 0))
            else:
                started = int(ev.time.timestamp()) - d.elapsed_s
                updates.append((ev.subject, d.call_id, started, d.elapsed_s))
        kw = {"now_s": now_s, "grant_s": cc.grant_s, "grace_s": cc.grace_s, "max_s": cc.max_s}
        plans = self._plan_periods({u[0] for u in updates}, now_s)
        await self._balances.reserve_many(opens, force=True, plans=plans, **kw)
        results = await self._balances.progress(updates, plans=plans, **kw)
        return [(u[0], s) for u, r in zip(updates, results, strict=True) for s in r.outbox]

    async def finish(self, applied: Applied) -> BatchOutcome:
        """Second half: the ledger write, then dead letters and signals, awaited together.

        When it returns, the batch's offsets may be committed.
        """
        t2 = time.perf_counter()
        out, rejected, charges = applied.outcome, applied.rejected, applied.charges
        fresh: list[UsageRow] = []
        replayed: dict[bytes, UsageRow] = {}
        for c in charges:
            code = c.code
            if code == "n" or code == "d":
                row = (
                    c.event_key,
                    c.account_id,
                    c.kind,
                    -c.applied_amount,
                    c.quantity,
                    c.ref,
                    c.rate_ref,
                    c.time,
                    c.source,
                    c.event_id,
                    c.fingerprint,
                    c.included_s,
                )
                if code == "n":  # Redis marks a second copy in the batch "d": keys are unique
                    fresh.append(row)
                else:
                    replayed[c.event_key] = row
            elif code == "c":
                rejected.append(
                    Rejected(
                        c.record,
                        "duplicate_id_different_payload",
                        f"event ({c.source}, {c.event_id}) was charged before with another payload",
                        c.type,
                    )
                )
        seen: set[tuple[str, int]] = set()
        pending = []
        for a, s in [(o.account_id, s) for o in applied.accounts if o.found for s in o.outbox] + (
            applied.control_outbox
        ):
            if s.seq > self._published.get(a, 0) and (a, s.seq) not in seen:
                seen.add((a, s.seq))
                pending.append((a, s))
        pending.sort(key=lambda p: (p[0], p[1].seq))  # in seq order per account
        signal_rows = [SignalRow(a, s.seq, s.type, s.reason) for a, s in pending]
        for r in fresh:
            replayed.pop(r[0], None)
        already = await self._ledger.write_usage(fresh, list(replayed.values()), signal_rows)
        t3 = time.perf_counter()
        metrics.STAGE_SECONDS.labels("ledger").observe(t3 - t2)

        if already:
            await self._compensate(charges, already, out)
        charged: dict[str, int] = {}
        dups: dict[str, int] = {}
        for c in charges:
            if c.code == "n":
                out.charged += 1
                out.charged_micros += c.applied_amount
                charged[c.type] = charged.get(c.type, 0) + 1
            elif c.code == "d" or c.code == "k":
                out.duplicates += 1
                dups[c.type] = dups.get(c.type, 0) + 1
        for t, n in charged.items():
            metrics.EVENTS_CHARGED.labels(t).inc(n)
        for t, n in dups.items():
            metrics.EVENTS_DUPLICATE.labels(t).inc(n)
        metrics.CHARGED_MICROS.inc(out.charged_micros)

        await self._publish(rejected, pending, out)
        metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - t3)
        return out

    # -- validation and rating -------------------------------------------------------------

    def _validate(self, rec: Record, now: float) -> Rejected | Chargeable:
        """The event to charge (or a live-call update), or why it is rejected."""
        value = rec.value
        if value is None:
            return Rejected(rec, "schema", "empty message (tombstone)")
        if len(value) > self._max_bytes:
            return Rejected(rec, "oversized", f"{len(value)} bytes, the limit is {self._max_bytes}")
        try:
            ev = decode(value)
        except ValidationError as exc:
            reason, detail = _validation_reason(exc)
            return Rejected(rec, reason, detail)
        if b"\\u0000" in value:
            # PostgreSQL text cannot hold NUL, Redis can: one charged in Redis could never
            # reach the ledger. The byte test is cheap; the walk runs only when it matches
            # (it may be an escaped backslash followed by "u0000", which is fine).
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError:  # an integer past 64 bits, which pydantic takes
                doc = json.loads(value)
            where = _nul_field(doc)
            if where is not None:
                return Rejected(
                    rec, "invalid_text", f"{where} holds a NUL character (\\u0000)", ev.type
                )
        allowed = _TOPIC_TYPES.get(rec.topic, {})
        if ev.type not in allowed:
            return Rejected(
                rec, "wrong_topic", f"{ev.type} does not belong on {rec.topic}", ev.type
            )
        if not ev.subject_matches():
            return Rejected(rec, "schema", "subject must equal data.account_id", ev.type)
        if rec.key is not None and rec.key != ev.subject.encode():
            return Rejected(
                rec, "key_mismatch", "the Kafka key must be the account id (partitioning)", ev.type
            )
        if ev.type == "call.progress":
            elapsed = ev.data.elapsed_s  # type: ignore[union-attr]
            if elapsed > self._max_call_s:
                return Rejected(
                    rec,
                    "absurd_duration",
                    f"elapsed_s is {elapsed}, the limit is {self._max_call_s}",
                    ev.type,
                )
        if not allowed[ev.type]:
            # Charged events have their times checked where they are rated (_rate,
            # _rate_numbers), which reads them anyway; these are not rated.
            return self._time_problem(rec, ev, now) or ev  # type: ignore[return-value]  # a live-call update
        if ev.type == "call.hangup":
            d = cast(FastHangup | CallHangup, ev).data.billable_s
            if d < 0:
                return Rejected(rec, "negative_duration", f"billable_s is {d}", ev.type)
            if d > self._max_call_s:
                return Rejected(
                    rec,
                    "absurd_duration",
                    f"billable_s is {d}, the limit is {self._max_call_s}",
                    ev.type,
                )
            if ev.data.ended_at < ev.data.answered_at:  # type: ignore[union-attr]
                return Rejected(rec, "schema", "ended_at is before answered_at", ev.type)
        return ev  # type: ignore[return-value]  # the charged types, by _TOPIC_TYPES

    def _time_problem(self, rec: Record, ev: Any, now: float) -> Rejected | None:
        """For the events that are not rated (their times are checked where rating reads them):
        the event's ``time`` or a call's ``answered_at`` before ``MIN_EVENT_TIME``, or an
        ``answered_at`` after the latest time allowed."""
        if ev.time.timestamp() < MIN_EVENT_TIME:
            return _too_early(rec, ev, "time", ev.time)
        at = getattr(ev.data, "answered_at", None)
        if at is None:
            return None
        if at.timestamp() < MIN_EVENT_TIME:
            return _too_early(rec, ev, "answered_at", at)
        if at.timestamp() > now + self._skew_s:
            return _future(rec, ev, "answered_at", at)
        return None

    def _rate(
        self, parsed: list[tuple[Record, Chargeable]], rejected: list[Rejected], now: float
    ) -> list[Charge]:
        charges: list[Charge] = []
        get = self._catalog.get
        latest = now + self._skew_s
        for rec, ev in parsed:
            epoch = int(ev.time.timestamp())
            if epoch > latest:
                rejected.append(_future(rec, ev))
                continue
            if epoch < MIN_EVENT_TIME:
                rejected.append(_too_early(rec, ev, "time", ev.time))
                continue
            acct = get(ev.subject)
            if acct is None:
                rejected.append(
                    Rejected(rec, "unknown_account", f"no account {ev.subject!r}", ev.type)
                )
                continue
            plist = acct.price_list
            draw: Draw | None = None
            if ev.type == "call.hangup":
                d = cast(FastHangup | CallHangup, ev).data
                # Rated with the versions in force when the call was answered.
                at = int(d.answered_at.timestamp())
                if at < MIN_EVENT_TIME:
                    rejected.append(_too_early(rec, ev, "answered_at", d.answered_at))
                    continue
                if d.ended_at.timestamp() > latest:  # answered_at <= ended_at: checked first
                    rejected.append(_future(rec, ev, "ended_at", d.ended_at))
                    continue
                try:
                    rate = plist.voice_rate(d.direction, d.to, at)
                except NoRate as exc:
                    rejected.append(Rejected(rec, "no_rate_for_destination", str(exc), ev.type))
                    continue
                amount, billed = voice_cost(d.billable_s, rate)
                if billed:  # any account may hold bundle seconds: debit.lua decides the draw
                    draw = (billed, rate.rate_per_min, rate.connect_fee, at)
                kind, qty, ref, call = "call", billed, d.call_id, d.call_id
            else:
                m = cast(FastMessage | MessageSent, ev).data
                amount = plist.rate_message(m.parts, epoch)
                kind, qty, ref, call = "sms", m.parts, m.message_id, ""
            charges.append(
                Charge(
                    rec,
                    ev.type,
                    ev.subject,
                    event_key(ev.source, ev.id),
                    _fingerprint(rec.value),  # type: ignore[arg-type]  # checked in _validate
                    amount,
                    kind,
                    qty,
                    ref,
                    plist.id,
                    ev.time,
                    epoch,
                    epoch // DAY_S,
                    call,
                    ev.source,
                    ev.id,
                    draw=draw,
                )
            )
        return charges

    def _rate_numbers(
        self,
        events: list[tuple[Record, Any]],
        rejected: list[Rejected],
        now: float,
        out: BatchOutcome,
    ) -> list[Charge]:
        """Number fees, one charge per event (the same debit path as calls and messages).

        ``number.activated``: the price list's ``number_setup`` one-time fee if it has one,
        plus the monthly fee of the event's month (UTC), whole whatever the day: a number is
        paid a month at a time, in advance. ``number.renewal_due``: the monthly fee of its
        ``period``. ``number.deactivated``: nothing (the month was paid in advance, nothing is
        refunded), acknowledged. Fees are those in force at the event's time. A price list
        without these fees charges 0: the ledger row still records that the event was
        accounted for, as for a call that billed nothing.
        """
        charges: list[Charge] = []
        latest = now + self._skew_s
        for rec, ev in events:
            epoch = int(ev.time.timestamp())
            if epoch > latest:
                rejected.append(_future(rec, ev))
                continue
            if epoch < MIN_EVENT_TIME:
                rejected.append(_too_early(rec, ev, "time", ev.time))
                continue
            acct = self._catalog.get(ev.subject)
            if acct is None:
                rejected.append(
                    Rejected(rec, "unknown_account", f"no account {ev.subject!r}", ev.type)
                )
                continue
            if ev.type == "number.deactivated":
                out.acknowledged += 1
                metrics.EVENTS_ACKNOWLEDGED.labels(ev.type).inc()
                continue
            plist = acct.price_list
            d: NumberData = ev.data
            utc = datetime.fromtimestamp(epoch, UTC)
            if ev.type == "number.activated":
                fees, amount = ["monthly"], plist.rate_numbers(1, at=epoch)
                try:
                    amount += plist.one_time_fee(NUMBER_SETUP_FEE, at=epoch)
                    fees.insert(0, NUMBER_SETUP_FEE)
                except NoRate:
                    pass  # the price list charges no setup
                period = f"{utc.year:04d}-{utc.month:02d}"
            else:
                period = cast(NumberRenewalDueData, d).period
                problem = _period_problem(period, utc.year, utc.month)
                if problem:
                    rejected.append(Rejected(rec, "bad_period", problem, ev.type))
                    continue
                fees, amount = ["monthly"], plist.rate_numbers(1, at=epoch)
            charges.append(
                Charge(
                    rec,
                    ev.type,
                    ev.subject,
                    event_key(ev.source, ev.id),
                    _fingerprint(rec.value),  # type: ignore[arg-type]  # checked in _validate
                    amount,
                    "fee",
                    1,
                    d.number,
                    f"{plist.id}:{'+'.join(fees)}:{period}",
                    ev.time,
                    epoch,
                    epoch // DAY_S,
                    "",
                    ev.source,
                    ev.id,
                )
            )
        return charges

    # -- Redis -------------------------------------------------------------------------------

    async def _skip_known_old(self, charges: list[Charge], now: float) -> None:
        """Events older than Redis's dedup memory are checked against the ledger first."""
        horizon = now - keys.DEDUP_TRUST_S
        old = [c for c in charges if c.epoch < horizon]
        if not old:
            return
        known = await self._ledger.existing(c.event_key for c in old)
        for c in old:
            if c.event_key in known:
                fp = known[c.event_key]
                c.code = "k" if fp is None or fp == c.fingerprint else "c"

    async def _apply(
        self, charges: list[Charge], now: float, rejected: list[Rejected]
    ) -> list[AccountOutcome]:
        by_account: dict[str, list[Charge]] = {}
        for c in charges:
            if not c.code:
                by_account.setdefault(c.account_id, []).append(c)
        if not by_account:
            return []
        outcomes = await self._apply_groups(by_account, int(now))
        missing = [o.account_id for o in outcomes if not o.found]
        if missing:
            # Redis does not know these accounts (flushed, lost, or created elsewhere):
            # rebuild them from the ledger, then apply their debits.
            loaded = await self._rebuild(missing)
            metrics.ACCOUNTS_REBUILT.inc(len(loaded))
            retry = {a: by_account[a] for a in missing}
            again = await self._apply_groups(retry, int(now))
            outcomes = [o for o in outcomes if o.found] + again
            for o in again:
                if not o.found:
                    for c in retry[o.account_id]:
                        c.code = "x"
                        rejected.append(
                            Rejected(
                                c.record,
                                "unknown_account",
                                f"account {c.account_id!r} has no balance state and none could be "
                                "rebuilt",
                                c.type,
                            )
                        )
        return outcomes

    async def _apply_groups(
        self, by_account: dict[str, list[Charge]], now_s: int
    ) -> list[AccountOutcome]:
        batch = [
            (a, cs) for a, cs in by_account.items()
        ]  # a Charge has what a debit needs: event_key, fingerprint, amount, day, draw
        outcomes = await self._balances.apply_debits(
            batch, now_s, self._plan_periods(by_account, now_s)
        )
        for o in outcomes:
            if not o.found:
                continue
            dups = iter(o.dup_amounts)
            cs = by_account[o.account_id]
            for c, code in zip(cs, o.codes, strict=True):
                c.code = code
                if code == "n":
                    c.applied_amount = c.amount
                elif code == "d":
                    c.applied_amount = next(dups)
            for i, (amount, drawn) in o.draws.items():
                cs[i].applied_amount = amount
                cs[i].included_s = drawn
        return outcomes

    def _plan_periods(self, account_ids: Iterable[str], now_s: int) -> dict[str, PlanPeriod]:
        """Plan allowances once per account per batch: the period is that of processing time
        (debit.lua creates the period's grant from it; reservations count it until then)."""
        period: tuple[int, int] | None = None
        plans: dict[str, PlanPeriod] = {}
        get = self._catalog.get
        for a in account_ids:
            acct = get(a)
            if acct is not None and acct.plan is not None and acct.plan.included_s:
                period = period or month_period(now_s)
                plans[a] = (acct.plan.included_s, *period)
        return plans

    async def _compensate(
        self, charges: list[Charge], already: set[bytes], out: BatchOutcome
    ) -> None:
        """Undo debits Redis applied for events the ledger already had (Redis forgot them):
        the money, and the included seconds the call drew again (back to their grants)."""
        undo = [c for c in charges if c.code == "n" and c.event_key in already]
        await self._balances.credit_many(
            [(c.account_id, "undo:" + c.event_key.hex(), c.applied_amount) for c in undo]
        )
        drew = [c for c in undo if c.included_s and c.draw is not None]
        if drew:
            back = await self._balances.undraw_many(
                [
                    # the draw's last field is the call's answered_at
                    Undraw(c.account_id, c.event_key, c.day, c.included_s, c.draw[3])  # type: ignore[index]
                    for c in drew
                ]
            )
            for c, n in zip(drew, back, strict=True):
                if n < 0:
                    log.error(
                        "%d included seconds drawn again could not be given back: no grant valid"
                        " at the call's answer is left",
                        c.included_s,
                        extra={"account_id": c.account_id, "event_id": c.event_id},
                    )
        for c in undo:
            c.code = "k"
        if undo:
            log.warning(
                "redis re-applied %d events the ledger had (its memory was lost); compensated",
                len(undo),
                extra={"account_id": undo[0].account_id, "event_id": undo[0].event_id},
            )
        metrics.REDIS_DEDUP_MISSES.inc(len(undo))
        out.compensated += len(undo)

    async def dead_letter_unprocessable(self, rec: Record, exc: BaseException) -> BatchOutcome:
        """Dead-letter a record that fails on its own for a reason retrying cannot cure
        (``metering.isolate``), reason ``unprocessable`` with the error as its detail."""
        out = BatchOutcome(records=1)
        detail = f"{type(exc).__name__}: {exc}"
        await self._publish([Rejected(rec, "unprocessable", detail)], [], out)
        return out

    # -- timers ------------------------------------------------------------------------------

    async def relay_outboxes(self) -> int:
        """Publish signals queued outside a batch (operator suspend/resume, live-call updates
        whose batch died before publishing). Returns how many were published."""
        boxes = await self._balances.pending_outboxes()
        if not boxes:
            return 0
        pending = sorted(
            ((a, s) for a, ss in boxes.items() for s in ss), key=lambda p: (p[0], p[1].seq)
        )
        if pending:
            await self._ledger.write_usage(
                [], [], [SignalRow(a, s.seq, s.type, s.reason) for a, s in pending]
            )
            await self._publish([], pending, BatchOutcome())
        await self._balances.clear_outbox_pending(list(boxes))
        return len(pending)

    async def sweep_reservations(self) -> int:
        """Release reservations whose call was never closed. Nothing is charged for them (the
        switch's hangup is the only charge, and a late one is still charged once)."""
        swept = await self._balances.sweep_expired(now_s=int(self._clock()))
        if swept:
            log.warning("released %d reservations whose hangup never came", len(swept))
            metrics.RESERVATIONS_SWEPT.inc(len(swept))
        return len(swept)

    # -- output ------------------------------------------------------------------------------

    async def _publish(
        self,
        rejected: list[Rejected],
        pending: list[tuple[str, PendingSignal]],
        out: BatchOutcome,
    ) -> None:
        futures = []
        for r in rejected:
            value, key, headers = dead_letter(r)
            futures.append(
                await self._producer.send(topics.DEAD_LETTER, value, key, headers=headers)
            )
            out.dead_letters[r.reason] = out.dead_letters.get(r.reason, 0) + 1
            metrics.DEAD_LETTERS.labels(r.reason, r.type).inc()
        at = datetime.now(UTC)
        acks: dict[str, int] = {}
        for account_id, s in pending:
            if s.type == RECHARGE_REQUESTED:
                # Not for telephony: the trigger goes to the recharge worker on its own topic.
                req = recharge_request(account_id, s.seq, s.reason, at)
                futures.append(
                    await self._producer.send(
                        topics.RECHARGE_REQUESTS,
                        req.model_dump_json().encode(),
                        account_id.encode(),
                        headers=[("content-type", b"application/cloudevents+json")],
                    )
                )
                acks[account_id] = max(acks.get(account_id, 0), s.seq)
                self._published[account_id] = max(self._published.get(account_id, 0), s.seq)
                metrics.RECHARGE_TRIGGERS.inc()
                out.signals.append((account_id, s))
                continue
            extra: dict[str, object] = {}
            if s.call_id is not None:
                extra["call_id"] = s.call_id
            if s.terminate_at is not None:
                extra["terminate_at"] = datetime.fromtimestamp(s.terminate_at, UTC)
            sig = make_signal(s.type, account_id, s.seq, s.reason, at, **extra)  # type: ignore[arg-type]
            futures.append(
                await self._producer.send(
                    topics.CONTROL_SIGNALS,
                    sig.model_dump_json().encode(),
                    account_id.encode(),
                    headers=[("content-type", b"application/cloudevents+json")],
                )
            )
            acks[account_id] = max(acks.get(account_id, 0), s.seq)
            self._published[account_id] = max(self._published.get(account_id, 0), s.seq)
            metrics.SIGNALS_PUBLISHED.labels(s.type).inc()
            out.signals.append((account_id, s))
        if futures:
            await asyncio.gather(*futures)
        if len(self._published) > 100_000:
            self._published.clear()
        # Only now are they on the topic: drop them from the outboxes.
        await self._balances.ack_outbox(acks)
