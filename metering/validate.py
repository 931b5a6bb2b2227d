"""The checks a record passes before anything is charged, and the reason each failure is given.

A record that fails one is dead-lettered with a ``Reason`` (``metering.batch``) and a detail,
and never changes a balance. ``Validator.check`` runs once per record on the hot path; the
times of charged events are checked where rating reads them anyway (``metering.rate``,
``metering.numbers``), with ``future`` and ``too_early`` from here, so each time is read once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Final

import orjson
from pydantic import ValidationError

from contracts import topics
from contracts.events import MIN_EVENT_TIME, CallHangup, MessageSent
from metering.batch import Reason, Record, Rejected
from metering.decode import FastHangup, FastMessage, decode

#: An event the hot path charges: decoded by msgspec, or by pydantic when msgspec declined.
Chargeable = FastHangup | FastMessage | CallHangup | MessageSent

CONTROL: Final = frozenset(("call.answered", "call.progress"))
NUMBER: Final = frozenset(("number.activated", "number.renewal_due", "number.deactivated"))
#: Events taken out of a batch before rating, in the one pass that already sorted out the
#: live-call updates: calls and messages pay nothing more for number events existing.
SIDE: Final = CONTROL | NUMBER

#: Which event types belong on which inbound topic, and whether the hot path charges them.
#: True: charged (a debit and a ledger row); False: not a debit of its own (live-call updates
#: act on reservations; number.deactivated is acknowledged: numbers are paid a month ahead).
_TOPIC_TYPES: Final[dict[str, dict[str, bool]]] = {
    topics.CALL_EVENTS: {"call.hangup": True, "call.answered": False, "call.progress": False},
    topics.MESSAGE_EVENTS: {"message.sent": True},
    topics.NUMBER_EVENTS: {
        "number.activated": True,
        "number.renewal_due": True,
        "number.deactivated": False,
    },
}


def future(rec: Record, ev: Any, field: str = "time", value: datetime | None = None) -> Rejected:
    """``future_timestamp``: ``field`` (the event's ``time`` unless given) is after the latest
    time allowed (now + the clock skew allowed)."""
    detail = f"{field} {(value or ev.time).isoformat()} is in the future"
    return Rejected(record=rec, reason="future_timestamp", detail=detail, type=ev.type)


def too_early(rec: Record, ev: Any, field: str, value: datetime) -> Rejected:
    """``timestamp_out_of_range``: ``field`` is before ``MIN_EVENT_TIME``."""
    detail = f"{field} {value.isoformat()} is before 2000-01-01"
    return Rejected(record=rec, reason="timestamp_out_of_range", detail=detail, type=ev.type)


def unknown_account(rec: Record, ev: Any) -> Rejected:
    """``unknown_account``: the catalog has no account for the event's subject."""
    detail = f"no account {ev.subject!r}"
    return Rejected(record=rec, reason="unknown_account", detail=detail, type=ev.type)


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


def _validation_reason(exc: ValidationError) -> tuple[Reason, str]:
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


class Validator:
    """The checks of one processor, with its limits: ``max_message_bytes`` (a record's value),
    ``max_call_s`` (a hangup's ``billable_s``, a progress's ``elapsed_s``) and
    ``max_clock_skew_s`` (how far after now a time may be)."""

    __slots__ = ("_max_bytes", "_max_call_s", "_skew_s")

    def __init__(self, *, max_message_bytes: int, max_call_s: int, max_clock_skew_s: int) -> None:
        self._max_bytes = max_message_bytes
        self._max_call_s = max_call_s
        self._skew_s = max_clock_skew_s

    def check(self, rec: Record, now: float) -> Rejected | Chargeable:
        """The event to charge (or a live-call or number update), or why it is rejected."""
        value = rec.value
        if value is None:
            return Rejected(record=rec, reason="schema", detail="empty message (tombstone)")
        if len(value) > self._max_bytes:
            detail = f"{len(value)} bytes, the limit is {self._max_bytes}"
            return Rejected(record=rec, reason="oversized", detail=detail)
        try:
            ev = decode(value)
        except ValidationError as exc:
            reason, detail = _validation_reason(exc)
            return Rejected(record=rec, reason=reason, detail=detail)
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
                detail = f"{where} holds a NUL character (\\u0000)"
                return Rejected(record=rec, reason="invalid_text", detail=detail, type=ev.type)
        allowed = _TOPIC_TYPES.get(rec.topic, {})
        if ev.type not in allowed:
            detail = f"{ev.type} does not belong on {rec.topic}"
            return Rejected(record=rec, reason="wrong_topic", detail=detail, type=ev.type)
        if not ev.subject_matches():
            detail = "subject must equal data.account_id"
            return Rejected(record=rec, reason="schema", detail=detail, type=ev.type)
        if rec.key is not None and rec.key != ev.subject.encode():
            detail = "the Kafka key must be the account id (partitioning)"
            return Rejected(record=rec, reason="key_mismatch", detail=detail, type=ev.type)
        if ev.type == "call.progress":
            elapsed = ev.data.elapsed_s  # type: ignore[union-attr]
            if elapsed > self._max_call_s:
                detail = f"elapsed_s is {elapsed}, the limit is {self._max_call_s}"
                return Rejected(record=rec, reason="absurd_duration", detail=detail, type=ev.type)
        if not allowed[ev.type]:
            # Charged events have their times checked where they are rated (metering.rate,
            # metering.numbers), which reads them anyway; these are not rated.
            return self._time_problem(rec, ev, now) or ev  # type: ignore[return-value]  # a live-call update
        if ev.type == "call.hangup":
            # no typing.cast here: it is a call per event on the hot path
            d = ev.data.billable_s  # type: ignore[union-attr]
            if d < 0:
                detail = f"billable_s is {d}"
                return Rejected(record=rec, reason="negative_duration", detail=detail, type=ev.type)
            if d > self._max_call_s:
                detail = f"billable_s is {d}, the limit is {self._max_call_s}"
                return Rejected(record=rec, reason="absurd_duration", detail=detail, type=ev.type)
            if ev.data.ended_at < ev.data.answered_at:  # type: ignore[union-attr]
                detail = "ended_at is before answered_at"
                return Rejected(record=rec, reason="schema", detail=detail, type=ev.type)
        return ev  # type: ignore[return-value]  # the charged types, by _TOPIC_TYPES

    def _time_problem(self, rec: Record, ev: Any, now: float) -> Rejected | None:
        """For the events that are not rated (their times are checked where rating reads them):
        the event's ``time`` or a call's ``answered_at`` before ``MIN_EVENT_TIME``, or an
        ``answered_at`` after the latest time allowed."""
        if ev.time.timestamp() < MIN_EVENT_TIME:
            return too_early(rec, ev, "time", ev.time)
        at = getattr(ev.data, "answered_at", None)
        if at is None:
            return None
        if at.timestamp() < MIN_EVENT_TIME:
            return too_early(rec, ev, "answered_at", at)
        if at.timestamp() > now + self._skew_s:
            return future(rec, ev, "answered_at", at)
        return None
