"""Add-on minute bundles bought from the balance."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from balance.bundles import BundleError, buy_bundle
from contracts.money import format_money
from enforcement.http.models import BundlePurchaseIn, BundlePurchaseOut
from enforcement.http.services import Services, account_state, known, within_redis
from infra.http import errors
from infra.http.bodies import AccountPath, json_body
from infra.http.callers import Caller
from infra.http.errors import ApiError

router = APIRouter()

#: A refused purchase's reason -> (status, the field at fault).
_REFUSALS = {
    "unknown_bundle": (404, "bundle_id"),
    "unknown_account": (404, "account_id"),
    "insufficient_credit": (409, None),
}


@router.post(
    "/v1/accounts/{account_id}/bundles",
    response_model=BundlePurchaseOut,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    summary="Buy an add-on minute bundle from the balance (admin); idempotent per purchase_id",
)
async def buy(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> JSONResponse:
    """The price is debited and the minutes land in the account's bucket together, once
    per ``purchase_id``; 409 ``insufficient_credit`` when the credit does not cover it."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, BundlePurchaseIn)
    await known(svc, account_id)
    await account_state(svc, account_id)  # rebuilds a lost Redis state first
    try:
        p = await within_redis(
            buy_bundle(svc.pool, svc.balances, account_id, body.bundle_id, body.purchase_id),
            svc.authorizer.deadline_s,
        )
    except BundleError as exc:
        status, field = _REFUSALS.get(exc.reason, (409, None))
        message = str(exc)
        if exc.reason == "insufficient_credit" and not who.sees_prices:
            message = "the available credit does not cover this bundle"  # the price is hidden
        raise ApiError(status, exc.reason, message, field) from None
    out = BundlePurchaseOut(
        account_id=account_id,
        purchase_id=p.purchase_id,
        bundle_id=p.bundle_id,
        minutes=p.seconds // 60,
        price=format_money(p.price) if who.sees_prices else None,
        valid_from=p.valid_from,
        expires_at=p.expires_at,
        balance=format_money(p.balance),
        created=p.applied,
    )
    # A managed account never sees a price: not even the field (its balance shows the total).
    exclude = None if who.sees_prices else {"price"}
    return JSONResponse(out.model_dump(mode="json", exclude=exclude))
