"""Request and response bodies of the HTTP API (pydantic v2; they are the OpenAPI schemas).

Requests are strict: a count must be a JSON integer, a string a JSON string, and unknown fields
are refused (422), because a misspelt optional field would otherwise be dropped unnoticed and
the caller is there to read the error. Money leaves as decimal strings (``contracts.money``),
timestamps as RFC 3339 with an offset (``Z`` for UTC).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from contracts.events import AccountId, Direction, Ident, Party
from contracts.money import Micros

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
]
AccountStatus = Literal["active", "low", "hold", "suspended"]
#: Money in an answer: ``contracts.money.format_money`` of micro-units, e.g. ``"12.50"``.
Money = Annotated[str, Field(pattern=r"^-?\d{1,15}\.\d{2,6}$", examples=["12.50"])]


class _In(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class AuthorizationIn(_In):
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


class StatusIn(_In):
    reason: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")] = "operator"


class StatusOut(BaseModel):
    account_id: str
    status: AccountStatus
    changed: bool = Field(description="false when the account already was so")


class BundlePurchaseIn(_In):
    bundle_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    #: the caller's idempotency key: the same purchase_id never buys twice
    purchase_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class BundlePurchaseOut(BaseModel):
    account_id: str
    purchase_id: str
    bundle_id: str
    minutes: int
    price: str = Field(description="money taken from the balance, decimal string")
    valid_from: datetime
    expires_at: datetime
    balance: str
    created: bool = Field(description="false when this purchase_id was bought before")


# --- payments (issue 5) -------------------------------------------------------------------------


class AutoRechargeIn(_In):
    enabled: bool
    threshold_amount: Annotated[
        Micros, Field(ge=0, description="Recharge when available credit falls to or below this")
    ]
    recharge_amount: Annotated[
        Micros,
        Field(
            ge=10_000_000,
            description="The balance is brought up to threshold_amount + recharge_amount; "
            "at least 10.00",
        ),
    ]


class AutoRechargeOut(BaseModel):
    account_id: str
    enabled: bool
    threshold_amount: Money
    recharge_amount: Money
    disabled_reason: str | None = Field(
        None, description="Why the service turned it off (e.g. repeated_declines); null if not"
    )


class PaymentMethodIn(_In):
    token: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_]{1,255}$",
            description="The gateway's payment method (Stripe: pm_..., e.g. pm_card_visa)",
        ),
    ]


class PaymentMethodOut(BaseModel):
    account_id: str
    gateway: str
    brand: str
    last4: str
    method_ref: str


class PaymentIn(_In):
    amount: Annotated[Micros, Field(description="Whole cents, at least 10.00")]
    payment_id: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
            description="Idempotency key: a retry with it never charges twice",
        ),
    ]
    payment_method: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,255}$")] | None = Field(
        None, description="The saved method's method_ref; the saved one when omitted"
    )


class PaymentOut(BaseModel):
    id: str
    account_id: str
    kind: Literal["auto", "manual"] = Field(description="auto: an auto-recharge; manual: a top-up")
    paid_for: str = Field(description='What it paid: "auto_recharge" or "top_up"')
    amount: Money = Field(description="What was asked of the card")
    captured: Money = Field(description="What the card paid, and what was credited")
    currency: str
    status: Literal["pending", "succeeded", "declined", "failed", "refused"]
    reason: str = Field(description="Decline code, refusal rule or failure; empty on success")
    message: str
    method: str = Field(description='e.g. "visa 4242"')
    created_at: datetime
    credited: bool = Field(description="The balance has the captured amount")


class PaymentsOut(BaseModel):
    account_id: str
    payments: list[PaymentOut]
