"""Plans on sale and an account's subscription (``enforcement.subscriptions``; seeds 001 and
004: "Subscription Summary", "Usage This Period"). Permissions (``infra.http.access``):
``plans.read`` for what can be bought, ``billing.read`` / ``billing.write`` for the
subscription. A managed account's caller is never shown a rate or a fee (seed 003): it sees
quantities and totals."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from contracts.money import format_money
from enforcement import subscriptions as subs
from enforcement.http.services import Services, account_state, known, within_redis
from infra.http import errors
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import DB_TIMEOUT_S, within_db
from infra.http.callers import Caller
from infra.http.errors import ApiError
from infra.http.models import Money, RequestBody

router = APIRouter()

#: What a managed account's caller is not shown: every price.
_PRICES: Final = {"monthly_fee", "did_rate", "extension_rate", "price", "rate"}


class PlanOut(BaseModel):
    id: str
    name: str
    description: str
    billing_model: subs.BillingModel = Field(description="flat_rate or payg")
    monthly_fee: Money | None = Field(default=None, description="flat rate: the period's fee")
    included_minutes: int
    included_dids: int
    included_extensions: int
    did_rate: Money | None = Field(
        default=None, description="a month, per DID beyond those included (PAYG: every one)"
    )
    extension_rate: Money | None = Field(
        default=None, description="a month, per extension beyond those included (PAYG: each)"
    )
    max_concurrent_calls: int = Field(description="inbound and outbound together; 0: no limit")


class BundleOut(BaseModel):
    id: str
    description: str
    minutes: int
    price: Money | None = None
    validity_days: int


class PlansOut(BaseModel):
    data: list[PlanOut]
    bundles: list[BundleOut] = Field(description="add-on minute bundles on sale")


class MinutesOut(BaseModel):
    used: int = Field(description="minutes drawn from the period's allowance, rounded down")
    used_s: int
    included: int
    included_s: int
    reserved_s: int = Field(description="held by calls in flight, not counted as used")
    remaining_s: int
    percent_used: str = Field(description="used of included, two decimals", examples=["26.06"])


class CountOut(BaseModel):
    used: int
    included: int


class LineOut(BaseModel):
    """One line of the period's figures: a count and what it comes to (the rate is left out
    for a managed account's caller)."""

    quantity: int
    rate: Money | None = None
    amount: Money


class SubscriptionOut(BaseModel):
    account_id: str
    plan: PlanOut
    next_plan_id: str | None = Field(description="a downgrade taking effect at the next period")
    status: subs.SubscriptionStatus = Field(description="active, trial or suspended")
    billing_model: subs.BillingModel
    monthly_fee: Money | None = Field(default=None, description="flat rate only")
    started_at: datetime
    trial_until: datetime | None
    period_start: datetime
    period_end: datetime
    next_invoice_date: datetime
    period_fee: Money = Field(description="what the period's plan fees came to (upgrades too)")
    minutes: MinutesOut
    dids: CountOut
    extensions: CountOut
    overage: dict[str, LineOut] | None = Field(
        default=None,
        description="flat rate: what accrues beyond the plan (minutes charged in money, DIDs"
        " and extensions beyond those included)",
    )
    estimate: dict[str, LineOut] | None = Field(
        default=None, description="PAYG: extensions, DIDs and minutes at their rates"
    )
    accruing: Money = Field(description="the overage (flat rate) or the estimate (PAYG) total")


class SubscriptionIn(RequestBody):
    """Fields left out are unchanged. A plan with a higher fee takes effect at once (the
    difference prorated); any other at the next period's start."""

    plan_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    extensions: Annotated[int, Field(ge=0, le=1_000_000)] | None = None


def plan_out(t: subs.Tier) -> PlanOut:
    return PlanOut(
        id=t.id,
        name=t.name,
        description=t.description,
        billing_model=t.billing_model,
        monthly_fee=format_money(t.monthly_fee) if t.billing_model == "flat_rate" else None,
        included_minutes=t.included_s // 60,
        included_dids=t.included_dids,
        included_extensions=t.included_extensions,
        did_rate=format_money(t.did_rate),
        extension_rate=format_money(t.extension_rate),
        max_concurrent_calls=t.max_concurrent_calls,
    )


