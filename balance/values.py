"""What goes into the balance store and what comes out: its value objects.

Money is in integer micro-units, times in unix seconds, durations in whole seconds. The
``Literal`` types name every state, decision and result a script can answer; the decoders in
``balance.replies`` turn the scripts' bytes into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, Protocol

from contracts.events import Direction

#: An account's real-time state (see the state machine in ``balance/lua``).
AccountStatus = Literal["active", "low", "hold", "suspended"]
ACCOUNT_STATES: Final[tuple[AccountStatus, ...]] = ("active", "low", "hold", "suspended")
#: What an outcome says of an account the store does not know: no status at all.
NoStatus = Literal[""]
#: An operator's (or the payment service's) change of an account's status.
StatusAction = Literal["suspend", "hold", "resume"]
#: An authorization's answer.
ReservationDecision = Literal["allow", "deny"]
#: Why reserve.lua answered as it did: ``ok`` (allowed), one of the contract's deny reasons
#: it can decide, or ``call_closed``: the call_id has already hung up. ``call_closed`` is no
#: deny reason of the contract; ``enforcement.authorize`` answers it as an error (a 409).
ReservationReason = Literal[
    "ok",
    "insufficient_credit",
    "account_on_hold",
    "account_suspended",
    "unknown_account",
    "concurrent_call_limit",
    "call_closed",
]
#: What a call.answered / call.progress did to a call's reservation: ``none`` (no
#: reservation), ``closed`` (the call has hung up), ``ok`` (the grant still covers it),
#: ``extended``, ``terminate`` (a call.terminate was queued now), ``terminating`` (earlier).
ProgressOutcome = Literal["none", "closed", "ok", "extended", "terminate", "terminating"]
#: A minute-bundle grant: ``applied``, ``repeat`` (bought before: nothing changed),
#: ``unknown_account``, ``insufficient_credit`` (refused whole).
GrantResult = Literal["applied", "repeat", "unknown_account", "insufficient_credit"]
#: A number's step (``number.lua``): ``renew`` takes its monthly fee, ``hold`` and ``release``
#: queue their signal.
NumberAction = Literal["renew", "hold", "release"]

#: The outbox entry type of an auto-recharge trigger (not a signal: it goes to the worker).
RECHARGE_REQUESTED: Final = "recharge.requested"


class Draw(NamedTuple):
    """A call's draw on included minutes (``Debit.draw``): its ``billed_s`` seconds, priced at
    ``rate_per_min`` and ``connect_fee`` (micro-units), answered at ``answered_at`` (unix s;
    which grants of the minute bucket it may draw on). A NamedTuple, not a dataclass: one is
    built per charged call on the metering hot path, and ``apply_debits`` packs it whole."""

    billed_s: int
    rate_per_min: int
    connect_fee: int
    answered_at: int


@dataclass(frozen=True, slots=True)
class PlanPeriod:
    """An account's plan allowance for the current period: ``included_s`` seconds from
    ``period_start`` until ``period_end`` (unix seconds).

    ``previous_start`` (0: none) is the start of the period before, which ends at
    ``period_start``: a call answered then and extended or ended now still draws on that
    period's allowance (its grant is created for it if no charge of that period created it),
    for as long as the scripts keep a grant past its end (``rating.plans.GRANT_KEEP_S``)."""

    included_s: int
    period_start: int
    period_end: int
    previous_start: int = 0


@dataclass(frozen=True, slots=True)
class Debit:
    """One charge. ``event_key`` (16 bytes) and ``fingerprint`` (8 bytes) come from the event."""

    def __post_init__(self) -> None:
        if len(self.event_key) != 16 or len(self.fingerprint) != 8 or self.amount < 0:
            raise ValueError("a debit needs a 16-byte key, an 8-byte fingerprint, amount >= 0")

    event_key: bytes
    fingerprint: bytes
    amount: int  # micro-units >= 0
    day: int  # UTC day number of the event's own time (unix seconds // 86400)
    call_id: str = ""  # a hangup's call: its reservation is released with the charge
    #: a call that may draw included seconds (then ``amount`` is what it costs with nothing
    #: drawn); None for a final amount
    draw: Draw | None = None


class DebitLike(Protocol):
    """What ``apply_debits`` reads of a debit (``Debit``, or the processor's own charges)."""

    @property
    def event_key(self) -> bytes: ...
    @property
    def fingerprint(self) -> bytes: ...
    @property
    def amount(self) -> int: ...
    @property
    def day(self) -> int: ...
    @property
    def call_id(self) -> str: ...
    @property
    def draw(self) -> Draw | None: ...


@dataclass(frozen=True, slots=True)
class Credit:
    """One credit of ``credit_many``: ``amount`` micro-units to ``account_id``, once per
    ``credit_id``."""

    account_id: str
    credit_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class Undraw:
    """Seconds an event drew from the account's minute bucket, to give back (once per
    ``event_key``): ``drawn_s`` of the grants valid at ``answered_at`` (unix s); ``day`` is the
    event's UTC day number, as in its ``Debit``."""

    account_id: str
    event_key: bytes
    day: int
    drawn_s: int
    answered_at: int


@dataclass(frozen=True, slots=True)
class PendingSignal:
    seq: int
    type: str
    reason: str
    call_id: str | None = None
    terminate_at: int | None = None  # unix seconds, for call.terminate
    number: str | None = None  # E.164, for number.hold, number.resume, number.release


class Drawn(NamedTuple):
    """What a debit with a ``draw`` cost: ``amount`` micro-units debited, after ``drawn_s``
    seconds drawn from the minute bucket. A NamedTuple: one per such event of a batch."""

    amount: int
    drawn_s: int


class Settled(NamedTuple):
    """A hangup's settlement of its call's provisional charge (``Provisional``): the sweep had
    charged ``charged`` micro-units at ``charged_at`` (unix s); the hangup was debited its own
    amount less that. A NamedTuple: one per such hangup of a batch."""

    charged: int
    charged_at: int


@dataclass(slots=True)
class AccountOutcome:
    """What one account's debits did. ``codes[i]`` is ``n`` new, ``d`` duplicate, ``c`` conflict.
    ``status`` is ``""`` when the account was not found."""

    account_id: str
    found: bool
    balance: int = 0
    status: AccountStatus | NoStatus = ""
    codes: str = ""
    dup_amounts: list[int] = field(default_factory=list)
    outbox: list[PendingSignal] = field(default_factory=list)
    #: event index -> what it cost, for the events (new or duplicate) that drew any seconds;
    #: the others were debited their own ``amount``
    draws: dict[int, Drawn] = field(default_factory=dict)
    #: event index -> the provisional charge its hangup settled (new or duplicate events)
    settled: dict[int, Settled] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    """``result`` of a grant (see ``GrantResult``); ``balance`` in micro-units after it,
    ``status`` ``""`` for an unknown account."""

    result: GrantResult
    balance: int
    status: AccountStatus | NoStatus


@dataclass(frozen=True, slots=True)
class NumberOutcome:
    """A number step's ``result`` (``GrantResult``'s words: ``applied``, ``repeat`` under its
    token, ``unknown_account``, ``insufficient_credit`` for a renewal the available credit
    does not cover), the ``balance`` after it, the account's ``status`` (``""`` unknown), and
    ``recharging``: an auto-recharge trigger is open (a refused renewal may yet be covered)."""

    result: GrantResult
    balance: int
    status: AccountStatus | NoStatus
    recharging: bool


@dataclass(frozen=True, slots=True)
class CreditOutcome:
    """``applied`` False: credited before under this id (or ``found`` False: no such account,
    then ``status`` is ``""``)."""

    applied: bool
    balance: int
    status: AccountStatus | NoStatus
    found: bool = True


@dataclass(frozen=True, slots=True)
class StatusChange:
    """What ``set_status`` did: ``changed`` when a signal was queued (False: the account
    already was so), and the status it has now."""

    changed: bool
    status: AccountStatus


@dataclass(frozen=True, slots=True)
class RechargeState:
    """The auto-recharge part of an account's real-time state: the threshold (micro-units,
    None: off), the seq of the open trigger (None: none open; 0: none, the crossing was a
    refund's, which fires none) and a pinned hold's reason."""

    threshold: int | None
    open_trigger: int | None
    hold_reason: str | None


@dataclass(frozen=True, slots=True)
class AccountState:
    balance: int
    reserved: int
    credit_limit: int
    low_threshold: int
    status: AccountStatus
    seq: int

    @property
    def available(self) -> int:
        return self.balance + self.credit_limit - self.reserved


@dataclass(frozen=True, slots=True)
class NewAccount:
    """An account's real-time state to create if absent: ``create_account``'s arguments as one
    value, for ``create_accounts`` (many in one round trip). Money in micro-units; ``bucket``
    the minute bucket's ``min`` field; ``credited`` credit ids the balance already includes.
    A field added to ``create_account`` must be added here and in ``_new_account_record``
    (``balance/store.py``) too: the rebuild writes through this one."""

    account_id: str
    balance: int
    credit_limit: int
    low_threshold: int
    status: AccountStatus = "active"
    seq: int = 0
    bucket: str = ""
    recharge_threshold: int | None = None
    recharge_trigger: int | None = None
    hold_reason: str | None = None
    credited: tuple[str, ...] = ()
    max_calls: int = 0  # the plan's concurrent-call limit ("mc"); 0: none


@dataclass(frozen=True, slots=True)
class Tariff:
    """The price of a call's time, as a reservation needs it (from ``rating.rating``)."""

    rate_per_min: int
    connect_fee: int = 0
    initial_s: int = 6
    subsequent_s: int = 6


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to an authorization. ``max_duration_s``: what the available credit buys at
    this rate; ``granted_s``: what is reserved now (``reserved`` micro-units)."""

    decision: ReservationDecision
    reason: ReservationReason
    max_duration_s: int
    reserved: int
    granted_s: int
    expires_at: int  # unix seconds; the sweep releases it after this
    #: of ``granted_s``, the seconds held in the minute bucket (``reserved`` covers the rest)
    held_s: int = 0


@dataclass(frozen=True, slots=True)
class ReservationRequest:
    """One call of ``reserve_many``: reserve for ``call_id`` of ``account_id`` at ``tariff``.
    ``direction`` decides whether a hold or no credit bars it (an inbound call still rings)."""

    account_id: str
    call_id: str
    direction: Direction
    tariff: Tariff


@dataclass(frozen=True, slots=True)
class CallProgress:
    """One update of ``progress``: the call ``call_id`` of ``account_id``, answered at
    ``started_at`` (unix s), has lasted ``elapsed_s`` seconds (0 at call.answered)."""

    account_id: str
    call_id: str
    started_at: int
    elapsed_s: int


@dataclass(frozen=True, slots=True)
class Released:
    """A reservation the sweep released: ``amount`` micro-units and ``held_s`` seconds of the
    minute bucket, free again."""

    account_id: str
    call_id: str
    amount: int
    held_s: int


@dataclass(frozen=True, slots=True)
class Provisional:
    """A reservation the sweep charged provisionally (its hangup never came): ``charged``
    micro-units debited from the balance at ``charged_at`` (unix s); its ``held_s`` bucket
    seconds stay held until a late hangup settles the call (or the marker's day ends).
    ``new``: charged by this sweep (False: a retried sweep found the charge already made, and
    its ledger row must be written again, idempotently)."""

    account_id: str
    call_id: str
    charged: int
    held_s: int
    charged_at: int
    new: bool


@dataclass(frozen=True, slots=True)
class Progress:
    """What a call.answered / call.progress did to the call's reservation."""

    outcome: ProgressOutcome
    until: int  # seconds covered after the answer, or terminate_at (unix s) when terminating
    outbox: list[PendingSignal]
