"""Payment events this service adds to the contract (CloudEvents 1.0, structured JSON).

- ``billing.recharge-requests`` (key account_id): ``recharge.requested``, written when an
  account's available credit crosses its auto-recharge threshold (decided atomically in the
  balance scripts, once per crossing); read by the recharge worker. ``seq`` is the account's
  signal seq that named the trigger; it is the trigger's identity (a redelivery is harmless).
- ``billing.notifications`` (key account_id): what an operator or the account's admin should
  hear about payments: ``payment.succeeded``, ``payment.declined``, ``payment.failed``,
  ``recharge.refused`` (a rule refused it: ``recharge_cap_reached``, ``payment_limit_exceeded``),
  ``recharge.disabled`` (after repeated declines), ``account.held`` (the 24-hour recharge cap
  was not enough).
"""

from __future__ import annotations

import typing
from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from contracts.events import ACCOUNT_ID_PATTERN
from contracts.money import Micros

PAYMENTS_SOURCE: Final = "urn:meter:payments"

NotificationType = Literal[
    "payment.succeeded",
    "payment.declined",
    "payment.failed",
    "recharge.refused",
    "recharge.disabled",
    "account.held",
    "invoice.issued",
    "invoice.paid",
    "invoice.overdue",
    "invoice.past_due_warning",
]
NOTIFICATION_TYPES: Final[tuple[str, ...]] = typing.get_args(NotificationType)


class RechargeRequestData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account_id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)]
    seq: Annotated[int, Field(ge=1)]
    reason: Annotated[str, Field(min_length=1, max_length=128)]


class RechargeRequested(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = "urn:meter:enforcement"
    type: Literal["recharge.requested"] = "recharge.requested"
    time: AwareDatetime
    subject: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: RechargeRequestData


def recharge_request(account_id: str, seq: int, reason: str, at: datetime) -> RechargeRequested:
    return RechargeRequested(
        id=f"{account_id}:{seq}",
        time=at,
        subject=account_id,
        data=RechargeRequestData(account_id=account_id, seq=seq, reason=reason),
    )


class NotificationData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account_id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)]
    payment_id: str | None = None
    amount: Micros | None = None
    reason: str = ""
    message: str = ""
    invoice_id: str | None = None


class Notification(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = PAYMENTS_SOURCE
    type: NotificationType
    time: AwareDatetime
    subject: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: NotificationData
