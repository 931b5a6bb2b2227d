"""The Stripe objects the fake keeps, and the rules of the endpoints that make them:
customers, payment methods (Stripe's test cards, attached and detached), PaymentIntents and
their Refunds (never more than is left to refund on one).

``Resources.route`` runs one request that got past authentication, idempotency and the fault
knobs (``tests.stripe_fake.server``); it raises ``StripeError`` with Stripe's error object.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True)
class Card:
    brand: str
    last4: str
    decline_code: str  # "" = the charge succeeds
    message: str


# docs.stripe.com/testing: the test PaymentMethods and what charging them does.
TEST_METHODS: dict[str, Card] = {
    "pm_card_visa": Card("visa", "4242", "", ""),
    "pm_card_mastercard": Card("mastercard", "4444", "", ""),
    "pm_card_chargeDeclined": Card("visa", "0002", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": Card(
        "visa", "9995", "insufficient_funds", "Your card has insufficient funds."
    ),
    "pm_card_authenticationRequired": Card(
        "visa",
        "3184",
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    ),
}

_ALNUM = string.ascii_letters + string.digits
_MIN_CENTS = 50  # Stripe's minimum charge, USD


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


class StripeError(Exception):
    """An answer in Stripe's error shape: ``status`` and the ``error`` object."""

    def __init__(self, status: int, error: Json) -> None:
        super().__init__(error.get("message"))
        self.status = status
        self.error = error


