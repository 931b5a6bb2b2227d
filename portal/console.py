"""The operator's console (``/portal/console``) and a manager's managed accounts
(``/portal/managed``).

The console is for operators only: it needs ``account.settings`` (RULES: operators), and what
it does goes through the API's own routes, so an operator still never spends a customer's
card. It finds an account, shows its state and the origin of every suspension, suspends and
resumes as the operator (who may lift every origin), sets the verification level and refunds a
payment to its card (``recharge.refund_routes``: never more than it captured).

A manager's admin lists the accounts it manages, creates one, and opens any of them: the
account's pages (``portal.pages``) then act on it as the rules let a manager.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Final

import asyncpg
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from contracts.events import ACCOUNT_ID_PATTERN
from enforcement.http import accounts, tenants
from infra.http.access import Permission
from infra.http.bounds import within_db
from infra.http.errors import ApiError
from portal.calls import data, with_body
from portal.web import Ctx, context, field, form, html, may_anywhere, render, see, whole
from recharge import refund_routes

router = APIRouter()

#: The pages with no account in their path -> the permission they need (anywhere).
PAGES: Final[dict[str, Permission]] = {
    "/portal/console": "account.settings",
    "/portal/managed": "accounts.list",
}

NOTICES: Final = {
    "suspended": "Account suspended by the operator.",
    "resumed": "What the operator may lift is lifted.",
    "verified": "Verification level saved.",
    "created": "Managed account created.",
    "refunded": "Refund sent to the card (or pending the gateway's answer).",
}


async def origins(pool: asyncpg.Pool, account_id: str) -> list[dict[str, Any]]:
    """Who suspended the account and why (``account_suspensions``, written by
    ``enforcement.account_admin``): a read for the console."""
    rows = await pool.fetch(
        "SELECT origin, reason, set_by, set_at FROM account_suspensions"
        " WHERE account_id = $1 ORDER BY set_at",
        account_id,
    )
    return [{**dict(r), "set_at": r["set_at"].isoformat()} for r in rows]


def _top(ctx: Ctx, current: str) -> list[dict[str, Any]]:
    links = [
        ("Console", "/portal/console", "account.settings"),
        ("Managed accounts", "/portal/managed", "accounts.list"),
    ]
    return [
        {"label": label, "href": href, "current": href == current}
        for label, href, permission in links
        if may_anywhere(ctx, permission)  # type: ignore[arg-type]
    ]


async def _console(ctx: Ctx, q: str | None, **extra: Any) -> Response:
    found: dict[str, Any] | None = None
    error: ApiError | None = extra.pop("error", None)
    if q:
        try:
            profile = await data(tenants.read(q, ctx.who, ctx.svc))
            balance = await data(accounts.balance(q, ctx.who, ctx.svc))
            found = {
                "profile": profile,
                "balance": balance,
                "origins": await within_db(origins(ctx.svc.pool, q)),
            }
        except ApiError as exc:
            if exc.status != 404:
                raise
            error = error or exc
    listed = await data(tenants.list_(ctx.who, ctx.svc, 50, None))
    notice = NOTICES.get(ctx.request.query_params.get("notice", ""))
    return render(
        "console.html",
        extra.pop("status", 200),
        ctx=ctx,
        nav=_top(ctx, "/portal/console"),
        q=q or "",
        found=found,
        listed=listed["data"],
        error=error,
        notice=None if error else notice,
        csrf=ctx.session.csrf,
        refund_id=f"rf_{secrets.token_hex(6)}",
        **extra,
    )


@router.get("/portal/console")
@html
async def console(
    request: Request,
    q: Annotated[str | None, Query(pattern=ACCOUNT_ID_PATTERN)] = None,
) -> Response:
    ctx = await context(request)
    ctx.who.anywhere(PAGES["/portal/console"])
    return await _console(ctx, q)


@router.post("/portal/console/{account_id}")
@html
async def console_act(
    request: Request, account_id: Annotated[str, Path(pattern=ACCOUNT_ID_PATTERN)]
) -> Response:
    ctx = await context(request)
    ctx.who.anywhere(PAGES["/portal/console"])
    posted = await form(ctx)
    action = field(posted, "action")
    try:
        if action in ("suspend", "resume"):
            route = accounts.suspend if action == "suspend" else accounts.resume
            reason = field(posted, "reason")
            await route(
                with_body({"reason": reason} if reason else None), account_id, ctx.who, ctx.svc
            )
            notice = "suspended" if action == "suspend" else "resumed"
        elif action == "refund":
            body: dict[str, object] = {
                "refund_id": field(posted, "refund_id"),
                "reason": field(posted, "refund_reason"),
            }
            if field(posted, "amount"):
                body["amount"] = field(posted, "amount")
            await refund_routes.refund_to_card(
                with_body(body), account_id, field(posted, "payment_id"), ctx.who, ctx.host
            )
            notice = "refunded"
        elif action == "verification":
            level = field(posted, "verification_level")
            body = {"verification_level": whole(level)}
            await tenants.update(with_body(body), account_id, ctx.who, ctx.svc)
            notice = "verified"
        else:
            raise ApiError(422, "validation_error", "unknown action", "action")
    except ApiError as exc:
        if exc.status == 403 and exc.code == "forbidden":
            raise
        return await _console(ctx, account_id, error=exc, status=exc.status)
    return see(f"/portal/console?q={account_id}&notice={notice}")


@router.get("/portal/managed")
@html
async def managed(request: Request) -> Response:
    ctx = await context(request)
    ctx.who.anywhere(PAGES["/portal/managed"])
    return await _managed(ctx)


async def _managed(ctx: Ctx, **extra: Any) -> Response:
    listed = await data(tenants.list_(ctx.who, ctx.svc, 200, None))
    notice = NOTICES.get(ctx.request.query_params.get("notice", ""))
    error = extra.pop("error", None)
    return render(
        "managed.html",
        extra.pop("status", 200),
        ctx=ctx,
        nav=_top(ctx, "/portal/managed"),
        own=ctx.session.key.account_id,
        listed=listed["data"],
        may_create=may_anywhere(ctx, "accounts.create"),
        error=error,
        notice=None if error else notice,
        csrf=ctx.session.csrf,
    )


@router.post("/portal/managed")
@html
async def managed_create(request: Request) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    try:
        await tenants.create(with_body({"name": field(posted, "name")}), ctx.who, ctx.svc)
    except ApiError as exc:
        if exc.status == 403:
            raise
        return await _managed(ctx, error=exc, status=exc.status)
    return see("/portal/managed", "created")