def subscription_out(s: subs.Summary) -> SubscriptionOut:
    p = s.plan
    payg = p.billing_model == "payg"
    lines = {
        "extensions": LineOut(
            quantity=s.extensions_used
            if payg
            else max(0, s.extensions_used - p.included_extensions),
            rate=format_money(p.extension_rate),
            amount=format_money(s.extensions_amount),
        ),
        "dids": LineOut(
            quantity=s.dids_used if payg else max(0, s.dids_used - p.included_dids),
            rate=format_money(p.did_rate),
            amount=format_money(s.dids_amount),
        ),
        "minutes": LineOut(
            quantity=-(-s.calls_billed_s // 60) if payg else 0,
            amount=format_money(s.calls_amount),
        ),
    }
    return SubscriptionOut(
        account_id=s.account_id,
        plan=plan_out(p),
        next_plan_id=None if s.next_plan is None else s.next_plan.id,
        status=s.status,
        billing_model=p.billing_model,
        monthly_fee=None if payg else format_money(p.monthly_fee),
        started_at=s.started_at,
        trial_until=s.trial_until,
        period_start=s.period.start,
        period_end=s.period.end,
        next_invoice_date=s.next_invoice_date,
        period_fee=format_money(s.period.fee),
        minutes=MinutesOut(
            used=s.minutes_used_s // 60,
            used_s=s.minutes_used_s,
            included=s.minutes_included_s // 60,
            included_s=s.minutes_included_s,
            reserved_s=s.minutes_reserved_s,
            remaining_s=s.minutes_remaining_s,
            percent_used=s.percent_used,
        ),
        dids=CountOut(used=s.dids_used, included=p.included_dids),
        extensions=CountOut(used=s.extensions_used, included=p.included_extensions),
        overage=None if payg else lines,
        estimate=lines if payg else None,
        accruing=format_money(s.accruing),
    )


def _without_prices(doc: Any) -> Any:
    """``doc`` with every price field left out, at any depth."""
    if isinstance(doc, dict):
        return {k: _without_prices(v) for k, v in doc.items() if k not in _PRICES}
    if isinstance(doc, list):
        return [_without_prices(v) for v in doc]
    return doc


def _answer(out: BaseModel, *, prices: bool) -> JSONResponse:
    doc = out.model_dump(mode="json")
    return JSONResponse(doc if prices else _without_prices(doc))


@router.get(
    "/v1/plans",
    response_model=PlansOut,
    responses=errors.responses(401, 403, 503),
    summary="The plans on sale and the add-on minute bundles, with their prices",
)
async def plans(who: Caller, svc: Services) -> JSONResponse:
    """What can be bought. A managed account's caller sees the tiers without a price."""
    if who.key.role != "operator":
        if who.key.account_id is None:
            raise ApiError(403, "forbidden", "a service key may not do this")
        await who.on(who.key.account_id, "plans.read")
    tiers = await within_db(subs.tiers(svc.pool))
    rows = await within_db(
        svc.pool.fetch(
            "SELECT id, description, seconds, price, validity_days FROM bundles ORDER BY price, id"
        )
    )
    out = PlansOut(
        data=[plan_out(t) for t in tiers],
        bundles=[
            BundleOut(
                id=r["id"],
                description=r["description"],
                minutes=r["seconds"] // 60,
                price=format_money(r["price"]),
                validity_days=r["validity_days"],
            )
            for r in rows
        ],
    )
    return _answer(out, prices=who.sees_prices)


def _missing(account_id: str) -> ApiError:
    return ApiError(
        404, "no_subscription", f"account {account_id!r} has no subscription", "account_id"
    )


@router.get(
    "/v1/accounts/{account_id}/subscription",
    response_model=SubscriptionOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The subscription and the period's usage: plan, status, dates, minutes, DIDs",
)
async def read(account_id: AccountPath, who: Caller, svc: Services) -> JSONResponse:
    """Minutes in real time from the balance store (calls in flight apart, as reserved);
    calls' money and DIDs from the book of record."""
    await who.on(account_id, "billing.read")
    await known(svc, account_id)
    await account_state(svc, account_id)  # a lost Redis state rebuilt first
    s = await within_db(
        within_redis(
            subs.Subscriptions(svc.pool, svc.balances, clock=svc.clock).summary(account_id),
            DB_TIMEOUT_S,
        )
    )
    if s is None:
        raise _missing(account_id)
    return _answer(subscription_out(s), prices=who.sees_prices)


_REFUSED: Final = {
    "unknown_plan": 422,
    "plan_not_on_sale": 422,
    "no_subscription": 422,
    "insufficient_credit": 409,
    "unknown_account": 404,
}


@router.patch(
    "/v1/accounts/{account_id}/subscription",
    response_model=SubscriptionOut,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(SubscriptionIn),
    summary="Subscribe, upgrade (at once, prorated) or downgrade (next period); set extensions",
)
async def update(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> JSONResponse:
    """409 ``insufficient_credit`` when the available credit does not cover an upgrade's
    prorated fee (nothing changes). Safe to repeat: the same plan asked again changes nothing."""
    await who.on(account_id, "billing.write")
    body = await json_body(request, SubscriptionIn)
    await known(svc, account_id)
    await account_state(svc, account_id)
    service = subs.Subscriptions(svc.pool, svc.balances, clock=svc.clock)
    try:
        await within_db(
            within_redis(
                service.change(account_id, body.plan_id, extensions=body.extensions), DB_TIMEOUT_S
            )
        )
    except subs.SubscriptionError as exc:
        message = exc.message
        if exc.code == "insufficient_credit" and not who.sees_prices:
            message = "the available credit does not cover this change"
        raise ApiError(_REFUSED.get(exc.code, 409), exc.code, message, exc.field) from None
    s = await within_db(service.summary(account_id))
    if s is None:
        raise _missing(account_id)
    return _answer(subscription_out(s), prices=who.sees_prices)
