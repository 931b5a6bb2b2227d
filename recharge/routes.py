"""Payments' routes (admin only: billing): auto-recharge settings, the saved payment method,
manual top-ups and the payment history, under ``/v1/accounts/{account_id}/``. An ``APIRouter``
of its own, served in the one API by ``meter.apiserver`` beside the enforcement routes.

The app serving ``router`` keeps a ``PaymentsHost`` as ``app.state.services``: the
``PaymentService`` (None: every route answers 503 ``payments_unavailable``), the key store the
``Caller`` is checked against, and the API's own checks of an account (it exists; its balance is
in Redis), so that these routes answer as every other route of the API does. Errors have the
one shape of ``infra.http.errors``: the payment rules' refusals are 422 (amounts) or 409 (with
``Retry-After`` when they lapse), a store away is 503.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, Literal, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from balance.errors import BalanceStoreError
from contracts.money import Micros, format_money
from infra.db import POSTGRES_DOWN
from infra.http import errors
from infra.http.access import Directory
from infra.http.api_keys import ApiKeys
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.callers import Caller
from infra.http.errors import RETRY_AFTER, ApiError
from infra.http.models import Money, RequestBody
from recharge.gateway import SavedMethod
from recharge.payments import PaymentKind, PaymentStatus
from recharge.policy import PolicyRefusal
from recharge.refund_store import Refund, RefundKind, RefundStatus
from recharge.service import Payment, PaymentError, PaymentService, RechargeSettings

_T = TypeVar("_T")

router = APIRouter()


class PaymentsHost(Protocol):
    """What the app serving ``router`` keeps as ``app.state.services``."""

    @property
    def keys(self) -> ApiKeys:
        """The API keys every caller is checked against."""
        ...

    @property
    def directory(self) -> Directory:
        """Who manages each account (a manager's admin acts on its managed accounts)."""
        ...

    @property
    def payments(self) -> PaymentService | None:
        """None: payments are not configured (503 ``payments_unavailable``)."""
        ...

    async def known(self, account_id: str) -> str:
        """The account's currency; ``ApiError`` 404 ``account_not_found`` without it, 503
        when PostgreSQL does not answer in time."""
        ...

    async def loaded(self, account_id: str) -> None:
        """The account's balance state is in Redis (rebuilt from the ledger first if Redis
        lost it); ``ApiError`` 503 when a store does not answer in time."""
        ...


async def _host(request: Request) -> PaymentsHost:
    host: PaymentsHost = request.app.state.services
    return host


# Module level: FastAPI resolves the routes' (string) annotations in this module's namespace.
Host = Annotated[PaymentsHost, Depends(_host)]


# --- bodies (their names are the OpenAPI schemas') --------------------------------------------


class AutoRechargeIn(RequestBody):
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


class PaymentMethodIn(RequestBody):
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
    exp_month: int | None = Field(
        default=None, description="The card's expiry month, 1 to 12; null when not known"
    )
    exp_year: int | None = Field(
        default=None, description="The card's expiry year (four digits); null when not known"
    )


class PaymentIn(RequestBody):
    amount: Annotated[Micros, Field(description="Whole cents, at least 10.00")]
    payment_id: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
            description="Idempotency key, scoped to the account: a retry with it never charges"
            " twice; another account's payment of the same id is a payment of its own",
        ),
    ]
    payment_method: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,255}$")] | None = Field(
        None, description="The saved method's method_ref; the saved one when omitted"
    )


class PaymentOut(BaseModel):
    id: str
    account_id: str
    kind: PaymentKind = Field(description="auto: an auto-recharge; manual: a top-up")
    paid_for: str = Field(
        description='What it paid: "auto_recharge", "top_up" or "invoice" (see invoice_id)'
    )
    invoice_id: str | None = Field(None, description="The invoice it was applied to, if any")
    amount: Money = Field(description="What was asked of the card")
    captured: Money = Field(description="What the card paid, and what was credited")
    currency: str
    status: PaymentStatus
    reason: str = Field(description="Decline code, refusal rule or failure; empty on success")
    message: str
    method: str = Field(description='e.g. "visa 4242"')
    created_at: datetime
    credited: bool = Field(description="The balance has the captured amount")
    refunded: Money = Field(
        "0.00", description="What went back to the card (its succeeded refunds)"
    )
    refund_status: Literal["none", "partially_refunded", "refunded"] = Field(
        "none", description="refunded: all it captured went back to the card"
    )


