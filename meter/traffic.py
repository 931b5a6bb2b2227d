"""Simulated switch traffic: CloudEvents as a telephony switch would publish them.

Used by the demo, the benchmark and the tests. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from balance.accounts import AccountSpec, PriceListSpec, RateSpec
from contracts import topics
from contracts.money import format_money

SOURCE = "urn:switch:sim-1"

# (prefix, description, rate per minute, connect fee, initial/subsequent, weight)
_RATES: list[tuple[str, str, str, str, int, int, int]] = [
    ("1", "United States / Canada", "0.0070", "0", 6, 6, 40),
    ("1800", "US toll free", "0.0000", "0", 6, 6, 3),
    ("44", "United Kingdom", "0.0150", "0", 6, 6, 8),
    ("447", "United Kingdom mobile", "0.0350", "0.0050", 60, 6, 6),
    ("49", "Germany", "0.0180", "0", 6, 6, 6),
    ("4915", "Germany mobile", "0.0550", "0", 6, 6, 4),
    ("33", "France", "0.0160", "0", 1, 1, 5),
    ("91", "India", "0.0450", "0", 6, 6, 6),
    ("52", "Mexico", "0.0250", "0", 60, 60, 5),
    ("5255", "Mexico City", "0.0120", "0", 60, 60, 4),
    ("61", "Australia", "0.0300", "0", 6, 6, 4),
    ("234", "Nigeria", "0.1500", "0.0100", 6, 6, 3),
    ("8816", "Iridium satellite", "4.5000", "0.5000", 60, 60, 1),
]


def demo_price_list(id_: str = "standard") -> PriceListSpec:
    return PriceListSpec(
        id=id_,
        inbound_per_min="0.0035",  # type: ignore[arg-type]  # validated into micro-units
        sms_per_part="0.0040",  # type: ignore[arg-type]
        outbound=[
            RateSpec(
                prefix=p,
                description=d,
                rate_per_min=r,  # type: ignore[arg-type]
                connect_fee=c,  # type: ignore[arg-type]
                initial_s=i,
                subsequent_s=s,
            )
            for p, d, r, c, i, s, _ in _RATES
        ],
    )


def demo_accounts(n: int, rng: random.Random, price_list_id: str = "standard") -> list[AccountSpec]:
    """Mostly healthy balances, some thin ones that will run dry during a demo."""
    specs = []
    for i in range(n):
        thin = i % 10 == 0
        balance = rng.randint(20_000, 300_000) if thin else rng.randint(5_000_000, 200_000_000)
        specs.append(
            AccountSpec.model_validate(
                {
                    "id": f"acc_{i:06d}",
                    "name": f"Customer {i}",
                    "price_list_id": price_list_id,
                    "balance": format_money(balance),
                    "low_balance_threshold": format_money(10_000 if thin else 1_000_000),
                }
            )
        )
    return specs


def call_hangup(
    account_id: str,
    call_id: str,
    to: str,
    billable_s: int,
    *,
    direction: str = "outbound",
    event_id: str | None = None,
    source: str = SOURCE,
    at: datetime | None = None,
) -> dict[str, Any]:
    ended = at or datetime.now(UTC)
    answered = ended - timedelta(seconds=max(billable_s, 0))
    return {
        "specversion": "1.0",
        "id": event_id or f"{call_id}:hangup",
        "source": source,
        "type": "call.hangup",
        "time": ended.isoformat(),
        "subject": account_id,
        "datacontenttype": "application/json",
        "data": {
            "account_id": account_id,
            "call_id": call_id,
            "direction": direction,
            "from": "+14155550100",
            "to": to,
            "answered_at": answered.isoformat(),
            "ended_at": ended.isoformat(),
            "billable_s": billable_s,
            "hangup_cause": "normal_clearing",
        },
    }


def message_sent(
    account_id: str,
    message_id: str,
    to: str,
    parts: int,
    *,
    source: str = SOURCE,
    at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": message_id,
        "source": source,
        "type": "message.sent",
        "time": (at or datetime.now(UTC)).isoformat(),
        "subject": account_id,
        "datacontenttype": "application/json",
        "data": {
            "account_id": account_id,
            "message_id": message_id,
            "from": "+14155550100",
            "to": to,
            "parts": parts,
        },
    }


def number_event(
    type_: str,
    account_id: str,
    number: str,
    *,
    event_id: str | None = None,
    period: str | None = None,
    source: str = "urn:inventory:sim-1",
    at: datetime | None = None,
) -> dict[str, Any]:
    """``number.activated``, ``number.renewal_due`` (give ``period``, "YYYY-MM") or
    ``number.deactivated``, as number inventory publishes them."""
    data: dict[str, Any] = {"account_id": account_id, "number": number}
    if period is not None:
        data["period"] = period
    return {
        "specversion": "1.0",
        "id": event_id or f"{account_id}:{number}:{type_}" + (f":{period}" if period else ""),
        "source": source,
        "type": type_,
        "time": (at or datetime.now(UTC)).isoformat(),
        "subject": account_id,
        "datacontenttype": "application/json",
        "data": data,
    }


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


@dataclass(slots=True)
class Produced:
    """What a generator produced, to reconcile against what was charged."""

    unique_valid: int = 0  # distinct events to charge: one ledger row each
    acknowledged: int = 0  # distinct valid events the hot path charges nothing for (renewals,
    # charged by the numbers worker, and deactivations)
    duplicates: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    #: account -> expected number of distinct charged events
    per_account: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Message:
    topic: str
    key: bytes
    value: bytes
    kind: str  # "valid", "duplicate" or the expected dead-letter reason


class TrafficGenerator:
    """Calls with realistic durations and destinations, some SMS, duplicates and bad events;
    with ``number_share``, number activations, renewals and deactivations too."""

    def __init__(
        self,
        accounts: Sequence[str],
        *,
        seed: int = 7,
        sms_share: float = 0.2,
        duplicate_share: float = 0.02,
        malformed_share: float = 0.002,
        number_share: float = 0.0,
    ) -> None:
        self._rng = random.Random(seed)
        self._accounts = list(accounts)
        self._sms = sms_share
        self._numbers = number_share
        self._dup = duplicate_share
        self._bad = malformed_share
        self._n = 0
        self._recent: list[Message] = []
        self._prefixes = [p for p, *_ in _RATES]
        self._weights = [w for *_, w in _RATES]
        self.produced = Produced()

    def _destination(self) -> str:
        prefix = self._rng.choices(self._prefixes, self._weights)[0]
        return "+" + prefix + "".join(self._rng.choices("0123456789", k=11 - len(prefix)))

    def _duration(self) -> int:
        if self._rng.random() < 0.15:
            return 0  # answered then dropped, or voicemail hang-up: bills nothing
        return min(int(self._rng.lognormvariate(4.2, 1.0)), 7200)

    def next(self) -> Message:
        self._n += 1
        r = self._rng.random()
        if r < self._bad:
            return self._malformed()
        if r < self._bad + self._dup and self._recent:
            m = self._rng.choice(self._recent)
            self.produced.duplicates += 1
            return Message(m.topic, m.key, m.value, "duplicate")
        account = self._rng.choice(self._accounts)
        # Drawn only when asked for, so the default traffic of a seed stays what it was.
        if self._numbers and self._rng.random() < self._numbers:
            return self._number_event(account)
        if self._rng.random() < self._sms:
            ev = message_sent(
                account, f"msg-{self._n}", self._destination(), self._rng.choice((1, 1, 1, 2, 3))
            )
            topic = topics.MESSAGE_EVENTS
        else:
            ev = call_hangup(account, f"call-{self._n}", self._destination(), self._duration())
            topic = topics.CALL_EVENTS
        msg = Message(topic, account.encode(), encode(ev), "valid")
        self.produced.unique_valid += 1
        self.produced.per_account[account] += 1
        if len(self._recent) < 1000:
            self._recent.append(msg)
        else:
            self._recent[self._rng.randrange(1000)] = msg
        return msg

    def _number_event(self, account: str) -> Message:
        type_ = self._rng.choice(
            ("number.activated", "number.renewal_due", "number.renewal_due", "number.deactivated")
        )
        at = datetime.now(UTC)
        period = f"{at.year:04d}-{at.month:02d}" if type_ == "number.renewal_due" else None
        number = f"+1555{self._rng.randrange(10_000_000):07d}"
        ev = number_event(type_, account, number, event_id=f"num-{self._n}", period=period, at=at)
        msg = Message(topics.NUMBER_EVENTS, account.encode(), encode(ev), "valid")
        if type_ != "number.activated":
            # A renewal is the numbers worker's (meter run billing), a deactivation charges
            # nothing: the metering workers take both without a ledger row.
            self.produced.acknowledged += 1
        else:
            self.produced.unique_valid += 1
            self.produced.per_account[account] += 1
        if len(self._recent) < 1000:  # so that some are re-published, as usage is
            self._recent.append(msg)
        else:
            self._recent[self._rng.randrange(1000)] = msg
        return msg

    def _malformed(self) -> Message:
        account = self._rng.choice(self._accounts)
        kind = self._rng.choice(
            [
                "not_json",
                "schema",
                "negative_duration",
                "absurd_duration",
                "unknown_account",
                "duplicate_id_different_payload",
                "oversized",
            ]
        )
        n = self._n
        ev = call_hangup(account, f"bad-{n}", "+14155550123", 60)
        value: bytes
        if kind == "not_json":
            value = b"\x00\x01 this is not json {"
        elif kind == "schema":
            del ev["data"]["call_id"]
            value = encode(ev)
        elif kind == "negative_duration":
            ev["data"]["billable_s"] = -5
            value = encode(ev)
        elif kind == "absurd_duration":
            ev["data"]["billable_s"] = 10_000_000
            value = encode(ev)
        elif kind == "unknown_account":
            ghost = f"ghost_{n}"
            ev = call_hangup(ghost, f"bad-{n}", "+14155550123", 60)
            account = ghost
            value = encode(ev)
        elif kind == "duplicate_id_different_payload":
            if not self._recent:
                return self.next()
            # Number events have no count to change: only calls and messages are altered.
            usage = [m for m in self._recent if m.topic == topics.CALL_EVENTS] or [
                m for m in self._recent if m.topic == topics.MESSAGE_EVENTS
            ]
            if not usage:
                return self.next()
            m = self._rng.choice(usage)
            orig = orjson.loads(m.value)
            if orig["type"] == "call.hangup":
                orig["data"]["billable_s"] += 7
            else:
                orig["data"]["parts"] += 1
            self.produced.malformed[kind] += 1
            return Message(m.topic, m.key, encode(orig), kind)
        else:
            ev["data"]["hangup_cause"] = "x"
            ev["padding"] = "x" * 70_000
            value = encode(ev)
        self.produced.malformed[kind] += 1
        return Message(topics.CALL_EVENTS, account.encode(), value, kind)
