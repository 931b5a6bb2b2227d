"""An in-process payment gateway for the demo and tests: no network, no keys.

It answers like Stripe does for its documented test payment methods (``pm_card_visa``,
``pm_card_chargeDeclined``, ...), so a demo that runs against the sandbox behaves the same when
pointed at Stripe's test mode. Ids look like Stripe's so nothing downstream can tell them apart.

Refunds are checked against the charges this process made (never more than is left on one);
a charge another process made is taken at the caller's word, as the service caps refunds in
PostgreSQL before it asks.

State (customers, detached methods, idempotency keys) is per process, as nothing else is shared
with a sandbox. A saved method's id names its test card (``pm_card_visa__<random>``), so a
method saved by one process (the API) can be charged by another (the recharge worker).
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from contracts.money import Micros
from recharge.gateway import (
    MICROS_PER_CENT,
    ChargeRequest,
    ChargeResult,
    GatewayUnavailable,
    OutcomeUnknown,
    PaymentGateway,
    RefundRequest,
    RefundResult,
    SavedMethod,
    to_cents,
)


@dataclass(frozen=True, slots=True)
class _TestCard:
    brand: str
    last4: str
    decline_code: str  # "" when a charge succeeds
    message: str
    # Stripe's test cards take any future date; these are the fake Stripe's (tests/stripe_fake).
    exp_month: int = 12
    exp_year: int = 2034


_SUCCEEDS = "Payment succeeded."

# Stripe's test PaymentMethods and the card numbers behind them (docs.stripe.com/testing).
TEST_CARDS: dict[str, _TestCard] = {
    "pm_card_visa": _TestCard("visa", "4242", "", _SUCCEEDS),
    "pm_card_mastercard": _TestCard("mastercard", "4444", "", _SUCCEEDS),
    "pm_card_chargeDeclined": _TestCard(
        "visa", "0002", "generic_decline", "Your card was declined."
    ),
    "pm_card_chargeDeclinedInsufficientFunds": _TestCard(
        "visa", "9995", "insufficient_funds", "Your card has insufficient funds."
    ),
    "pm_card_authenticationRequired": _TestCard(
        "visa",
        "3184",
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    ),
}

_ID_ALPHABET = string.ascii_letters + string.digits


def _new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


@dataclass(slots=True)
class _Method:
    customer: str
    card: _TestCard
    attached: bool


@dataclass(frozen=True, slots=True)
class _Attempt:
    # What the key was first used with: reusing a key for a different charge is refused, as
    # Stripe does, rather than answered with the first charge's result.
    fingerprint: tuple[str, int, str, str, str, str]
    result: ChargeResult


@dataclass(frozen=True, slots=True)
class _RefundAttempt:
    fingerprint: tuple[str, str, int, str]
    result: RefundResult


class SandboxGateway(PaymentGateway):
    """Stripe-like answers from memory. Not thread-safe; it never awaits, so each call is atomic
    on one event loop."""

    name = "sandbox"

    def __init__(self, *, min_charge_cents: int = 50) -> None:
        # Stripe refuses charges under $0.50 (or about that in other currencies); refusing
        # them here too keeps a demo that works on the sandbox working on Stripe.
        self._min_charge_cents = min_charge_cents
        self._customers: dict[str, str] = {}  # account id -> cus_...
        self._methods: dict[str, _Method] = {}  # pm_... -> method
        self._attempts: dict[str, _Attempt] = {}  # idempotency key -> first attempt
        self._charge_count = 0
        self._total_captured: Micros = 0
        self._captured: dict[str, int] = {}  # pi_... -> cents captured by this process
        self._refunded: dict[str, int] = {}  # pi_... -> cents refunded so far
        self._refunds: dict[str, _RefundAttempt] = {}  # idempotency key -> first refund
        self._closed = False

    @property
    def charge_count(self) -> int:
        """Charges that actually captured money; a replayed idempotency key is not counted."""
        return self._charge_count

    @property
    def total_captured(self) -> Micros:
        return self._total_captured

    @property
    def refund_count(self) -> int:
        """Refunds that gave money back; a replayed idempotency key is not counted."""
        return len(self._refunds)

    @property
    def total_refunded(self) -> Micros:
        return sum(self._refunded.values()) * MICROS_PER_CENT

    @property
    def attempt_count(self) -> int:
        """Charge attempts that reached the 'processor', declines included, replays not."""
        return len(self._attempts)

    async def save_method(self, account_id: str, method_token: str) -> SavedMethod:
        self._check_open()
        card = TEST_CARDS.get(method_token)
        if card is None:
            raise GatewayUnavailable(f"No such PaymentMethod: '{method_token}'")
        customer = self._customers.get(account_id)
        if customer is None:
            customer = self._customers[account_id] = _new_id("cus_", 14)
        # Attaching one of Stripe's test methods attaches a fresh copy with its own id.
        method_ref = f"{method_token}__{_new_id('', 12)}"
        self._methods[method_ref] = _Method(customer, card, attached=True)
        return SavedMethod(
            customer, method_ref, card.brand, card.last4, card.exp_month, card.exp_year
        )

    async def delete_method(self, method: SavedMethod) -> None:
        self._check_open()
        saved = self._methods.get(method.method_ref)
        if saved is None or not saved.attached:
            raise GatewayUnavailable(
                f"The payment method {method.method_ref} is not attached to a customer"
            )
        saved.attached = False

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        cents = to_cents(request.amount)
        self._check_open()
        fingerprint = (
            request.account_id,
            cents,
            request.currency.lower(),
            request.customer_ref,
            request.method_ref,
            request.description,
        )
        earlier = self._attempts.get(request.idempotency_key)
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                # Stripe answers 400 idempotency_error; the first use may have charged.
                raise OutcomeUnknown(
                    f"idempotency key {request.idempotency_key!r} was first used for a "
                    "different charge"
                )
            return earlier.result

        method = self._methods.get(request.method_ref)
        if method is None and request.method_ref.partition("__")[0] in TEST_CARDS:
            # saved by another process: the id says which test card it is
            card = TEST_CARDS[request.method_ref.partition("__")[0]]
            method = self._methods[request.method_ref] = _Method(
                request.customer_ref, card, attached=True
            )
        if method is None or not method.attached or method.customer != request.customer_ref:
            raise GatewayUnavailable(
                f"The PaymentMethod {request.method_ref} does not belong to the Customer "
                f"{request.customer_ref}"
            )
        if cents < self._min_charge_cents:
            raise GatewayUnavailable(
                f"Amount must be at least {self._min_charge_cents} cents {request.currency.lower()}"
            )
        card = method.card
        if card.decline_code:
            result = ChargeResult("declined", 0, _new_id("pi_"), card.decline_code, card.message)
        else:
            captured = cents * MICROS_PER_CENT
            result = ChargeResult("succeeded", captured, _new_id("pi_"), "", card.message)
            self._charge_count += 1
            self._total_captured += captured
            self._captured[result.gateway_ref] = cents
        self._attempts[request.idempotency_key] = _Attempt(fingerprint, result)
        return result

    async def refund(self, request: RefundRequest) -> RefundResult:
        cents = to_cents(request.amount)
        self._check_open()
        fingerprint = (request.account_id, request.charge_ref, cents, request.currency.lower())
        earlier = self._refunds.get(request.idempotency_key)
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise OutcomeUnknown(
                    f"idempotency key {request.idempotency_key!r} was first used for a "
                    "different refund"
                )
            return earlier.result
        if not request.charge_ref.startswith("pi_"):
            raise GatewayUnavailable(f"No such payment_intent: '{request.charge_ref}'")
        captured = self._captured.get(request.charge_ref)
        refunded = self._refunded.get(request.charge_ref, 0)
        if captured is not None and refunded + cents > captured:
            raise GatewayUnavailable(
                f"Refund amount ({cents} cents) is greater than unrefunded amount on charge"
                f" ({captured - refunded} cents)"
            )
        self._refunded[request.charge_ref] = refunded + cents
        result = RefundResult(
            "succeeded", cents * MICROS_PER_CENT, _new_id("re_"), "succeeded", "Refunded."
        )
        self._refunds[request.idempotency_key] = _RefundAttempt(fingerprint, result)
        return result

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise GatewayUnavailable("the sandbox gateway is closed")
