"""An account's invoices (``enforcement.invoices``; seeds 000, 002, 004): the list by status and
date, one invoice with its line items and payments, its PDF, Pay Now, the account's invoice
auto-pay, and the operator's cancellation. Permissions (``infra.http.access``):
``billing.read`` / ``billing.write`` (billing is the admins' and Edit Billing's), and
``invoices.cancel`` (operators only)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Final, Literal, cast

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from contracts.money import Micros, format_money
from enforcement import invoice_pdf
from enforcement.authorize import REDIS_DOWN
from enforcement.http.services import ApiServices, Services, account_state, known, within_redis
from enforcement.invoices import (
    CardPayments,
    Invoice,
    InvoiceError,
    Invoices,
    InvoiceStatus,
    set_account_billing,
)
from infra.db import POSTGRES_DOWN
from infra.http import errors, pages
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import DB_TIMEOUT_S, within_db
from infra.http.callers import Caller
from infra.http.errors import ApiError
from infra.http.models import Money, RequestBody

router = APIRouter()

InvoicePath = Annotated[str, Path(pattern=r"^inv_[a-z0-9]{16}$")]
_ID: Final = r"^[A-Za-z0-9_.:-]{1,64}$"


class LineOut(BaseModel):
    kind: str
    description: str
    billing_group_id: str
    quantity: int
    unit: str
    amount: Money
    late_for: str | None = Field(
        default=None,
        description="a late charge's own month (YYYY-MM): charged in that month, it reached"
        " the ledger after that month's invoice; null for this invoice's month",
    )


class PaymentOut(BaseModel):
    payment_id: str
    amount: Money
    state: str = Field(description="pending, applied or failed")
    applied: Money = Field(description="what the card captured, applied to the invoice")
    created_at: datetime


class InvoiceOut(BaseModel):
    id: str
    number: str
    account_id: str
    period: str
    period_start: datetime
    period_end: datetime
    status: InvoiceStatus = Field(description="sent, paid, partially_paid, overdue, cancelled")
    billing_mode: str = Field(description="prepaid (a statement, issued paid) or invoiced")
    currency: str
    issued_at: datetime
    due_at: datetime
    subtotal: Money
    tax: Money
    tax_rate: str = Field(description="percent, e.g. 8.25")
    total: Money = Field(description="to the micro-unit")
    amount_due: Money = Field(description="the total rounded to the cent, half up")
    paid: Money
    balance_due: Money
    cancelled_at: datetime | None
    cancel_reason: str | None
    lines: list[LineOut] | None = Field(default=None, description="in one invoice's answer")
    payments: list[PaymentOut] | None = None


class InvoicesOut(BaseModel):
    data: list[InvoiceOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: done")


class PayIn(RequestBody):
    """Pay Now: ``amount`` defaults to the balance due; less is a partial payment, more is
    refused (``overpayment``). Idempotent per ``payment_id``."""

    payment_id: Annotated[str, Field(pattern=_ID)]
    amount: Annotated[Micros, Field(gt=0)] | None = None


class CancelIn(RequestBody):
    reason: Annotated[str, Field(min_length=1, max_length=200)]


class InvoiceSettingsIn(RequestBody):
    auto_pay: bool = Field(description="charge the saved card when an invoice is issued")


class InvoiceSettingsOut(BaseModel):
    billing_mode: str
    auto_pay: bool
    tax_jurisdiction: str | None


def invoice_out(inv: Invoice, *, whole: bool) -> InvoiceOut:
    return InvoiceOut(
        id=inv.id,
        number=inv.number,
        account_id=inv.account_id,
        period=inv.period,
        period_start=inv.period_start,
        period_end=inv.period_end,
        status=inv.status,
        billing_mode=inv.billing_mode,
        currency=inv.currency,
        issued_at=inv.issued_at,
        due_at=inv.due_at,
        subtotal=format_money(inv.subtotal),
        tax=format_money(inv.tax),
        tax_rate=f"{inv.tax_rate_ppm / 10_000:.4f}".rstrip("0").rstrip("."),
        total=format_money(inv.total),
        amount_due=format_money(inv.amount_due),
        paid=format_money(inv.paid),
        balance_due=format_money(inv.balance_due),
        cancelled_at=inv.cancelled_at,
        cancel_reason=inv.cancel_reason,
        lines=[
            LineOut(
                kind=ln.kind,
                description=ln.description,
                billing_group_id=ln.billing_group_id,
                quantity=ln.quantity,
                unit=ln.unit,
                amount=format_money(ln.amount),
                late_for=ln.late_for or None,
            )
            for ln in inv.lines
        ]
        if whole
        else None,
        payments=[
            PaymentOut(
                payment_id=p.payment_id,
                amount=format_money(p.amount),
                state=p.state,
                applied=format_money(p.applied),
                created_at=p.created_at,
            )
            for p in inv.payments
        ]
        if whole
        else None,
    )


def _invoices(svc: ApiServices) -> Invoices:
    # The one API serves payments' routes too (meter.apiserver's ServedServices holds the
    # PaymentService, which pays invoices); an API without them refuses Pay Now.
    payments = cast("CardPayments | None", getattr(svc, "payments", None))
    return Invoices(svc.pool, svc.balances, payments=payments, clock=svc.clock)


def _error(exc: InvoiceError) -> ApiError:
    status = {
        "invoice_not_found": 404,
        "validation_error": 422,
        "payments_unavailable": 503,
        "no_payment_method": 409,
    }.get(exc.code, 409)
    return ApiError(status, exc.code, exc.message, exc.field)


def _not_found(invoice_id: str) -> ApiError:
    return ApiError(404, "invoice_not_found", f"no invoice {invoice_id!r}", "invoice_id")


@router.get(
    "/v1/accounts/{account_id}/invoices",
    response_model=InvoicesOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The account's invoices, by issue date, filtered by status",
)
async def list_(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    status: Annotated[InvoiceStatus | None, Query()] = None,
    order: Annotated[Literal["newest", "oldest"], Query()] = "newest",
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> JSONResponse:
    await who.on(account_id, "billing.read")
    kind = f"invoices-{order}"
    before = pages.decode(kind, cursor)
    await known(svc, account_id)
    rows = await within_db(
        _invoices(svc).listed(
            account_id,
            status=status,
            oldest_first=order == "oldest",
            before=before,
            limit=limit + 1,
        )
    )
    shown, next_cursor = pages.page(kind, rows, limit, lambda i: (i.issued_at, i.id))
    out = InvoicesOut(data=[invoice_out(i, whole=False) for i in shown], next_cursor=next_cursor)
    return JSONResponse(out.model_dump(mode="json", exclude_none=False))


@router.get(
    "/v1/accounts/{account_id}/invoices/{invoice_id}.pdf",
    responses={200: {"content": {"application/pdf": {}}}, **errors.responses(401, 403, 404, 503)},
    summary="The invoice as a PDF, branded with the service provider's name and logo",
)
async def pdf(  # before read: "{invoice_id}" would match "....pdf" first
    account_id: AccountPath, invoice_id: InvoicePath, who: Caller, svc: Services
) -> Response:
    await who.on(account_id, "billing.read")
    inv = await within_db(_invoices(svc).get(account_id, invoice_id))
    if inv is None:
        raise _not_found(invoice_id)
    logo = FilePath(svc.issuer_logo) if svc.issuer_logo else None
    body = invoice_pdf.render(inv, issuer_name=svc.issuer_name, logo=logo)
    return Response(
        body,
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{inv.number}.pdf"'},
    )


@router.get(
    "/v1/accounts/{account_id}/invoices/{invoice_id}",
    response_model=InvoiceOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="One invoice with its line items and payments",
)
async def read(
    account_id: AccountPath, invoice_id: InvoicePath, who: Caller, svc: Services
) -> JSONResponse:
    await who.on(account_id, "billing.read")
    inv = await within_db(_invoices(svc).get(account_id, invoice_id))
    if inv is None:
        raise _not_found(invoice_id)
    return JSONResponse(invoice_out(inv, whole=True).model_dump(mode="json"))


@router.post(
    "/v1/accounts/{account_id}/invoices/{invoice_id}/payments",
    response_model=InvoiceOut,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(PayIn),
    summary="Pay Now: the saved card, for the balance due or part of it",
)
async def pay(
    request: Request, account_id: AccountPath, invoice_id: InvoicePath, who: Caller, svc: Services
) -> JSONResponse:
    """Answers the invoice after the payment: Paid, Partially Paid, or as it was while the
    card's answer is pending (then applied when it succeeds). 409 ``overpayment``,
    ``invoice_paid``, ``invoice_cancelled``, ``payment_declined``, ``payment_failed``."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, PayIn)
    await known(svc, account_id)
    await account_state(svc, account_id)
    try:
        # Not bounded like a read: the card payment's own timeouts bound it (and an unknown
        # outcome is settled later, then applied).
        inv = await _invoices(svc).pay(account_id, invoice_id, body.payment_id, body.amount)
    except InvoiceError as exc:
        raise _error(exc) from None
    except POSTGRES_DOWN as exc:
        raise errors.database_unavailable() from exc
    except REDIS_DOWN as exc:
        raise errors.balance_store_unavailable("the balance store did not answer; retry") from exc
    return JSONResponse(invoice_out(inv, whole=True).model_dump(mode="json"))