class RefundOut(BaseModel):
    """A refund (the Refunded rows of the payment history): to the card, or as credit."""

    id: str = Field(description="The operator's idempotency key, scoped to the account")
    account_id: str
    kind: RefundKind = Field(description="card: back to the card; credit: as account credit")
    payment_id: str | None = Field(description="The payment refunded (card); null for a credit")
    amount: Money = Field(description="What is given back (> 0)")
    balance_change: Money = Field(
        description="What it does to the balance: -amount (card), +amount (credit)"
    )
    currency: str
    status: RefundStatus = Field(
        description="pending: the gateway's answer is awaited (settled in the background);"
        " succeeded; failed: nothing was given back"
    )
    reason: str
    outcome: str = Field(description="The gateway's word, or why it failed")
    message: str
    created_at: datetime
    applied: bool = Field(description="The balance has it")


class PaymentsOut(BaseModel):
    account_id: str
    payments: list[PaymentOut]
    refunds: list[RefundOut] = Field(
        default_factory=list,
        description="Refunds to the card and credits (the Refunded rows), newest first",
    )


# --- routes -----------------------------------------------------------------------------------


def payments_of(host: PaymentsHost) -> PaymentService:
    svc = host.payments
    if svc is None:
        raise ApiError(503, "payments_unavailable", "payments are not configured", None)
    return svc


async def _pay(work: Awaitable[_T]) -> _T:
    """A payment request's errors as API errors (rules 422/409, stores 503)."""
    try:
        return await work
    except PolicyRefusal as exc:
        status = (
            422
            if exc.code in ("invalid_amount", "amount_below_minimum", "amount_above_maximum")
            else 409
        )
        headers = (
            {"Retry-After": str(max(1, int(exc.retry_at.timestamp() - time.time())))}
            if exc.retry_at and status == 409
            else None
        )
        raise ApiError(status, exc.code, exc.message, "amount", headers) from None
    except PaymentError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    except (RedisError, BalanceStoreError) as exc:
        raise errors.balance_store_unavailable("the balance store failed; retry") from exc
    except POSTGRES_DOWN as exc:
        raise errors.database_unavailable() from exc


def auto_recharge_out(account_id: str, s: RechargeSettings) -> AutoRechargeOut:
    return AutoRechargeOut(
        account_id=account_id,
        enabled=s.enabled,
        threshold_amount=format_money(s.threshold_amount),
        recharge_amount=format_money(s.recharge_amount),
        disabled_reason=s.disabled_reason,
    )


def method_out(account_id: str, gateway: str, m: SavedMethod) -> PaymentMethodOut:
    expires = m.expires()
    return PaymentMethodOut(
        account_id=account_id,
        gateway=gateway,
        brand=m.brand,
        last4=m.last4,
        method_ref=m.method_ref,
        exp_month=None if expires is None else expires[1],
        exp_year=None if expires is None else expires[0],
    )


def payment_out(p: Payment, refunded: int = 0, invoice_id: str | None = None) -> PaymentOut:
    return PaymentOut(
        id=p.id,
        account_id=p.account_id,
        kind=p.kind,
        paid_for="auto_recharge" if p.kind == "auto" else "invoice" if invoice_id else "top_up",
        invoice_id=invoice_id,
        amount=format_money(p.amount),
        captured=format_money(p.captured),
        currency=p.currency,
        status=p.status,
        reason=p.reason,
        message=p.message,
        method=p.method,
        created_at=p.created_at,
        credited=p.credited_at is not None,
        refunded=format_money(refunded),
        refund_status=(
            "none"
            if refunded == 0
            else "refunded"
            if refunded >= p.captured
            else "partially_refunded"
        ),
    )


def refund_out(r: Refund) -> RefundOut:
    return RefundOut(
        id=r.id,
        account_id=r.account_id,
        kind=r.kind,
        payment_id=r.payment_id,
        amount=format_money(r.amount),
        balance_change=format_money(r.signed),
        currency=r.currency,
        status=r.status,
        reason=r.reason,
        outcome=r.outcome,
        message=r.message,
        created_at=r.created_at,
        applied=r.applied_at is not None,
    )


@router.put(
    "/v1/accounts/{account_id}/auto_recharge",
    response_model=AutoRechargeOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=body_doc(AutoRechargeIn),
    summary="Auto-recharge settings (admin): recharge when credit falls to the threshold",
)
async def put_auto_recharge(
    request: Request, account_id: AccountPath, who: Caller, host: Host
) -> AutoRechargeOut:
    """Turned on while the account is already at or below the threshold, a recharge is
    triggered at once. Repeatable: the same body twice changes nothing more."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, AutoRechargeIn)
    await host.known(account_id)
    await host.loaded(account_id)  # rebuilds a lost Redis state first
    s = await _pay(
        payments_of(host).set_auto_recharge(
            account_id, body.enabled, body.threshold_amount, body.recharge_amount
        )
    )
    return auto_recharge_out(account_id, s)


@router.get(
    "/v1/accounts/{account_id}/auto_recharge",
    response_model=AutoRechargeOut,
    responses=errors.responses(401, 403, 404, 503),
    summary="Auto-recharge settings (admin); disabled_reason says if the service turned it off",
)
async def get_auto_recharge(account_id: AccountPath, who: Caller, host: Host) -> AutoRechargeOut:
    await who.on(account_id, "billing.read")
    await host.known(account_id)
    s = await _pay(payments_of(host).auto_recharge(account_id))
    if s is None:
        raise ApiError(404, "not_found", "auto-recharge was never set for this account")
    return auto_recharge_out(account_id, s)


@router.put(
    "/v1/accounts/{account_id}/payment_method",
    response_model=PaymentMethodOut,
    status_code=201,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(PaymentMethodIn),
    summary="Save the account's one payment method (admin); 409 while one is saved",
)
async def put_method(
    request: Request, account_id: AccountPath, who: Caller, host: Host
) -> PaymentMethodOut:
    """Replacing a method means deleting the saved one first."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, PaymentMethodIn)
    await host.known(account_id)
    svc = payments_of(host)
    m = await _pay(svc.save_method(account_id, body.token))
    return method_out(account_id, svc.gateway_name, m)


