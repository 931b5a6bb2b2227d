"""Refunds' routes (operator only: ``payments.refund``): a payment given back to its card, and
money given back as account credit, under ``/v1/accounts/{account_id}/``. An ``APIRouter`` of
its own on the same ``PaymentsHost`` as ``recharge.routes`` (served beside it by
``meter.apiserver``); the refunds show in that module's payment history.

Both answer with the refund's state: 201 ``succeeded``; 202 ``pending`` (the gateway's answer
was lost: settled in the background with the same idempotency key, never refunded twice; the
same request again tells how it ended). Refusals are 404 ``payment_not_found``, 409
``payment_not_settled`` / ``refund_exceeds_capture`` / ``refund_id_reused`` /
``gateway_mismatch`` / ``refund_failed`` (the gateway gave nothing back), 422 ``invalid_amount``
and the validation errors of the body. Rules: docs/design/refunds.md.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import Field

from contracts.money import Micros
from infra.http import errors
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.callers import Caller
from infra.http.errors import ApiError
from infra.http.models import RequestBody
from recharge.refund_store import Refund
from recharge.refunds import RefundError
from recharge.routes import Host, RefundOut, _pay, payments_of, refund_out

_T = TypeVar("_T")

router = APIRouter()

#: A payment's id as payments are named (an auto-recharge's is longer than a client's).
PaymentPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
_REFUND_ID = Field(
    pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
    description="Idempotency key, scoped to the account (refunds and credits share them): a"
    " retry with it never gives money back twice",
)
_REASON = Field(min_length=1, max_length=500, description="Why: kept with the refund")


class RefundIn(RequestBody):
    refund_id: Annotated[str, _REFUND_ID]
    amount: Micros | None = Field(
        None, description="Whole cents; default: all that is left to refund of the payment"
    )
    reason: Annotated[str, _REASON]


class CreditIn(RequestBody):
    credit_id: Annotated[str, _REFUND_ID]
    amount: Annotated[Micros, Field(description="Credited to the balance, > 0")]
    reason: Annotated[str, _REASON]


async def _refund(work: Awaitable[_T]) -> _T:
    """A refund's refusals as API errors; the stores' as every payment route's (503)."""
    try:
        return await _pay(work)
    except RefundError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.field) from None


def _answer(r: Refund) -> Response:
    if r.status == "failed":
        raise ApiError(
            409,
            "refund_failed",
            f"refund {r.id!r} gave nothing back ({r.outcome}): {r.message}; a new refund_id"
            " tries again",
        )
    out = refund_out(r)
    return Response(
        out.model_dump_json().encode(),
        status_code=202 if r.status == "pending" else 201,
        media_type="application/json",
    )


@router.post(
    "/v1/accounts/{account_id}/payments/{payment_id}/refunds",
    response_model=RefundOut,
    status_code=201,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(RefundIn),
    summary="Refund a payment to its card (operator): taken off the balance, which may go"
    " below zero",
)
async def refund_to_card(
    request: Request, account_id: AccountPath, payment_id: PaymentPath, who: Caller, host: Host
) -> Response:
    """Never more than the payment captured, all its refunds together. Idempotent per
    ``refund_id`` within the account. The balance is debited once per refund, whatever it
    holds: an account without credit left then goes on hold (``account.hold``)."""
    await who.on(account_id, "payments.refund")
    body = await json_body(request, RefundIn)
    await host.known(account_id)
    await host.loaded(account_id)
    svc = payments_of(host)
    r = await _refund(
        svc.refunds.refund_to_card(account_id, payment_id, body.refund_id, body.amount, body.reason)
    )
    return _answer(r)


@router.post(
    "/v1/accounts/{account_id}/credits",
    response_model=RefundOut,
    status_code=201,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(CreditIn),
    summary="Give money back as account credit (operator), e.g. for a disputed call",
)
async def credit(request: Request, account_id: AccountPath, who: Caller, host: Host) -> Response:
    """A ledger ``refund`` row of +amount and the balance credited, once per ``credit_id``
    within the account; the next invoice shows it as a negative line."""
    await who.on(account_id, "payments.refund")
    body = await json_body(request, CreditIn)
    await host.known(account_id)
    await host.loaded(account_id)
    svc = payments_of(host)
    r = await _refund(svc.refunds.credit(account_id, body.credit_id, body.amount, body.reason))
    return _answer(r)
