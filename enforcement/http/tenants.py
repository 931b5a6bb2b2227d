"""Accounts as operators and managers see them (``enforcement.tenants``): create, list, read a
profile, and the operator's settings. Permissions: ``infra.http.access``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from contracts.events import ACCOUNT_ID_PATTERN
from contracts.money import Micros, format_money
from enforcement import tenants
from enforcement.http.services import Services, account_state, known
from infra.http import errors, pages
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import within_db
from infra.http.callers import Caller
from infra.http.errors import ApiError
from infra.http.models import Money, RequestBody

router = APIRouter()

_NAME = Annotated[str, Field(max_length=200)]


class AccountIn(RequestBody):
    """A new account. A manager's admin creates an account it manages (no ``id``: one is
    made; no price list: it is rated with its manager's). An operator may give ``id``,
    ``price_list_id``, ``manager_id`` and a credit limit."""

    name: _NAME = ""
    id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)] | None = None
    price_list_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    manager_id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)] | None = None
    credit_limit: Annotated[Micros, Field(ge=0)] = 0
    low_balance_threshold: Annotated[Micros, Field(ge=0)] = 0


class AccountSettingsIn(RequestBody):
    """The operator's settings; fields left out are unchanged."""

    name: _NAME | None = None
    credit_limit: Annotated[Micros, Field(ge=0)] | None = None
    low_balance_threshold: Annotated[Micros, Field(ge=0)] | None = None
    verification_level: Annotated[int, Field(ge=1, le=2)] | None = Field(
        default=None, description="2 lifts the new-account payment limits"
    )
    is_manager: bool | None = Field(default=None, description="may create managed accounts")


class AccountOut(BaseModel):
    id: str
    name: str
    currency: str
    price_list_id: str | None = Field(
        default=None,
        description="the account's own price list (null: its manager's); absent in what a"
        " managed account reads: it never sees a price",
    )
    manager_id: str | None
    is_manager: bool
    credit_limit: Money
    low_balance_threshold: Money
    verification_level: int
    created_at: datetime


