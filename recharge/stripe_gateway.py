"""The Stripe adapter: saved cards as Customer + PaymentMethod, charges as PaymentIntents
confirmed off-session, refunds as Refunds of a PaymentIntent.

Failure mapping (see ``recharge.gateway`` for what each outcome lets the caller conclude)::

    402 CardError                          -> ChargeResult("declined")
    PaymentIntent requires_action /
        requires_payment_method            -> ChargeResult("declined", "authentication_required")
    connection never established           -> GatewayUnavailable
    timeout / connection lost, 5xx, 409,
        idempotency_error, other statuses  -> OutcomeUnknown
    429, 400/404, 401, 403                 -> GatewayUnavailable
    Refund succeeded / pending             -> RefundResult("succeeded")  (pending: accepted)
    Refund failed / canceled               -> RefundResult("failed")
    Refund requires_action, other statuses -> OutcomeUnknown
    a refund over what is left (400)       -> GatewayUnavailable (definitely not refunded)

Stripe replays the stored response for a reused idempotency key for 24 hours, *including a 500*
once the endpoint had started executing: a retry after ``OutcomeUnknown`` resolves timeouts and
5xx raised in front of the API, but a stored 500 keeps answering ``OutcomeUnknown``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import httpx
import stripe

from recharge.gateway import (
    MICROS_PER_CENT,
    ChargeRequest,
    ChargeResult,
    GatewayError,
    GatewayUnavailable,
    OutcomeUnknown,
    PaymentGateway,
    RefundRequest,
    RefundResult,
    SavedMethod,
    expiry_of,
    to_cents,
)

_DECLINED_STATUSES: Final = frozenset({"requires_action", "requires_payment_method"})
#: A card refund Stripe has taken: ``pending`` is on its way to the card (it may still fail
#: days later, which only a webhook would tell; see docs/design/refunds.md).
_REFUND_TAKEN: Final = frozenset({"succeeded", "pending"})
_REFUND_FAILED: Final = frozenset({"failed", "canceled"})

# httpx errors raised before any byte of the request left: the processor cannot have seen it.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class _HTTPXClient(stripe.HTTPXClient):
    """stripe's HTTPXClient hands httpx the form-encoded body as ``data=<str>``, which httpx
    deprecates: a DeprecationWarning per request, and under ``-W error`` the warning is turned
    into an exception that stripe reports as APIConnectionError. Send it as ``content``."""

    def _get_request_args_kwargs(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any
    ) -> list[Any]:
        args_kwargs: list[Any] = super()._get_request_args_kwargs(method, url, headers, None)
        kwargs: dict[str, Any] = args_kwargs[1]
        kwargs.pop("data", None)
        if post_data:
            kwargs["content"] = post_data
        return args_kwargs


class StripeGateway(PaymentGateway):
    """``PaymentGateway`` over Stripe's v1 API with the async ``StripeClient``.

    ``timeout_s`` bounds each phase of each HTTP request (connect, write, each read), not a
    whole call; ``save_method`` makes three requests. ``max_network_retries`` stays 0 unless
    the caller wants stripe-python to retry timeouts, 409s and 5xx on its own (with backoff from
    0.5 s, inside one call): the recharge worker retries itself, and must see a timeout as
    ``OutcomeUnknown`` at once.
    """

    name = "stripe"

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout_s: float,
        max_network_retries: int = 0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_network_retries < 0:
            raise ValueError("max_network_retries must not be negative")
        self._http = _HTTPXClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=max_network_retries,
            http_client=self._http,
        )

    async def save_method(self, account_id: str, method_token: str) -> SavedMethod:
        v1 = self._client.v1
        try:
            # Keyed on the token too, so saving a new card after a delete gets its own customer,
            # while a retried save (same token) reuses the one the first attempt created.
            customer = await v1.customers.create_async(
                {"metadata": {"account_id": account_id}},
                {"idempotency_key": f"cus-{account_id}-{method_token}"},
            )
            method = await v1.payment_methods.attach_async(method_token, {"customer": customer.id})
            await v1.customers.update_async(
                customer.id, {"invoice_settings": {"default_payment_method": method.id}}
            )
        except stripe.StripeError as e:
            raise _gateway_error(e) from e
        card = method.card
        # PaymentMethod.card.exp_month / exp_year: integers; anything else is kept as unknown.
        month, year = expiry_of(getattr(card, "exp_month", None), getattr(card, "exp_year", None))
        return SavedMethod(
            customer_ref=customer.id,
            method_ref=method.id,
            brand=card.brand if card is not None else "",
            last4=card.last4 if card is not None else "",
            exp_month=month,
            exp_year=year,
        )

    async def delete_method(self, method: SavedMethod) -> None:
        try:
            await self._client.v1.payment_methods.detach_async(method.method_ref)
        except stripe.StripeError as e:
            raise _gateway_error(e) from e

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        cents = to_cents(request.amount)  # refuses before anything is sent
        try:
            intent = await self._client.v1.payment_intents.create_async(
                {
                    "amount": cents,
                    "currency": request.currency.lower(),
                    "customer": request.customer_ref,
                    "payment_method": request.method_ref,
                    "off_session": True,
                    "confirm": True,
                    # Without this Stripe wants a return_url on confirm, even for a saved card,
                    # in case the account has redirect-based methods enabled.
                    "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
                    "description": request.description,
                    # The key lets an operator find the PaymentIntent when the outcome stayed
                    # unknown (a stored 500 replays for 24 h).
                    "metadata": {
                        "account_id": request.account_id,
                        "idempotency_key": request.idempotency_key,
                    },
                },
                {"idempotency_key": request.idempotency_key},
            )
        except stripe.CardError as e:
            return _declined(e)
        except stripe.StripeError as e:
            raise _gateway_error(e) from e
        return _result(intent)

    async def refund(self, request: RefundRequest) -> RefundResult:
        cents = to_cents(request.amount)  # refuses before anything is sent
        try:
            refund = await self._client.v1.refunds.create_async(
                {
                    "payment_intent": request.charge_ref,
                    "amount": cents,
                    # Stripe's own reasons are a short list; the operator's words go here.
                    "metadata": {
                        "account_id": request.account_id,
                        "idempotency_key": request.idempotency_key,
                        "reason": request.reason[:500],
                    },
                },
                {"idempotency_key": request.idempotency_key},
            )
        except stripe.StripeError as e:
            raise _gateway_error(e) from e
        status = refund.status or ""
        if status in _REFUND_TAKEN:
            return RefundResult(
                "succeeded", refund.amount * MICROS_PER_CENT, refund.id, status, "Refunded."
            )
        if status in _REFUND_FAILED:
            return RefundResult(
                "failed",
                0,
                refund.id,
                status,
                f"the refund is {status} at Stripe ({refund.failure_reason or 'no reason given'})",
            )
        raise OutcomeUnknown(f"Refund {refund.id} is {status!r}, not settled")

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]  # unannotated upstream


def _result(intent: stripe.PaymentIntent) -> ChargeResult:
    if intent.status == "succeeded":
        return ChargeResult(
            status="succeeded",
            captured=intent.amount_received * MICROS_PER_CENT,
            gateway_ref=intent.id,
            decline_code="",
            message="Payment succeeded.",
        )
    if intent.status in _DECLINED_STATUSES:
        # Off-session there is no customer to complete 3-D Secure: the card is not charged.
        error = intent.last_payment_error
        message = error.message if error is not None and error.message else ""
        return ChargeResult(
            status="declined",
            captured=0,
            gateway_ref=intent.id,
            decline_code="authentication_required",
            message=message or "The card requires authentication by the cardholder.",
        )
    raise OutcomeUnknown(f"PaymentIntent {intent.id} is {intent.status!r}, not settled")


def _declined(e: stripe.CardError) -> ChargeResult:
    error = e.error
    intent = error.payment_intent if error is not None else None
    decline_code = (error.decline_code if error is not None else None) or e.code
    return ChargeResult(
        status="declined",
        captured=0,
        gateway_ref=intent.id if intent is not None else "",
        decline_code=decline_code or "card_declined",
        message=e.user_message or "Your card was declined.",
    )


def _gateway_error(e: stripe.StripeError) -> GatewayError:
    message = e.user_message or type(e).__name__
    if isinstance(e, stripe.APIConnectionError):
        if isinstance(e.__cause__, _NOT_SENT):
            return GatewayUnavailable(f"cannot reach Stripe: {e.__cause__!r}")
        return OutcomeUnknown(message)
    if isinstance(
        e,
        stripe.RateLimitError
        | stripe.AuthenticationError
        | stripe.PermissionError
        | stripe.InvalidRequestError
        | stripe.CardError,
    ):
        return GatewayUnavailable(message)
    # APIError (5xx; also 409, which stripe-python does not map to IdempotencyError),
    # IdempotencyError (the key was first used for other parameters, and that first request
    # may have charged), and anything newer than this code.
    return OutcomeUnknown(message)
