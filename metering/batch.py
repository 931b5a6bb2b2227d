"""What a batch is made of and what it did: records, rejections, charges, outcomes.

The value objects every step of the processor passes along (``metering.processor`` ties the
steps). ``Charge`` is the one built per event on the hot path; it is not frozen on purpose: the
Redis step fills in what Redis did (``code``, ``applied_amount``, ``included_s``) in place, once
per charge, where a frozen copy would cost a second allocation per event (and a frozen
dataclass's ``__init__`` alone costs about 2 us an event, measured).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from balance.values import Draw, PendingSignal, Settled


class Record(Protocol):
    """What the processor reads of a consumed record (aiokafka's ``ConsumerRecord``)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


#: Why a record was dead-lettered: ``error.reason`` on its dead letter and the ``reason`` label
#: of ``meter_dead_letters_total`` (every one is listed in the README and in
#: ``infra.metrics.DEAD_LETTER_REASONS``, which a test holds equal to this).
Reason = Literal[
    "not_json",
    "schema",
    "unsupported_type",
    "wrong_topic",
    "key_mismatch",
    "future_timestamp",
    "timestamp_out_of_range",
    "invalid_text",
    "negative_duration",
    "absurd_duration",
    "unknown_account",
    "no_rate_for_destination",
    "duplicate_id_different_payload",
    "oversized",
    "bad_period",
    "unprocessable",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A record that is dead-lettered, never charged."""

    record: Record
    reason: Reason
    detail: str
    type: str = "unknown"  # the event type, when the record could be read


@dataclass(slots=True, kw_only=True)
class Charge:
    """One event to debit and to write to the ledger (a call, a message or a number fee).

    The fields down to ``event_id`` are what rating decided; the last four are set from Redis
    (see the module docstring for why they are set in place). ``balance.store.apply_debits``
    reads it as a ``DebitLike``: ``event_key``, ``fingerprint``, ``amount``, ``day``,
    ``call_id``, ``draw``.
    """

    record: Record
    type: str
    account_id: str
    event_key: bytes  # infra.ledger.event_key(source, id): 16 bytes
    fingerprint: bytes  # 8 bytes of the record (metering.rate.fingerprint)
    amount: int  # micro-units >= 0, with nothing drawn from included minutes
    kind: str  # the ledger's kind: call, sms, fee
    quantity: int  # billed seconds, message parts, one number
    ref: str  # the call id, the message id, the number
    rate_ref: str  # the price list (and, for a fee, which fees and the month)
    time: datetime
    epoch: int  # the event's time in unix seconds
    day: int  # its UTC day number: the Redis bucket that remembers it
    call_id: str  # a hangup's call (its reservation is released with the charge), else ""
    answered_at: int  # a hangup's answer in unix seconds, else 0
    billing_group: str  # decided at rating (``rating.groups``); "" for none
    direction: str  # a call's, else ""
    from_party: str  # a call's or message's from, else ""
    to_party: str  # a call's or message's to, a number fee's number
    source: str
    event_id: str
    #: a call's draw on the minute bucket (``balance.store.Debit.draw``); None when
    #: ``amount`` is final
    draw: Draw | None = None
    code: str = ""  # set from Redis: n(ew), d(uplicate), c(onflict), k (ledger already has it)
    applied_amount: int = 0
    included_s: int = 0  # set from Redis: seconds drawn from included minutes / bundles
    settled: Settled | None = None  # set from Redis: the provisional charge a hangup settled


#: An account and one signal of its outbox, in the order the processor publishes them.
AccountSignal = tuple[str, PendingSignal]


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
    signals: list[AccountSignal] = field(default_factory=list)
    compensated: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """A batch between its two halves (see ``MeteringProcessor.apply``)."""

    outcome: BatchOutcome
    rejected: list[Rejected]
    charges: list[Charge]
    #: the signals the batch publishes (``metering.publish.Outbox.pending``), and their
    #: sending, started once Redis applied the batch (``Outbox.send``); None: nothing to send
    signals: list[AccountSignal] = field(default_factory=list)
    sent: asyncio.Task[None] | None = None
