"""Fast decoding of the two event types the hot path charges, with pydantic as the authority.

``contracts.events`` (pydantic) is the contract: it exports the JSON Schema and words every
rejection. Validating with it costs about 5 us an event here, a third of the whole budget of a
100k events/s worker, so ``call.hangup`` and ``message.sent`` are first decoded with msgspec
structs that mirror those models' constraints (about 1.7 us). Anything msgspec does not accept
(another type, a bad event, a form it is stricter about) goes through pydantic, whose answer
stands. ``tests/metering/test_decode.py`` checks the two agree: whatever msgspec accepts, pydantic
accepts with the same values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Final, Literal

import msgspec

from contracts.events import ACCOUNT_ID_PATTERN, InboundEvent, parse_inbound, whole_match

_AccountId = Annotated[str, msgspec.Meta(pattern=whole_match(ACCOUNT_ID_PATTERN))]
_Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Party = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Source = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
_Time = Annotated[datetime, msgspec.Meta(tz=True)]


class HangupData(msgspec.Struct, frozen=True):
    account_id: _AccountId
    call_id: _Ident
    direction: Literal["inbound", "outbound"]
    from_: _Party = msgspec.field(name="from")
    to: _Party
    answered_at: _Time
    ended_at: _Time
    billable_s: int
    hangup_cause: Annotated[str, msgspec.Meta(max_length=128)]
    outbound_profile_id: _Ident | None = None
    connection_id: _Ident | None = None


class MessageData(msgspec.Struct, frozen=True):
    account_id: _AccountId
    message_id: _Ident
    from_: _Party = msgspec.field(name="from")
    to: _Party
    parts: Annotated[int, msgspec.Meta(ge=1, le=255)]


class _Envelope(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    specversion: Literal["1.0"]
    id: _Ident
    source: _Source
    time: _Time
    subject: _AccountId
    datacontenttype: Literal["application/json"] = "application/json"

    def subject_matches(self) -> bool:
        return bool(self.data.account_id == self.subject)  # type: ignore[attr-defined]


class FastHangup(_Envelope, frozen=True, tag="call.hangup"):
    type: ClassVar[str] = "call.hangup"
    data: HangupData


class FastMessage(_Envelope, frozen=True, tag="message.sent"):
    type: ClassVar[str] = "message.sent"
    data: MessageData


_DECODER: Final = msgspec.json.Decoder(FastHangup | FastMessage)


def decode(raw: bytes) -> FastHangup | FastMessage | InboundEvent:
    """Decode one inbound event. Raises ``pydantic.ValidationError`` for a bad one."""
    try:
        ev: FastHangup | FastMessage = _DECODER.decode(raw)
        return ev
    except (msgspec.ValidationError, msgspec.DecodeError):
        return parse_inbound(raw)
