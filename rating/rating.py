"""Exact rating in integer micro-units: increments, longest-prefix match, versions in force.

Billed seconds for a duration ``d > 0`` with increments ``initial/subsequent``::

    max(initial, initial + ceil((d - initial) / subsequent) * subsequent)

and ``d == 0`` bills nothing. Cost = connect_fee + rate_per_min * billed / 60, rounded *up* to
the micro-unit. All arithmetic is on ``int``; nothing here ever sees a float.

Outbound rates are versioned per prefix: each ``VoiceRate`` is in force from its
``effective_from`` (unix seconds) until the next version of the same prefix. A call is rated
with the versions in force at its ``answered_at``; a prefix whose first version starts later
did not exist yet, so a shorter prefix may match instead.

The other prices (inbound voice, SMS per part, the monthly fee per number, one-time fees) are
versioned together: each ``PriceVersion`` carries all of them and is in force from its
``effective_from`` until the list's next one. Calls use the version in force at
``answered_at``, messages and fees the one at the event's time. The first version also covers
any earlier time: these prices have no shorter prefix to fall back on, and an event that
arrives late must still be charged rather than dead-lettered.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from infra.clock import Clock, system_clock

#: Longest prefix we index; E.164 numbers have at most 15 digits.
MAX_PREFIX_LEN: Final = 15
#: Highest rate accepted, micro-units per minute (1000.00/min). Bounds rate * seconds well
#: below 2**53, so the overage computed in debit.lua (Lua numbers are doubles) stays exact.
MAX_RATE_PER_MIN: Final = 1_000_000_000
#: The one-time fee a number's activation charges when the price list defines it.
NUMBER_SETUP_FEE: Final = "number_setup"


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


@dataclass(frozen=True, slots=True)
class PriceVersion:
    """A price list's prices other than outbound voice, in force from ``effective_from`` (unix
    seconds) until the list's next version. Whole: a version answers every price of its period,
    so rating never combines two versions. Money in micro-units."""

    effective_from: int
    inbound: VoiceRate
    sms_per_part: int
    number_monthly_fee: int = 0
    one_time_fees: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sms_per_part < 0 or self.number_monthly_fee < 0:
            raise ValueError("prices cannot be negative")
        if any(a < 0 for a in self.one_time_fees.values()):
            raise ValueError("fees cannot be negative")


@dataclass(slots=True, init=False)
class PriceList:
    """Outbound voice by longest destination prefix (versioned per prefix), and versions of the
    other prices (``PriceVersion``). Money in micro-units."""

    id: str
    currency: str
    #: prefix -> its newest version (the one in force for any time at or after its start)
    outbound: dict[str, VoiceRate]
    version: int
    #: the ``PriceVersion``s by start, oldest first; never empty
    _prices: list[PriceVersion]
    _starts: list[int]
    #: prefix -> its older versions, newest first (only prefixes with more than one version)
    _older: dict[str, list[VoiceRate]]
    _max_len: int
    #: what "now" is when no time is given (``infra.clock``)
    _clock: Clock = field(compare=False, repr=False)

    def __init__(
        self,
        id: str,
        currency: str,
        inbound: VoiceRate,
        sms_per_part: int,
        outbound: dict[str, VoiceRate] | None = None,
        number_monthly_fee: int = 0,
        one_time_fees: Mapping[str, int] | None = None,
        version: int = 0,
        *,
        clock: Clock = system_clock,
    ) -> None:
        """``inbound``, ``sms_per_part``, ``number_monthly_fee`` and ``one_time_fees`` are the
        first ``PriceVersion``, in force from ``inbound.effective_from`` (0: always); later
        ones come from ``add_prices``. ``clock``: the time of the calls given none."""
        self._clock = clock
        self.id = id
        self.currency = currency
        self.outbound = {} if outbound is None else outbound
        self.version = version
        first = PriceVersion(
            inbound.effective_from,
            inbound,
            sms_per_part,
            number_monthly_fee,
            dict(one_time_fees or {}),
        )
        self._prices = [first]
        self._starts = [first.effective_from]
        self._older = {}
        self._max_len = max((len(p) for p in self.outbound), default=0)

    def add_prices(self, prices: PriceVersion) -> None:
        """Add a version of the non-prefix prices (any order; the same start replaces)."""
        i = bisect_left(self._starts, prices.effective_from)
        if i < len(self._starts) and self._starts[i] == prices.effective_from:
            self._prices[i] = prices
        else:
            self._starts.insert(i, prices.effective_from)
            self._prices.insert(i, prices)

    def prices_at(self, at: int | None = None) -> PriceVersion:
        """The ``PriceVersion`` in force at ``at`` (unix seconds; default now); the first one
        for any earlier time. One compare when ``at`` is past the newest start."""
        if at is None:
            at = int(self._clock())
        starts = self._starts
        if at >= starts[-1]:
            return self._prices[-1]
        return self._prices[max(bisect_right(starts, at) - 1, 0)]

    def price_versions(self) -> list[PriceVersion]:
        """Every version of the non-prefix prices, oldest first."""
        return list(self._prices)

    # Callers that only ever price "now" (authorize, tests) read these as before.
    @property
    def inbound(self) -> VoiceRate:
        """The inbound rate in force now."""
        return self.prices_at().inbound

    @property
    def sms_per_part(self) -> int:
        """Micro-units per SMS part in force now."""
        return self.prices_at().sms_per_part

    @property
    def number_monthly_fee(self) -> int:
        """Micro-units per number and month in force now."""
        return self.prices_at().number_monthly_fee

    @property
    def one_time_fees(self) -> Mapping[str, int]:
        """The one-time fees in force now, by code."""
        return self.prices_at().one_time_fees

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
            at = int(self._clock())
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
        """The rate of a call answered at ``at`` (unix s; default now)."""
        if direction == "inbound":
            return self.prices_at(at).inbound
        return self.outbound_rate(to, at)

    def rate_call(
        self, direction: str, to: str, billable_s: int, at: int | None = None
    ) -> tuple[int, int]:
        """``(cost_micros, billed_s)`` for a finished call answered at ``at`` (unix s)."""
        return voice_cost(billable_s, self.voice_rate(direction, to, at))

    def rate_message(self, parts: int, at: int | None = None) -> int:
        """Micro-units for a message of ``parts`` parts sent at ``at`` (unix s; default now)."""
        return self.prices_at(at).sms_per_part * parts

    def rate_numbers(self, count: int = 1, at: int | None = None) -> int:
        """Micro-units for ``count`` numbers for one month, at the price in force at ``at``
        (unix s; default now)."""
        return self.prices_at(at).number_monthly_fee * count

    def one_time_fee(self, code: str, at: int | None = None) -> int:
        """Micro-units of the one-time fee ``code`` (e.g. ``number_setup``) in force at ``at``
        (unix s; default now)."""
        try:
            return self.prices_at(at).one_time_fees[code]
        except KeyError:
            raise NoRate(f"no one-time fee {code!r} in price list {self.id}") from None
