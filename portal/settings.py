"""An account's Settings page (``/portal/a/{account_id}/settings``): what whoever holds
``billing.write`` on it may change, gathered on one page. Above all it is how a manager's
admin changes a managed account's settings from that account's pages: its plan and
extensions (``PATCH .../subscription``), invoice auto-pay (``PATCH .../invoice_settings``),
auto-recharge (``PUT .../auto_recharge``), and suspend / resume (``account.status``, the
Overview's form). The credit limit, the low-balance threshold and the verification level are
the operator's (``account.settings``): shown, never a form.

Every change is the API's route with the signed-in person as its principal, so a managed
account's own admins reach the same page and the same routes, and never see a price: the
routes leave prices out for them (``sees_prices``), and the page prints none it is not given.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from contracts.events import ACCOUNT_ID_PATTERN
from enforcement.http import invoices, subscriptions
from infra.http.access import Permission
from infra.http.errors import ApiError
from portal.calls import data, with_body
from portal.pages import account_page, auto_recharge_body, enter, optional
from portal.web import Ctx, act, context, field, form, html, may, whole
from recharge import routes as payment_routes

router = APIRouter()

Account = Annotated[str, Path(pattern=ACCOUNT_ID_PATTERN)]

PAGES: Final[dict[str, Permission]] = {"/portal/a/{account_id}/settings": "billing.write"}

NOTICES: Final = {
    "plan": "Plan saved: an upgrade applies at once, a downgrade at the next period.",
    "invoices": "Invoice auto-pay saved.",
    "auto_recharge": "Auto-recharge settings saved.",
}


async def _settings(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    relation = await ctx.who.on(account_id, "billing.write")
    sub = await optional(subscriptions.read(account_id, ctx.who, ctx.svc))
    on_sale = await data(subscriptions.plans(ctx.who, ctx.svc))
    invoicing = await data(invoices.read_settings(account_id, ctx.who, ctx.svc))
    recharge = await optional(payment_routes.get_auto_recharge(account_id, ctx.who, ctx.host))
    return await account_page(
        ctx,
        account_id,
        "settings.html",
        "/settings",
        notices=NOTICES,
        managed=relation == "managed",
        sub=sub,
        plans=on_sale["data"],
        invoicing=invoicing,
        recharge=recharge,
        may_status=await may(ctx, account_id, "account.status"),
        **extra,
    )


@router.get("/portal/a/{account_id}/settings")
@html
async def settings(request: Request, account_id: Account) -> Response:
    ctx = await enter(request, account_id, PAGES["/portal/a/{account_id}/settings"])
    return await _settings(ctx, account_id)


def _shown(exc: ApiError) -> bool:
    # a refusal of the change itself, 403s included (e.g. lift_not_permitted), is shown here
    return not (exc.status == 403 and exc.code in ("forbidden", "csrf_failed"))


async def _change(ctx: Ctx, account_id: str, work: Any, notice: str) -> Response:
    return await act(
        data(work),
        partial(_settings, ctx, account_id),
        f"/portal/a/{account_id}/settings",
        notice,
        shown=_shown,
    )


@router.post("/portal/a/{account_id}/settings/plan")
@html
async def plan(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body: dict[str, object] = {}
    if field(posted, "plan_id"):
        body["plan_id"] = field(posted, "plan_id")
    extensions = field(posted, "extensions")
    if extensions:
        body["extensions"] = whole(extensions)
    route = subscriptions.update(with_body(body), account_id, ctx.who, ctx.svc)
    return await _change(ctx, account_id, route, "plan")


@router.post("/portal/a/{account_id}/settings/invoices")
@html
async def invoicing(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body = {"auto_pay": field(posted, "auto_pay") == "on"}
    route = invoices.update_settings(with_body(body), account_id, ctx.who, ctx.svc)
    return await _change(ctx, account_id, route, "invoices")


@router.post("/portal/a/{account_id}/settings/auto_recharge")
@html
async def auto_recharge(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    body = auto_recharge_body(await form(ctx))
    route = payment_routes.put_auto_recharge(with_body(body), account_id, ctx.who, ctx.host)
    return await _change(ctx, account_id, route, "auto_recharge")
