"""A simple price list and exact rating in integer micro-units.

Kept deliberately small: the full rating engine (versioned price lists, plans, bundles) replaces
this module behind the same ``PriceList.rate_*`` calls.

Billed seconds for a duration ``d > 0`` with increments ``initial/subsequent``::

    max(initial, initial + ceil((d - initial) / subsequent) * subsequent)

and ``d == 0`` bills nothing. Cost = connect_fee + rate_per_min * billed / 60, rounded *up* to
the micro-unit. All arithmetic is on ``int``; nothing here ever sees a float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

#: Longest prefix we index; E.164 numbers have at most 15 digits.
MAX_PREFIX_LEN: Final = 15


class NoRate(LookupError):
    """No rate matches the destination: the event cannot be charged (dead letter)."""


@dataclass(frozen=True, slots=True)
class VoiceRate:
    prefix: str
    rate_per_min: int  # micro-units per minute
    connect_fee: int = 0  # micro-units, charged once per answered call with billed time
    initial_s: int = 6
    subsequent_s: int = 6

    def __post_init__(self) -> None:
        if self.initial_s < 1 or self.subsequent_s < 1:
            raise ValueError("billing increments must be at least 1 second")
        if self.rate_per_min < 0 or self.connect_fee < 0:
            raise ValueError("rates cannot be negative")


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


def voice_cost(duration_s: int, rate: VoiceRate) -> tuple[int, int]:
    """``(cost_micros, billed_s)`` of a call; rounds up, never down."""
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
    """Outbound voice by longest destination prefix, inbound per minute, SMS per part."""

    id: str
    currency: str
    inbound: VoiceRate
    sms_per_part: int
    outbound: dict[str, VoiceRate] = field(default_factory=dict)
    _max_len: int = 0

    def __post_init__(self) -> None:
        self._max_len = max((len(p) for p in self.outbound), default=0)

    def add_outbound(self, rate: VoiceRate) -> None:
        if not rate.prefix.isdigit() or len(rate.prefix) > MAX_PREFIX_LEN:
            raise ValueError(f"prefix must be 1-{MAX_PREFIX_LEN} digits, got {rate.prefix!r}")
        self.outbound[rate.prefix] = rate
        self._max_len = max(self._max_len, len(rate.prefix))

    def outbound_rate(self, to: str) -> VoiceRate:
        """Longest-prefix match: at most ``MAX_PREFIX_LEN`` dict probes."""
        digits = destination_digits(to)
        table = self.outbound
        for n in range(min(len(digits), self._max_len), 0, -1):
            rate = table.get(digits[:n])
            if rate is not None:
                return rate
        raise NoRate(f"no outbound rate for destination {to[:32]!r} in price list {self.id}")

    def rate_call(self, direction: str, to: str, billable_s: int) -> tuple[int, int]:
        """``(cost_micros, billed_s)`` for a finished call."""
        rate = self.inbound if direction == "inbound" else self.outbound_rate(to)
        return voice_cost(billable_s, rate)

    def rate_message(self, parts: int) -> int:
        return self.sms_per_part * parts
