"""Request and response bodies of the enforcement routes (pydantic v2; they are the OpenAPI
schemas; payments' are in ``recharge.routes``). Requests are strict and money leaves as decimal
strings: see ``infra.http.models``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, Field

from contracts.events import AccountId, Direction, Ident, Party
from enforcement.account_admin import Origin
from infra.http.models import Money, RequestBody

# A call_id ends up in Redis hash fields and in '|'-separated outbox entries (call.terminate):
# printable ASCII without spaces or '|'. A SIP Call-ID (``a84b4c76e66710@pc33.example.com``) fits.
CALL_ID_PATTERN: Final = r"^[!-{}~]{1,256}$"
CallId = Annotated[str, Field(pattern=CALL_ID_PATTERN)]
Reason = Literal[
    "ok",
    "insufficient_credit",
    "account_on_hold",
    "account_suspended",
    "unknown_account",
    "no_rate_for_destination",
    "concurrent_call_limit",
]
AccountStatus = Literal["active", "low", "hold", "suspended"]


class AuthorizationIn(RequestBody):
    account_id: AccountId
    call_id: CallId = Field(description="Idempotency key: a retry with it gets the first answer")
    direction: Direction
    from_: Party = Field(alias="from")
    to: Party
    outbound_profile_id: Ident | None = None


class AuthorizationOut(BaseModel):
    decision: Literal["allow", "deny"]
    reason: Reason = Field(description='"ok" when allowed, else why not')
    max_duration_s: int = Field(
        description="Seconds the call may last at most (what the credit buys); 0 when denied"
    )
    reservation_id: str | None = Field(description="null when denied")
    expires_at: AwareDatetime | None = Field(
        description="When the reservation lapses unless call events extend it; null when denied"
    )


class BalanceOut(BaseModel):
    """Money as decimal strings in the account's currency."""

    balance: Money
    pending: Money = Field(description="Credit reserved by calls in progress")
    credit_limit: Money
    available_credit: Money = Field(description="balance + credit_limit - pending")
    currency: str
    status: AccountStatus


class StatusIn(RequestBody):
    reason: Annotated[
        str | None,
        Field(
            pattern=r"^[a-z0-9_]{1,64}$",
            description="A short code recorded with the suspension and sent to telephony with "
            "the signal it causes; default: the caller's origin (tenant, manager, operator)",
        ),
    ] = None


class StatusOut(BaseModel):
    account_id: str
    status: AccountStatus = Field(
        description="What the account is now: suspended while any origin is left; once none "
        "is, on hold while a pinned hold is there, else where its credit puts it"
    )
    changed: bool = Field(
        description="Whether this request changed anything: an origin recorded or lifted, "
        "the pinned hold lifted; false when there was nothing to do"
    )
    suspended_by: list[Origin] = Field(
        description="The origins of the suspension still there (empty: not suspended)"
    )
    hold_reason: str | None = Field(
        description="The hold the service pinned (recharge_cap), which only an operator's "
        "resume or a payment lifts; null when none"
    )


class BundlePurchaseIn(RequestBody):
    bundle_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    #: the caller's idempotency key: the same purchase_id never buys twice
    purchase_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class BundlePurchaseOut(BaseModel):
    account_id: str
    purchase_id: str
    bundle_id: str
    minutes: int
    price: str | None = Field(
        default=None,
        description="money taken from the balance, decimal string; absent for a managed"
        " account, which never sees a price (its balance shows what was taken)",
    )
    valid_from: datetime
    expires_at: datetime
    balance: str
    created: bool = Field(description="false when this purchase_id was bought before")
