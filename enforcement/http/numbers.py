"""An account's numbers (``enforcement.numbers``): the inventory with each number's status
(Active / On Hold / Released), auto-pay and next renewal; auto-pay and billing group changed;
a number released by the customer. Permissions (``infra.http.access``): ``billing.read`` to
read, ``billing.write`` to change (seed 001's Telephony & Number Billing is a billing page).
A managed account's caller never sees a fee (seed 003): ``monthly_fee`` and
``one_time_fees`` are left out of what it reads."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from contracts.events import E164_PATTERN
from contracts.money import format_money
from enforcement import groups, numbers
from enforcement.http.services import Services, account_state, known, within_redis
from infra.clock import utc_datetime
from infra.http import errors, pages
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import DB_TIMEOUT_S, within_db
from infra.http.callers import Caller
from infra.http.errors import ApiError
from infra.http.models import Money, RequestBody

router = APIRouter()

NumberPath = Annotated[str, Path(pattern=E164_PATTERN, description="E.164, e.g. +14155550100")]
_GROUP_ID: Final = r"^bg_[a-z0-9]{16}$"
#: What a managed account's caller is not shown.
_FEES: Final = {"monthly_fee", "one_time_fees"}


class NumberOut(BaseModel):
    number: str
    status: numbers.NumberStatus = Field(description="active, on_hold or released")
    auto_pay: bool = Field(description="renew each month from the balance (on by default)")
    monthly_fee: Money | None = Field(
        default=None,
        description="the fee of the last month charged; absent for managed accounts",
    )
    one_time_fees: Money | None = Field(
        default=None, description="what the activation charged beyond its month (setup)"
    )
    activated_at: datetime
    paid_through: str = Field(description="the last month paid (YYYY-MM, UTC)")
    next_renewal: datetime | None = Field(
        description="when the next month is due; null once released"
    )
    billing_group_id: str | None
    held_at: datetime | None
    hold_reason: str | None = Field(description="renewal_unpaid or auto_pay_off")
    grace_until: datetime | None = Field(description="released then, unless renewed first")
    released_at: datetime | None
    release_reason: str | None = Field(description="customer, grace_expired or deactivated")


class NumbersOut(BaseModel):
    data: list[NumberOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: done")


class NumberPatch(RequestBody):
    """Fields left out are unchanged; ``billing_group_id`` null takes the number out of its
    group (charges rated from then on follow; the ledger keeps the past)."""

    auto_pay: bool | None = None
    billing_group_id: Annotated[str, Field(pattern=_GROUP_ID)] | None = None


def number_out(n: numbers.Number) -> NumberOut:
    return NumberOut(
        number=n.number,
        status=n.status,
        auto_pay=n.auto_pay,
        monthly_fee=format_money(n.monthly_fee),
        one_time_fees=format_money(n.one_time_fees),
        activated_at=n.activated_at,
        paid_through=n.paid_through,
        next_renewal=n.next_renewal,
        billing_group_id=n.billing_group_id,
        held_at=n.held_at,
        hold_reason=n.hold_reason,
        grace_until=n.grace_until,
        released_at=n.released_at,
        release_reason=n.release_reason,
    )


def _answer(out: NumberOut | NumbersOut, *, prices: bool) -> JSONResponse:
    exclude: Any = None
    if not prices:
        exclude = {"data": {"__all__": _FEES}} if isinstance(out, NumbersOut) else _FEES
    return JSONResponse(out.model_dump(mode="json", exclude=exclude))


def _not_found(number: str) -> ApiError:
    return ApiError(404, "number_not_found", f"the account has no number {number}", "number")


@router.get(
    "/v1/accounts/{account_id}/numbers",
    response_model=NumbersOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The account's numbers: status, auto-pay, next renewal, billing group",
)
async def list_(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    status: Annotated[numbers.NumberStatus | None, Query()] = None,
    billing_group_id: Annotated[str | None, Query(pattern=_GROUP_ID)] = None,
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> JSONResponse:
    """Newest activation first."""
    await who.on(account_id, "billing.read")
    before = pages.decode("numbers", cursor)
    await known(svc, account_id)
    rows = await within_db(
        numbers.list_numbers(
            svc.pool,
            account_id,
            status=status,
            billing_group_id=billing_group_id,
            before=before,
            limit=limit + 1,
        )
    )
    shown, next_cursor = pages.page("numbers", rows, limit, lambda n: (n.activated_at, n.number))
    out = NumbersOut(data=[number_out(n) for n in shown], next_cursor=next_cursor)
    return _answer(out, prices=who.sees_prices)


@router.get(
    "/v1/accounts/{account_id}/numbers/{number}",
    response_model=NumberOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="One number",
)
async def read(
    account_id: AccountPath, number: NumberPath, who: Caller, svc: Services
) -> JSONResponse:
    await who.on(account_id, "billing.read")
    await known(svc, account_id)
    n = await within_db(numbers.get(svc.pool, account_id, number))
    if n is None:
        raise _not_found(number)
    return _answer(number_out(n), prices=who.sees_prices)


@router.patch(
    "/v1/accounts/{account_id}/numbers/{number}",
    response_model=NumberOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=body_doc(NumberPatch),
    summary="Turn auto-pay on or off, or move the number to another billing group",
)
async def update(
    request: Request, account_id: AccountPath, number: NumberPath, who: Caller, svc: Services
) -> JSONResponse:
    """Auto-pay turned on for a number On Hold renews it at the billing worker's next look
    (``METER_BILLING_SCAN_INTERVAL_S``), when the credit covers the month."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, NumberPatch)
    await known(svc, account_id)
    if await within_db(numbers.get(svc.pool, account_id, number)) is None:
        raise _not_found(number)
    if "billing_group_id" in body.model_fields_set and not await within_db(
        groups.assign_number(svc.pool, account_id, number, body.billing_group_id)
    ):
        raise ApiError(
            422, "unknown_billing_group", "the account has no such group", "billing_group_id"
        )
    if body.auto_pay is not None:
        await within_db(
            numbers.set_auto_pay(
                svc.pool, account_id, number, body.auto_pay, now=utc_datetime(svc.clock)
            )
        )
    n = await within_db(numbers.get(svc.pool, account_id, number))
    if n is None:
        raise _not_found(number)
    return _answer(number_out(n), prices=who.sees_prices)


@router.post(
    "/v1/accounts/{account_id}/numbers/{number}/release",
    response_model=NumberOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="Release the number: recurring charges stop now; the month paid is not refunded",
)
async def release(
    account_id: AccountPath, number: NumberPath, who: Caller, svc: Services
) -> JSONResponse:
    """``number.release`` is published (telephony gives the number back to inventory). A
    number released already is answered as it is (the call is safe to repeat)."""
    await who.on(account_id, "billing.write")
    await known(svc, account_id)
    await account_state(svc, account_id)  # rebuilds a lost Redis state first: seq goes on
    lifecycle = numbers.NumberLifecycle(svc.pool, svc.balances, svc.catalog.lookup, clock=svc.clock)
    n = await within_db(within_redis(lifecycle.release(account_id, number), DB_TIMEOUT_S))
    if n is None:
        raise _not_found(number)
    return _answer(number_out(n), prices=who.sees_prices)
