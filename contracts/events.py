"""Inbound CloudEvents 1.0 (structured JSON mode) and their ``data`` payloads.

Every inbound message is one envelope; ``type`` selects the payload model. ``(source, id)`` is
the idempotency key. Validation is strict: a count must be a JSON integer, never ``"12"`` or
``12.0``. Unknown extra fields are ignored (CloudEvents extensions, newer producers).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

ACCOUNT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


def whole_match(pattern: str) -> str:
    """``pattern`` (``^...$``) for msgspec, which matches with Python's ``re.search``: there
    ``$`` also matches before a final newline, where pydantic's does not; ``\\Z`` is the end for
    both. A msgspec mirror of a pydantic model must never accept what the model refuses."""
    if not pattern.endswith("$"):
        raise ValueError(f"not anchored at its end: {pattern!r}")
    return pattern[:-1] + r"\Z"


E164_PATTERN: Final = r"^\+[1-9][0-9]{1,14}$"
#: The earliest time an event, or a time inside one, may carry: 2000-01-01T00:00:00Z. Nothing
#: this service bills happened before it; an earlier stamp is a broken producer clock (a unix
#: time of 0, a year of 0001), and would otherwise become a negative day, a negative answered_at
#: or a billing month in 1969 downstream.
MIN_EVENT_TIME: Final = 946_684_800

AccountId = Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)]
E164 = Annotated[str, Field(pattern=E164_PATTERN)]
# Call parties may be E.164, a SIP URI or "anonymous": rating reads the digits it needs.
Party = Annotated[str, Field(min_length=1, max_length=256)]
Ident = Annotated[str, Field(min_length=1, max_length=256)]
Direction = Literal["inbound", "outbound"]


class _Data(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, populate_by_name=True)

    account_id: AccountId


class CallAnsweredData(_Data):
    call_id: Ident
    direction: Direction
    from_: Party = Field(alias="from")
    to: Party
    answered_at: AwareDatetime
    outbound_profile_id: Ident | None = None
    connection_id: Ident | None = None


class CallProgressData(_Data):
    call_id: Ident
    elapsed_s: int = Field(ge=0)


class CallHangupData(_Data):
    """The charge of a call. ``billable_s`` is checked by the processor, not here, so that a
    negative or absurd duration gets its own dead-letter reason rather than ``schema``."""

    call_id: Ident
    direction: Direction
    from_: Party = Field(alias="from")
    to: Party
    answered_at: AwareDatetime
    ended_at: AwareDatetime
    billable_s: int
    hangup_cause: Annotated[str, Field(max_length=128)]
    outbound_profile_id: Ident | None = None
    connection_id: Ident | None = None


class MessageSentData(_Data):
    message_id: Ident
    from_: Party = Field(alias="from")
    to: Party
    parts: int = Field(ge=1, le=255)


class NumberData(_Data):
    number: E164
    billing_group_id: Ident | None = None


class NumberRenewalDueData(NumberData):
    period: Annotated[str, Field(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")]


class _Envelope(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    specversion: Literal["1.0"]
    id: Ident
    source: Annotated[str, Field(min_length=1, max_length=512)]
    time: AwareDatetime
    subject: AccountId
    datacontenttype: Literal["application/json"] = "application/json"

    def subject_matches(self) -> bool:
        """The contract requires ``subject == data.account_id``; checked by consumers (kept
        out of validation so the hot path validates in one pass without Python callbacks)."""
        data: Any = getattr(self, "data", None)
        return data is None or bool(data.account_id == self.subject)


class CallAnswered(_Envelope):
    type: Literal["call.answered"]
    data: CallAnsweredData


class CallProgress(_Envelope):
    type: Literal["call.progress"]
    data: CallProgressData


class CallHangup(_Envelope):
    type: Literal["call.hangup"]
    data: CallHangupData


class MessageSent(_Envelope):
    type: Literal["message.sent"]
    data: MessageSentData


class NumberActivated(_Envelope):
    type: Literal["number.activated"]
    data: NumberData


class NumberRenewalDue(_Envelope):
    type: Literal["number.renewal_due"]
    data: NumberRenewalDueData


class NumberDeactivated(_Envelope):
    type: Literal["number.deactivated"]
    data: NumberData


InboundEvent = Annotated[
    CallAnswered
    | CallProgress
    | CallHangup
    | MessageSent
    | NumberActivated
    | NumberRenewalDue
    | NumberDeactivated,
    Field(discriminator="type"),
]

#: Validates raw message bytes straight into the right envelope class (one pass, in Rust).
INBOUND_ADAPTER: Final[TypeAdapter[InboundEvent]] = TypeAdapter(InboundEvent)

INBOUND_TYPES: Final = frozenset(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in (
        CallAnswered,
        CallProgress,
        CallHangup,
        MessageSent,
        NumberActivated,
        NumberRenewalDue,
        NumberDeactivated,
    )
)


def parse_inbound(raw: bytes | str) -> InboundEvent:
    """Validate one message. Raises ``pydantic.ValidationError`` (bad JSON included)."""
    return INBOUND_ADAPTER.validate_json(raw)


def rfc3339(ts: datetime) -> str:
    """RFC 3339 with an offset, as the contract requires for every timestamp."""
    return ts.isoformat().replace("+00:00", "Z")


#: How far a renewal's ``period`` may be from the month of the event's own time. Inventory
#: announces a renewal at most a month ahead, and may catch up on a year's backlog after an
#: outage; anything further is a producer bug (a swapped year, "0000-01"), not a month to bill.
RENEWAL_MONTHS_AHEAD: Final = 1
RENEWAL_MONTHS_BEHIND: Final = 12


def period_problem(period: str, year: int, month: int) -> str:
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
