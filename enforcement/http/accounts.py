"""An account's balance, and its suspend / resume (who may lift what: enforcement.account_admin)."""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter, Request

from contracts.money import format_money
from enforcement.account_admin import (
    Action,
    Actor,
    LiftNotPermitted,
    StateNotApplied,
    UnknownAccount,
    change_status,
)
from enforcement.http.models import BalanceOut, StatusIn, StatusOut
from enforcement.http.services import (
    ApiServices,
    Services,
    account_state,
    known,
)
from infra.http import errors
from infra.http.access import Relation, forbidden
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import within_db
from infra.http.callers import Caller, Principal
from infra.http.errors import ApiError

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


#: How the caller stands to the account -> who it acts as. A service key never holds
#: ``account.status``; ``allow`` refuses it before this is read.
_ACTORS: Final[dict[Relation, Actor]] = {
    "own": "tenant",
    "managed": "manager",
    "operator": "operator",
}


async def set_status(
    request: Request,
    svc: ApiServices,
    account_id: str,
    who: Principal,
    action: Action,
) -> StatusOut:
    actor = _ACTORS.get(await who.on(account_id, "account.status"))
    if actor is None:
        raise forbidden()
    body = await json_body(request, StatusIn, optional=True)
    await known(svc, account_id)
    # Load a lost Redis state *before* the origins change: loaded afterwards it would already
    # be suspended, and the suspend signal would never be queued (change_status checks too;
    # here the rebuild is shared with the authorizations that met the same loss).
    await account_state(svc, account_id)
    try:
        # PostgreSQL first, then Redis (bounded by the authorization deadline), under one
        # bound: a failure between the two is repaired by retrying the request.
        out = await within_db(
            change_status(
                svc.pool,
                svc.balances,
                account_id,
                action,
                actor,
                reason=body.reason,
                set_by=who.key.key_id,
                redis_timeout_s=svc.authorizer.deadline_s,
            )
        )
    except UnknownAccount:
        raise ApiError(
            404, "account_not_found", f"no account {account_id!r}", "account_id"
        ) from None
    except LiftNotPermitted as exc:
        raise ApiError(403, "lift_not_permitted", str(exc)) from None
    except StateNotApplied as exc:
        raise errors.balance_store_unavailable(str(exc)) from exc
    return StatusOut(
        account_id=account_id,
        status=out.status,
        changed=out.changed,
        suspended_by=list(out.suspended_by),
        hold_reason=out.hold_reason,
    )


_STATUS_DOC = body_doc(StatusIn, required=False)


@router.post(
    "/v1/accounts/{account_id}/suspend",
    response_model=StatusOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=_STATUS_DOC,
    summary="Suspend the account (its admin, its manager's admin, an operator): inbound and "
    "outbound blocked; queues account.suspend",
)
async def suspend(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> StatusOut:
    """Records the caller's origin (``tenant`` for the account's admin, ``manager`` for its
    manager's, ``operator``) with ``reason`` and the key that asked. An account is suspended
    while any origin is there; the first queues ``account.suspend``, another origin is
    recorded without a second signal. Idempotent: an origin already there is left as it was
    (``changed`` false). A manager's suspension is of this account alone: the accounts a
    manager manages are never suspended with it."""
    return await set_status(request, svc, account_id, who, "suspend")


@router.post(
    "/v1/accounts/{account_id}/resume",
    response_model=StatusOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=_STATUS_DOC,
    summary="Lift what the caller may lift; once no suspension is left, queues account.resume "
    "(and account.hold when still held)",
)
async def resume(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> StatusOut:
    """Lifts only what the caller may: the account's admin its own suspension (``tenant``),
    its manager's admin also its own (``manager``), an operator every origin (``past_due``
    included) and the hold the service pinned (``hold_reason``, e.g. ``recharge_cap``; a
    payment lifts that too). While origins are left the account stays suspended
    (``suspended_by`` names them); once none is, it returns to where its credit puts it
    (active, low, hold), or to hold for a pin the caller may not lift, queuing
    ``account.resume`` then ``account.hold``. 403 ``lift_not_permitted`` when something holds
    the account and the caller may lift none of it (nothing changes); nothing there at all
    answers ``changed`` false."""
    return await set_status(request, svc, account_id, who, "resume")