def _invalid(message: str, *, code: str | None = None, param: str | None = None) -> StripeError:
    error: Json = {"type": "invalid_request_error", "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return StripeError(400, error)


def _metadata(params: dict[str, str]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        m = re.fullmatch(r"metadata\[(.+)\]", k)
        if m:
            out[m.group(1)] = v
    return out


def public(obj: Json) -> Json:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


@dataclass
class Resources:
    """Every object created so far; the caller (``StripeFake``) holds the lock."""

    customers: dict[str, Json] = field(default_factory=dict)
    methods: dict[str, Json] = field(default_factory=dict)
    detached: set[str] = field(default_factory=set)
    intents: list[Json] = field(default_factory=list)  # every one created, declined included
    forced_status: list[str] = field(default_factory=list)  # the next intents' end states
    refunds: list[Json] = field(default_factory=list)  # every refund created
    forced_refund_status: list[str] = field(default_factory=list)  # the next refunds' states

    def route(self, method: str, path: str, params: dict[str, str]) -> Json:
        parts = path.strip("/").split("/")
        match method, parts:
            case "POST", ["v1", "customers"]:
                return self._create_customer(params)
            case "POST", ["v1", "customers", cid]:
                return self._update_customer(cid, params)
            case "GET", ["v1", "payment_methods", pm]:
                return self._get_method(pm)
            case "POST", ["v1", "payment_methods", pm, "attach"]:
                return self._attach(pm, params)
            case "POST", ["v1", "payment_methods", pm, "detach"]:
                return self._detach(pm)
            case "POST", ["v1", "payment_intents"]:
                return self._create_intent(params)
            case "POST", ["v1", "refunds"]:
                return self._create_refund(params)
        raise StripeError(
            404,
            {
                "type": "invalid_request_error",
                "message": f"Unrecognized request URL ({method}: {path}).",
            },
        )

    def _create_customer(self, params: dict[str, str]) -> Json:
        cus: Json = {
            "id": new_id("cus_", 14),
            "object": "customer",
            "livemode": False,
            "metadata": _metadata(params),
            "invoice_settings": {"default_payment_method": None},
        }
        self.customers[cus["id"]] = cus
        return cus

    def _customer_or_error(self, cid: str, param: str = "customer") -> Json:
        cus = self.customers.get(cid)
        if cus is None:
            raise _invalid(f"No such customer: '{cid}'", code="resource_missing", param=param)
        return cus

    def _update_customer(self, cid: str, params: dict[str, str]) -> Json:
        cus = self._customer_or_error(cid, param="id")
        default = params.get("invoice_settings[default_payment_method]")
        if default is not None:
            pm = self.methods.get(default)
            if pm is None or pm["customer"] != cid:
                raise _invalid(
                    f"No such PaymentMethod: '{default}'",
                    code="resource_missing",
                    param="invoice_settings[default_payment_method]",
                )
            cus["invoice_settings"]["default_payment_method"] = default
        cus["metadata"].update(_metadata(params))
        return cus

    def _method_object(self, pm_id: str, card: Card, customer: str | None) -> Json:
        return {
            "id": pm_id,
            "object": "payment_method",
            "type": "card",
            "livemode": False,
            "customer": customer,
            "card": {
                "brand": card.brand,
                "last4": card.last4,
                "exp_month": 12,
                "exp_year": 2034,
                "funding": "credit",
                "country": "US",
            },
            "metadata": {},
        }

    def _get_method(self, pm: str) -> Json:
        if pm in self.methods:
            return self.methods[pm]
        if pm in TEST_METHODS:
            return self._method_object(pm, TEST_METHODS[pm], None)
        raise _invalid(f"No such PaymentMethod: '{pm}'", code="resource_missing", param="id")

    def _attach(self, pm: str, params: dict[str, str]) -> Json:
        cid = params.get("customer", "")
        self._customer_or_error(cid)
        if pm in TEST_METHODS:
            # Stripe attaches a fresh copy of a test method, with its own id.
            obj = self._method_object(new_id("pm_"), TEST_METHODS[pm], cid)
            obj["_card"] = pm
            self.methods[obj["id"]] = obj
            return public(obj)
        existing = self.methods.get(pm)
        if existing is None:
            raise _invalid(
                f"No such PaymentMethod: '{pm}'", code="resource_missing", param="payment_method"
            )
        if pm in self.detached:
            raise _invalid(
                "This PaymentMethod was previously used without being attached to a Customer "
                "or was detached from a Customer, and may not be used again.",
                code="payment_method_unexpected_state",
            )
        if existing["customer"] not in (None, cid):
            raise _invalid(
                "The payment method you provided has already been attached to a customer.",
                code="payment_method_unexpected_state",
            )
        existing["customer"] = cid
        return public(existing)

    def _detach(self, pm: str) -> Json:
        existing = self.methods.get(pm)
        if existing is None:
            raise _invalid(f"No such PaymentMethod: '{pm}'", code="resource_missing", param="id")
        if existing["customer"] is None:
            raise _invalid(
                "The payment method you provided is not attached to a customer so detachment "
                "is impossible.",
                code="payment_method_unexpected_state",
            )
        existing["customer"] = None
        self.detached.add(pm)
        for cus in self.customers.values():
            if cus["invoice_settings"]["default_payment_method"] == pm:
                cus["invoice_settings"]["default_payment_method"] = None
        return public(existing)

    def _create_intent(self, params: dict[str, str]) -> Json:
        amount_text = params.get("amount", "")
        if not amount_text.isdigit():
            raise _invalid("Invalid integer: " + amount_text, param="amount")
        amount = int(amount_text)
        currency = params.get("currency", "")
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise _invalid(f"Invalid currency: {currency}", param="currency")
        if currency == "usd" and amount < _MIN_CENTS:
            raise _invalid(
                "Amount must be at least $0.50 usd", code="amount_too_small", param="amount"
            )
        confirm = params.get("confirm") == "true"
        off_session = params.get("off_session") == "true"
        if off_session and not confirm:
            raise _invalid(
                "You can only pass in `off_session` when `confirm` is true.", param="off_session"
            )
        redirects_allowed = (
            params.get("automatic_payment_methods[allow_redirects]") != "never"
            and "payment_method_types[0]" not in params
        )
        if confirm and redirects_allowed and "return_url" not in params:
            raise _invalid(
                "This PaymentIntent is configured to accept payment methods enabled in your "
                "Dashboard. Because some of these payment methods might redirect your customer "
                "off of your page, you must provide a `return_url`. If you don't want to "
                "accept redirect-based payment methods, set `automatic_payment_methods[enabled]`"
                " to `true` and `automatic_payment_methods[allow_redirects]` to `never`.",
            )
        cid = params.get("customer", "")
        self._customer_or_error(cid)
        pm_id = params.get("payment_method", "")
        pm = self.methods.get(pm_id)
        if pm is None:
            raise _invalid(
                f"No such PaymentMethod: '{pm_id}'",
                code="resource_missing",
                param="payment_method",
            )
        if pm["customer"] != cid:
            raise _invalid(
                f"The provided PaymentMethod {pm_id} does not belong to the Customer {cid}.",
                param="payment_method",
            )
        card = TEST_METHODS[pm["_card"]]

        intent: Json = {
            "id": new_id("pi_"),
            "object": "payment_intent",
            "livemode": False,
            "amount": amount,
            "amount_received": 0,
            "currency": currency,
            "customer": cid,
            "payment_method": pm_id,
            "description": params.get("description"),
            "metadata": _metadata(params),
            "capture_method": "automatic",
            "confirmation_method": "automatic",
            "status": "requires_confirmation",
            "latest_charge": None,
            "last_payment_error": None,
        }
        self.intents.append(intent)
        if not confirm:
            return intent
        if self.forced_status:
            intent["status"] = self.forced_status.pop(0)
            return intent
        if not card.decline_code:
            intent.update(status="succeeded", amount_received=amount, latest_charge=new_id("ch_"))
            return intent
        if card.decline_code == "authentication_required" and not off_session:
            intent["status"] = "requires_action"
            return intent
        # Off-session 3-D Secure is a card_error of its own code, not card_declined.
        auth = card.decline_code == "authentication_required"
        code = "authentication_required" if auth else "card_declined"
        error: Json = {
            "type": "card_error",
            "code": code,
            "decline_code": card.decline_code,
            "message": card.message,
            "charge": new_id("ch_"),
        }
        intent.update(status="requires_payment_method", last_payment_error=dict(error))
        error["payment_intent"] = dict(intent)
        error["payment_method"] = public(pm)
        raise StripeError(402, error)

    def _create_refund(self, params: dict[str, str]) -> Json:
        """Stripe's rules for a refund of a PaymentIntent: it must have succeeded; ``amount``
        (cents, default: all that is left) at most what is left; a fully refunded one is
        ``charge_already_refunded``. A refund that ends ``failed``/``canceled`` gives nothing
        back, so it does not count against what is left."""
        pi_id = params.get("payment_intent", "")
        if not pi_id and not params.get("charge"):
            raise _invalid("One of `charge` or `payment_intent` is required.")
        intent = next((pi for pi in self.intents if pi["id"] == pi_id), None)
        if intent is None:
            raise _invalid(
                f"No such payment_intent: '{pi_id}'",
                code="resource_missing",
                param="payment_intent",
            )
        if intent["status"] != "succeeded":
            raise _invalid(
                f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                code="charge_not_refundable" if intent["latest_charge"] else None,
            )
        refunded = sum(
            r["amount"]
            for r in self.refunds
            if r["payment_intent"] == pi_id and r["status"] in ("succeeded", "pending")
        )
        left = intent["amount_received"] - refunded
        if left <= 0:
            raise _invalid(
                f"Charge {intent['latest_charge']} has already been refunded.",
                code="charge_already_refunded",
            )
        amount_text = params.get("amount", str(left))
        if not amount_text.isdigit() or int(amount_text) <= 0:
            raise _invalid(
                "Invalid positive integer", code="parameter_invalid_integer", param="amount"
            )
        amount = int(amount_text)
        if amount > left:
            raise _invalid(
                f"Refund amount (${amount / 100:.2f}) is greater than unrefunded amount on "
                f"charge (${left / 100:.2f})",
                param="amount",
            )
        status = self.forced_refund_status.pop(0) if self.forced_refund_status else "succeeded"
        refund: Json = {
            "id": new_id("re_"),
            "object": "refund",
            "amount": amount,
            "charge": intent["latest_charge"],
            "currency": intent["currency"],
            "payment_intent": pi_id,
            "metadata": _metadata(params),
            "reason": params.get("reason"),
            "status": status,
            "failure_reason": "lost_or_stolen_card" if status == "failed" else None,
            "created": 1_700_000_000 + len(self.refunds),
        }
        self.refunds.append(refund)
        return refund
