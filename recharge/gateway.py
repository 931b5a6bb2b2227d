"""The payment-gateway seam: what the recharge worker and the payments API need of a card processor.

Exceptions (what the caller may conclude)::

    GatewayError                    the gateway could not give an answer
    ├── GatewayUnavailable          definitely not charged (refused before it reached the
    │                               processor: connection refused, 4xx other than a decline)
    └── OutcomeUnknown              may have been charged (timeout, 5xx, connection lost after
                                    sending): retry with the SAME idempotency key, never a new one

A decline is not an exception: it is a ``ChargeResult`` with ``status == "declined"``; the card
was definitely not charged. For a refund, ``GatewayUnavailable`` also covers a refund the
processor refused as a request (more than is left to refund on the charge, no such charge):
definitely not refunded; ``OutcomeUnknown`` means it may have been.

Money crosses this seam in integer micro-units; gateways that work in cents (Stripe) refuse an
amount that is not a whole number of cents rather than round it (see ``to_cents``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from contracts.money import Micros

MICROS_PER_CENT = 10_000
#: The card expiry years kept (the table's CHECK says the same: migration 0019).
MIN_EXP_YEAR = 2000
MAX_EXP_YEAR = 2199
#: Stripe's longest idempotency key; ``idempotency_key`` stays under it.
MAX_KEY_LENGTH = 255


class GatewayError(Exception):
    """The gateway gave no usable answer."""


class GatewayUnavailable(GatewayError):
    """Definitely not charged: the request never reached the processor or was refused as a
    request (not as a card decline)."""


class OutcomeUnknown(GatewayError):
    """May have been charged: retry with the same idempotency key to learn the outcome."""


def to_cents(amount: Micros) -> int:
    """Micro-units to cents; an amount that is not a whole number of cents is a bug upstream
    (policy rounds charges up to the cent), so it is refused, never rounded here."""
    if amount <= 0 or amount % MICROS_PER_CENT:
        raise ValueError(f"amount {amount} micro-units is not a positive whole number of cents")
    return amount // MICROS_PER_CENT


def idempotency_key(account_id: str, payment_id: str) -> str:
    """The key an account's payment is charged with: ``<account_id>/<payment_id>``.

    A payment id is the account's own (a client's idempotency key), so two accounts' payments
    of one id must be two charges. ``/`` is in neither id's alphabet (``[A-Za-z0-9_.:-]``), so
    no two pairs make one key, and none is a bare payment id (the key of payments made before
    ids were scoped, migration 0009). At most 64 + 1 + 128 = 193 characters."""
    key = f"{account_id}/{payment_id}"
    if len(key) > MAX_KEY_LENGTH or "/" in account_id or "/" in payment_id:
        # the tables' CHECKs forbid both: a key that could collide is never sent
        raise ValueError(f"no idempotency key for payment {payment_id!r} of {account_id!r}")
    return key


def refund_key(account_id: str, refund_id: str) -> str:
    """The key an account's refund is sent with: ``<account_id>/refund/<refund_id>``. Scoped
    to the account like ``idempotency_key``, and never one of its keys: those have one ``/``,
    this two (``/`` is in no id's alphabet), so a refund id equal to a payment id is no
    replay of that payment's charge. At most 64 + 8 + 64 = 136 characters."""
    key = f"{account_id}/refund/{refund_id}"
    if len(key) > MAX_KEY_LENGTH or "/" in account_id or "/" in refund_id:
        raise ValueError(f"no idempotency key for refund {refund_id!r} of {account_id!r}")
    return key


@dataclass(frozen=True, slots=True)
class SavedMethod:
    """A payment method saved for off-session charges."""

    customer_ref: str  # the gateway's customer (Stripe: cus_...)
    method_ref: str  # the gateway's payment method (Stripe: pm_...)
    brand: str  # "visa", ...; "" when the gateway does not say
    last4: str  # "" when the gateway does not say
    exp_month: int = 0  # 1 to 12; 0 when the gateway does not say
    exp_year: int = 0  # four digits; 0 when the gateway does not say

    def expires(self) -> tuple[int, int] | None:
        """``(year, month)`` of the card's last valid month, or None when not known."""
        if 1 <= self.exp_month <= 12 and MIN_EXP_YEAR <= self.exp_year <= MAX_EXP_YEAR:
            return self.exp_year, self.exp_month
        return None


def expiry_of(month: object, year: object) -> tuple[int, int]:
    """A gateway's ``exp_month`` and ``exp_year`` as kept, or ``(0, 0)`` for anything that is
    not a plausible month and four-digit year: what a gateway sends is not trusted."""
    if (
        isinstance(month, int)
        and isinstance(year, int)
        and not isinstance(month, bool)
        and not isinstance(year, bool)
        and 1 <= month <= 12
        and MIN_EXP_YEAR <= year <= MAX_EXP_YEAR
    ):
        return month, year
    return 0, 0


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    account_id: str
    amount: Micros  # a whole number of cents, > 0
    currency: str  # ISO 4217, e.g. "USD"
    customer_ref: str
    method_ref: str
    idempotency_key: str  # one per payment (``idempotency_key``); the same on every retry of it
    description: str


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: Literal["succeeded", "declined"]
    captured: Micros  # what was captured: the amount on success, 0 on a decline
    gateway_ref: str  # the gateway's id for the attempt (Stripe: pi_...), "" if none was made
    decline_code: str  # "" on success; e.g. "generic_decline", "insufficient_funds"
    message: str  # human-readable, safe to show the account's admin


@dataclass(frozen=True, slots=True)
class RefundRequest:
    account_id: str
    charge_ref: str  # the gateway's id of the captured charge (Stripe: pi_...)
    amount: Micros  # a whole number of cents, > 0, at most what is left to refund on it
    currency: str  # ISO 4217, the charge's
    idempotency_key: str  # one per refund (``refund_key``); the same on every retry of it
    reason: str  # the operator's words, kept with the refund at the gateway


@dataclass(frozen=True, slots=True)
class RefundResult:
    """``succeeded``: the processor took the refund (Stripe's ``succeeded``, or ``pending``:
    accepted, on its way to the card); ``failed``: it did not (Stripe's ``failed`` or
    ``canceled``), nothing was given back."""

    status: Literal["succeeded", "failed"]
    refunded: Micros  # what goes back to the card: the amount on success, 0 on failure
    gateway_ref: str  # the gateway's id for the refund (Stripe: re_...)
    gateway_status: str  # the processor's own word ("succeeded", "pending", "failed", ...)
    message: str


class PaymentGateway(Protocol):
    """A card processor. Every method may raise ``GatewayError`` (see the module docstring)."""

    name: str  # "stripe", "sandbox"; recorded with each payment

    async def save_method(self, account_id: str, method_token: str) -> SavedMethod:
        """Create the account's customer if needed and attach ``method_token`` (Stripe: a
        PaymentMethod id such as ``pm_card_visa``) for off-session use. Raises
        ``GatewayUnavailable`` when the token is refused."""
        ...

    async def delete_method(self, method: SavedMethod) -> None:
        """Detach the method; it can no longer be charged."""
        ...

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        """Charge the saved method off-session and capture at once. Idempotent on
        ``request.idempotency_key``: a retry with the same key never charges twice and answers
        what the first call did."""
        ...

    async def refund(self, request: RefundRequest) -> RefundResult:
        """Give ``request.amount`` of a captured charge back to its card. Idempotent on
        ``request.idempotency_key``: a retry with the same key never refunds twice and answers
        what the first call did. More than is left to refund on the charge is refused
        (``GatewayUnavailable``)."""
        ...

    async def close(self) -> None: ...