@router.get(
    "/v1/accounts/{account_id}/payment_method",
    response_model=PaymentMethodOut,
    responses=errors.responses(401, 403, 404, 503),
    summary="The saved payment method (admin)",
)
async def get_method(account_id: AccountPath, who: Caller, host: Host) -> PaymentMethodOut:
    await who.on(account_id, "billing.read")
    await host.known(account_id)
    svc = payments_of(host)
    m = await _pay(svc.saved_method(account_id))
    if m is None:
        raise ApiError(404, "not_found", "the account has no saved payment method")
    return method_out(account_id, svc.gateway_name, m)


@router.delete(
    "/v1/accounts/{account_id}/payment_method",
    status_code=204,
    responses=errors.responses(401, 403, 404, 503),
    summary="Delete the saved payment method (admin); auto-recharge cannot charge until "
    "another is saved",
)
async def delete_method(account_id: AccountPath, who: Caller, host: Host) -> Response:
    await who.on(account_id, "billing.write")
    await host.known(account_id)
    if not await _pay(payments_of(host).delete_method(account_id)):
        raise ApiError(404, "not_found", "the account has no saved payment method")
    return Response(status_code=204)


@router.post(
    "/v1/accounts/{account_id}/payments",
    response_model=PaymentOut,
    status_code=201,
    responses=errors.responses(400, 401, 402, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(PaymentIn),
    summary="A manual top-up (admin): charge the saved method and credit what it captured",
)
async def pay(request: Request, account_id: AccountPath, who: Caller, host: Host) -> Response:
    """Idempotent per ``payment_id`` within the account. Limits: at least 10.00, whole
    cents; a new account may pay 100.00 on its first day, 50.00 more each day after (level-2
    verification lifts it): 409 ``payment_limit_exceeded`` with ``Retry-After``. A declined
    card is 402 ``card_declined`` (the payment is in the history with its decline code). When
    the gateway's answer is lost the payment is ``pending`` (202): it is settled in the
    background with the same idempotency key, never charged twice."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, PaymentIn)
    await host.known(account_id)
    await host.loaded(account_id)
    svc = payments_of(host)
    if body.payment_method is not None:
        saved = await _pay(svc.saved_method(account_id))
        if saved is None or saved.method_ref != body.payment_method:
            raise ApiError(
                409,
                "payment_method_mismatch",
                "payment_method is not the account's saved method",
                "payment_method",
            )
    p = await _pay(svc.top_up(account_id, body.amount, body.payment_id))
    if p.status == "declined":
        raise ApiError(402, "card_declined", f"the card was declined ({p.reason}): {p.message}")
    if p.status == "failed":
        raise ApiError(
            503,
            "gateway_unavailable",
            f"the payment gateway refused: {p.message}",
            None,
            RETRY_AFTER,
        )
    out = payment_out(p)
    return Response(
        out.model_dump_json().encode(),
        status_code=202 if p.status == "pending" else 201,
        media_type="application/json",
    )


@router.get(
    "/v1/accounts/{account_id}/payments",
    response_model=PaymentsOut,
    responses=errors.responses(401, 403, 404, 503),
    summary="Payment history (admin): top-ups and auto-recharges, newest first, with what"
    " each had refunded; and the refunds and credits",
)
async def history(account_id: AccountPath, who: Caller, host: Host) -> PaymentsOut:
    await who.on(account_id, "billing.read")
    await host.known(account_id)
    svc = payments_of(host)
    ps = await _pay(svc.payments(account_id))
    refunded = await _pay(svc.refunds.store.refunded(account_id))
    rs = await _pay(svc.refunds.refunds(account_id))
    invoiced = await _pay(svc.invoices_paid(account_id))
    return PaymentsOut(
        account_id=account_id,
        payments=[payment_out(p, refunded.get(p.id, 0), invoiced.get(p.id)) for p in ps],
        refunds=[refund_out(r) for r in rs],
    )