class AccountsOut(BaseModel):
    data: list[AccountOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: done")


def account_out(p: tenants.Profile, *, prices: bool) -> AccountOut:
    return AccountOut(
        id=p.id,
        name=p.name,
        currency=p.currency,
        price_list_id=p.price_list_id if prices else None,
        manager_id=p.manager_id,
        is_manager=p.is_manager,
        credit_limit=format_money(p.credit_limit),
        low_balance_threshold=format_money(p.low_balance_threshold),
        verification_level=p.verification_level,
        created_at=p.created_at,
    )


def _answer(out: BaseModel, *, prices: bool, status: int = 200) -> JSONResponse:
    """``out`` as JSON; without ``prices`` (a managed account's caller) no price-list field at
    all, not even a null one: a managed account never sees a price."""
    exclude: Any = None
    if not prices:
        exclude = (
            {"data": {"__all__": {"price_list_id"}}}
            if isinstance(out, AccountsOut)
            else {"price_list_id"}
        )
    return JSONResponse(out.model_dump(mode="json", exclude=exclude), status_code=status)


def _conflict(exc: tenants.AccountConflict) -> ApiError:
    status = 422 if exc.code in ("unknown_price_list", "not_a_manager") else 409
    return ApiError(status, exc.code, exc.message, exc.field)


@router.post(
    "/v1/accounts",
    status_code=201,
    response_model=AccountOut,
    responses=errors.responses(400, 401, 403, 409, 422, 503),
    openapi_extra=body_doc(AccountIn),
    summary="Create an account: a managed account (a manager's admin) or any (an operator)",
)
async def create(request: Request, who: Caller, svc: Services) -> JSONResponse:
    """A manager's admin creates an account it manages, with its own balance (zero), payment
    method and status, rated with the manager's price list; it gives neither an id, nor a
    price list, nor a manager, nor a credit limit (422). An operator creates any account: a
    top-level one needs ``price_list_id``, a managed one ``manager_id``."""
    relation = who.anywhere("accounts.create")
    body = await json_body(request, AccountIn)
    if relation == "managed":
        for field in ("id", "price_list_id", "manager_id"):
            if getattr(body, field) is not None:
                raise ApiError(422, "operator_only", f"only an operator sets {field}", field)
        if body.credit_limit:
            raise ApiError(
                422, "operator_only", "only an operator sets credit_limit", "credit_limit"
            )
        manager_id, price_list_id = who.key.account_id, None
    else:
        manager_id, price_list_id = body.manager_id, body.price_list_id
        if manager_id is None and price_list_id is None:
            raise ApiError(
                422,
                "price_list_required",
                "a top-level account needs price_list_id",
                "price_list_id",
            )
    try:
        p = await within_db(
            tenants.create_account(
                svc.pool,
                svc.balances,
                account_id=body.id,
                name=body.name,
                manager_id=manager_id,
                price_list_id=price_list_id,
                credit_limit=body.credit_limit,
                low_balance_threshold=body.low_balance_threshold,
            )
        )
    except tenants.AccountConflict as exc:
        raise _conflict(exc) from None
    return _answer(account_out(p, prices=who.sees_prices), prices=who.sees_prices, status=201)


@router.get(
    "/v1/accounts",
    response_model=AccountsOut,
    responses=errors.responses(401, 403, 422, 503),
    summary="Accounts: every account (an operator) or those a manager manages",
)
async def list_(
    who: Caller,
    svc: Services,
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> JSONResponse:
    """Newest first."""
    relation = who.anywhere("accounts.list")
    manager = who.key.account_id if relation == "managed" else None
    before = pages.decode("accounts", cursor)
    rows = await within_db(
        tenants.list_accounts(svc.pool, manager_id=manager, before=before, limit=limit + 1)
    )
    shown, next_cursor = pages.page("accounts", rows, limit, lambda p: (p.created_at, p.id))
    out = AccountsOut(
        data=[account_out(p, prices=who.sees_prices) for p in shown], next_cursor=next_cursor
    )
    return _answer(out, prices=who.sees_prices)


@router.get(
    "/v1/accounts/{account_id}",
    response_model=AccountOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The account's profile",
)
async def read(account_id: AccountPath, who: Caller, svc: Services) -> JSONResponse:
    await who.on(account_id, "account.read")
    p = await within_db(tenants.profile(svc.pool, account_id))
    if p is None:
        raise ApiError(404, "account_not_found", f"no account {account_id!r}", "account_id")
    return _answer(account_out(p, prices=who.sees_prices), prices=who.sees_prices)


@router.patch(
    "/v1/accounts/{account_id}",
    response_model=AccountOut,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(AccountSettingsIn),
    summary="The operator's settings: credit limit, threshold, verification, manager",
)
async def update(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> JSONResponse:
    """A new credit limit moves the account where its credit now puts it (a hold on money
    alone is lifted, with ``account.resume``; a lower limit can hold it)."""
    await who.on(account_id, "account.settings")
    body = await json_body(request, AccountSettingsIn)
    await known(svc, account_id)
    await account_state(svc, account_id)  # rebuild a lost Redis state before its limits move
    try:
        p = await within_db(
            tenants.update_settings(
                svc.pool,
                svc.balances,
                account_id,
                credit_limit=body.credit_limit,
                low_balance_threshold=body.low_balance_threshold,
                verification_level=body.verification_level,
                is_manager=body.is_manager,
                name=body.name,
            )
        )
    except tenants.AccountConflict as exc:
        raise _conflict(exc) from None
    if p is None:
        raise ApiError(404, "account_not_found", f"no account {account_id!r}", "account_id")
    svc.directory.forget(account_id)
    return _answer(account_out(p, prices=who.sees_prices), prices=who.sees_prices)
