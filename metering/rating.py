"""Exact rating in integer micro-units: increments, longest-prefix match, versions in force.

Billed seconds for a duration ``d > 0`` with increments ``initial/subsequent``::

    max(initial, initial + ceil((d - initial) / subsequent) * subsequent)

and ``d == 0`` bills nothing. Cost = connect_fee + rate_per_min * billed / 60, rounded *up* to
the micro-unit. All arithmetic is on ``int``; nothing here ever sees a float.

Outbound rates are versioned per prefix: each ``VoiceRate`` is in force from its
``effective_from`` (unix seconds) until the next version of the same prefix. A call is rated
with the versions in force at its ``answered_at``; a prefix whose first version starts later
did not exist yet, so a shorter prefix may match instead. Inbound, SMS and fees are not
versioned (a new value applies from its import).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

#: Longest prefix we index; E.164 numbers have at most 15 digits.
MAX_PREFIX_LEN: Final = 15
#: Highest rate accepted, micro-units per minute (1000.00/min). Bounds rate * seconds well
#: below 2**53, so the overage computed in debit.lua (Lua numbers are doubles) stays exact.
MAX_RATE_PER_MIN: Final = 1_000_000_000


class NoRate(LookupError):
    """No rate matches the destination: the event cannot be charged (dead letter)."""


@dataclass(frozen=True, slots=True)
class VoiceRate:
    prefix: str
    rate_per_min: int  # micro-units per minute
    connect_fee: int = 0  # micro-units, charged once per answered call with billed time
    initial_s: int = 6
    subsequent_s: int = 6
    effective_from: int = 0  # unix seconds: in force from then until the prefix's next version
    description: str = ""

    def __post_init__(self) -> None:
        if self.initial_s < 1 or self.subsequent_s < 1:
            raise ValueError("billing increments must be at least 1 second")
        if self.rate_per_min < 0 or self.connect_fee < 0:
            raise ValueError("rates cannot be negative")
        if self.rate_per_min > MAX_RATE_PER_MIN:
            raise ValueError(f"rate_per_min above {MAX_RATE_PER_MIN} micro-units")


def billed_seconds(duration_s: int, initial_s: int, subsequent_s: int) -> int:
    """Seconds billed for ``duration_s`` under ``initial/subsequent`` increments."""
    if duration_s < 0:
        raise ValueError("duration cannot be negative")
    if duration_s == 0:
        return 0
    over = duration_s - initial_s
    if over <= 0:
        return initial_s
    return initial_s + -(-over // subsequent_s) * subsequent_s


def time_cost(billed_s: int, rate_per_min: int) -> int:
    """``rate_per_min * billed_s / 60`` in micro-units, rounded up."""
    return -(-rate_per_min * billed_s // 60)


def voice_cost(duration_s: int, rate: VoiceRate) -> tuple[int, int]:
    """``(cost_micros, billed_s)`` of a call; rounds up, never down. 0 s bills nothing at all
    (no connect fee either)."""
    billed = billed_seconds(duration_s, rate.initial_s, rate.subsequent_s)
    if billed == 0:
        return 0, 0
    return rate.connect_fee + -(-rate.rate_per_min * billed // 60), billed


def destination_digits(party: str) -> str:
    """The digits of an E.164 number or a ``sip:+1415...@host`` URI, without the ``+``."""
    if party.startswith("sip:"):
        party = party[4:].split("@", 1)[0]
    digits = party[1:] if party.startswith("+") else party
    return digits if digits.isdigit() else ""


@dataclass(slots=True)
class PriceList:
    """Outbound voice by longest destination prefix (versioned), inbound per minute, SMS per
    part, a monthly fee per number and one-time fees by code. Money in micro-units."""

    id: str
    currency: str
    inbound: VoiceRate
    sms_per_part: int
    #: prefix -> its newest version (the one in force for any time at or after its start)
    outbound: dict[str, VoiceRate] = field(default_factory=dict)
    number_monthly_fee: int = 0
    one_time_fees: dict[str, int] = field(default_factory=dict)
    version: int = 0
    #: prefix -> its older versions, newest first (only prefixes with more than one version)
    _older: dict[str, list[VoiceRate]] = field(default_factory=dict)
    _max_len: int = 0

    def __post_init__(self) -> None:
        self._max_len = max((len(p) for p in self.outbound), default=0)

    def add_outbound(self, rate: VoiceRate) -> None:
        """Add one version of a prefix's rate (any order; same prefix and start replaces)."""
        if not rate.prefix.isdigit() or len(rate.prefix) > MAX_PREFIX_LEN:
            raise ValueError(f"prefix must be 1-{MAX_PREFIX_LEN} digits, got {rate.prefix!r}")
        newest = self.outbound.get(rate.prefix)
        if newest is None or newest.effective_from == rate.effective_from:
            self.outbound[rate.prefix] = rate
        else:
            versions = [newest, *self._older.get(rate.prefix, ()), rate]
            versions = list({v.effective_from: v for v in versions}.values())
            versions.sort(key=lambda v: v.effective_from, reverse=True)
            self.outbound[rate.prefix] = versions[0]
            self._older[rate.prefix] = versions[1:]
        self._max_len = max(self._max_len, len(rate.prefix))

    def versions(self) -> list[VoiceRate]:
        """Every outbound rate version, by prefix then start (what an export writes)."""
        out = [*self.outbound.values()]
        for older in self._older.values():
            out.extend(older)
        out.sort(key=lambda v: (v.prefix, v.effective_from))
        return out

    def outbound_rate(self, to: str, at: int | None = None) -> VoiceRate:
        """The rate in force at ``at`` (unix seconds; default now) for the longest matching
        prefix: at most ``MAX_PREFIX_LEN`` dict probes, and one integer compare per probe
        unless a prefix has versions starting after ``at``."""
        if at is None:
            at = int(time.time())
        digits = destination_digits(to)
        table = self.outbound
        for n in range(min(len(digits), self._max_len), 0, -1):
            rate = table.get(digits[:n])
            if rate is None:
                continue
            if rate.effective_from <= at:
                return rate
            for old in self._older.get(rate.prefix, ()):
                if old.effective_from <= at:
                    return old
            # every version of this prefix starts later: it did not exist yet at ``at``
        raise NoRate(f"no outbound rate for destination {to[:32]!r} in price list {self.id}")

    def voice_rate(self, direction: str, to: str, at: int | None = None) -> VoiceRate:
        return self.inbound if direction == "inbound" else self.outbound_rate(to, at)

    def rate_call(
        self, direction: str, to: str, billable_s: int, at: int | None = None
    ) -> tuple[int, int]:
        """``(cost_micros, billed_s)`` for a finished call answered at ``at`` (unix s)."""
        return voice_cost(billable_s, self.voice_rate(direction, to, at))

    def rate_message(self, parts: int) -> int:
        """Micro-units for a message of ``parts`` parts."""
        return self.sms_per_part * parts

    def rate_numbers(self, count: int = 1) -> int:
        """Micro-units for ``count`` numbers for one month."""
        return self.number_monthly_fee * count

    def one_time_fee(self, code: str) -> int:
        """Micro-units of the one-time fee ``code`` (e.g. ``number_setup``)."""
        try:
            return self.one_time_fees[code]
        except KeyError:
            raise NoRate(f"no one-time fee {code!r} in price list {self.id}") from None
