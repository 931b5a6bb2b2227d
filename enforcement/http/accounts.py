"""An account's balance, and the operator's suspend / resume."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request

from contracts.money import format_money
from enforcement.account_admin import set_suspended
from enforcement.http.models import BalanceOut, StatusIn, StatusOut
from enforcement.http.services import (
    ApiServices,
    Services,
    account_state,
    known,
    within_redis,
)
from infra.http import errors
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import within_db
from infra.http.callers import Caller, Principal

router = APIRouter()


@router.get(
    "/v1/accounts/{account_id}/balance",
    response_model=BalanceOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The account's balance, pending reservations and available credit",
)
async def balance(account_id: AccountPath, who: Caller, svc: Services) -> BalanceOut:
    await who.on(account_id, "balance.read")
    currency = await known(svc, account_id)
    st = await account_state(svc, account_id)
    return BalanceOut(
        balance=format_money(st.balance),
        pending=format_money(st.reserved),
        credit_limit=format_money(st.credit_limit),
        available_credit=format_money(st.available),
        currency=currency,
        status=st.status,
    )


async def set_status(
    request: Request,
    svc: ApiServices,
    account_id: str,
    who: Principal,
    action: Literal["suspend", "resume"],
) -> StatusOut:
    await who.on(account_id, "account.status")
    body = await json_body(request, StatusIn, optional=True)
    await known(svc, account_id)
    # Load a lost Redis state *before* the flag changes: loaded afterwards it would already
    # be suspended, and the suspend signal would never be queued.
    await account_state(svc, account_id)
    # PostgreSQL first: it is the book of record, and Redis is rebuilt from it. A failure
    # between the two is repaired by retrying the request (both steps are idempotent).
    await within_db(set_suspended(svc.pool, account_id, action == "suspend"))
    change = await within_redis(
        # as before origins: a resume lifts a pinned hold too
        svc.balances.set_status(account_id, action, body.reason, lift_hold=action == "resume"),
        svc.authorizer.deadline_s,
    )
    if change is None:
        raise errors.balance_store_unavailable("account state missing; retry")
    return StatusOut(account_id=account_id, status=change.status, changed=change.changed)


_STATUS_DOC = body_doc(StatusIn, required=False)


@router.post(
    "/v1/accounts/{account_id}/suspend",
    response_model=StatusOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=_STATUS_DOC,
    summary="Block inbound and outbound calls (operator); queues account.suspend",
)
async def suspend(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> StatusOut:
    """Idempotent: suspending a suspended account changes nothing (``changed`` false)."""
    return await set_status(request, svc, account_id, who, "suspend")


@router.post(
    "/v1/accounts/{account_id}/resume",
    response_model=StatusOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=_STATUS_DOC,
    summary="Lift a suspension; queues account.resume (and account.hold without credit)",
)
async def resume(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> StatusOut:
    """Idempotent. The account returns to the state its credit gives (active, low, hold)."""
    return await set_status(request, svc, account_id, who, "resume")
