"""Signals this service publishes on ``billing.control-signals`` (CloudEvents 1.0).

``seq`` is strictly increasing per account, so a consumer can order them and drop stale ones;
a signal may be delivered more than once (at-least-once), never out of ``seq`` order for the
state it describes.
"""

from __future__ import annotations

import typing
from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from contracts.events import ACCOUNT_ID_PATTERN, E164_PATTERN

SignalType = Literal[
    "account.low_balance",
    "account.hold",
    "account.suspend",
    "account.resume",
    "call.terminate",
    "number.hold",
    "number.resume",
    "number.release",
]
SIGNAL_TYPES: Final[tuple[str, ...]] = typing.get_args(SignalType)
SIGNAL_SOURCE: Final = "urn:meter:enforcement"


class SignalData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account_id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)]
    reason: Annotated[str, Field(min_length=1, max_length=128)]
    seq: Annotated[int, Field(ge=1)]
    call_id: str | None = None
    terminate_at: AwareDatetime | None = None
    number: Annotated[str, Field(pattern=E164_PATTERN)] | None = None


class Signal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = SIGNAL_SOURCE
    type: SignalType
    time: AwareDatetime
    subject: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: SignalData


def signal_id(account_id: str, seq: int) -> str:
    """Deterministic, so a re-publish after a crash carries the same CloudEvent id."""
    return f"{account_id}:{seq}"


def make_signal(
    type_: SignalType, account_id: str, seq: int, reason: str, at: datetime, **extra: object
) -> Signal:
    data = SignalData(account_id=account_id, reason=reason, seq=seq, **extra)  # type: ignore[arg-type]
    return Signal(id=signal_id(account_id, seq), type=type_, time=at, subject=account_id, data=data)