@router.post(
    "/v1/accounts/{account_id}/invoices/{invoice_id}/cancel",
    response_model=InvoiceOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=body_doc(CancelIn),
    summary="Cancel an invoice (operators): its charges credited back once",
)
async def cancel(
    request: Request, account_id: AccountPath, invoice_id: InvoicePath, who: Caller, svc: Services
) -> JSONResponse:
    await who.on(account_id, "invoices.cancel")
    body = await json_body(request, CancelIn)
    await account_state(svc, account_id)
    try:
        inv = await within_db(
            within_redis(_invoices(svc).cancel(account_id, invoice_id, body.reason), DB_TIMEOUT_S)
        )
    except InvoiceError as exc:
        raise _error(exc) from None
    return JSONResponse(invoice_out(inv, whole=True).model_dump(mode="json"))


async def _settings(svc: ApiServices, account_id: str) -> InvoiceSettingsOut:
    r = await svc.pool.fetchrow(
        "SELECT billing_mode, invoice_auto_pay, tax_jurisdiction FROM accounts WHERE id = $1",
        account_id,
    )
    if r is None:
        raise ApiError(404, "account_not_found", f"no account {account_id!r}", "account_id")
    return InvoiceSettingsOut(
        billing_mode=r["billing_mode"],
        auto_pay=r["invoice_auto_pay"],
        tax_jurisdiction=r["tax_jurisdiction"],
    )


@router.get(
    "/v1/accounts/{account_id}/invoice_settings",
    response_model=InvoiceSettingsOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="How the account is billed: prepaid or invoiced, invoice auto-pay, tax jurisdiction",
)
async def read_settings(account_id: AccountPath, who: Caller, svc: Services) -> JSONResponse:
    await who.on(account_id, "billing.read")
    return JSONResponse((await within_db(_settings(svc, account_id))).model_dump())


@router.patch(
    "/v1/accounts/{account_id}/invoice_settings",
    response_model=InvoiceSettingsOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=body_doc(InvoiceSettingsIn),
    summary="Turn invoice auto-pay on or off (the billing mode and tax are the operator's)",
)
async def update_settings(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> JSONResponse:
    await who.on(account_id, "billing.write")
    body = await json_body(request, InvoiceSettingsIn)
    if not await within_db(set_account_billing(svc.pool, account_id, auto_pay=body.auto_pay)):
        raise ApiError(404, "account_not_found", f"no account {account_id!r}", "account_id")
    return JSONResponse((await within_db(_settings(svc, account_id))).model_dump())
