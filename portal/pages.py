"""The portal's pages of one account (``/portal/a/{account_id}/...``): its overview, Billing,
Invoices, Plan, Numbers, Ledger records, Billing groups; and the person's own start page.

Each page names the permission it needs in ``PAGES`` (``infra.http.access.RULES`` judges it,
as for the API: tests/portal/test_page_permissions.py walks every page x principal), and what
it shows and does comes from the API's own routes (``portal.calls``): a control is shown only
to someone the rules let use it, and the route checks again when it is used.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Final, Literal, get_args

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from starlette.datastructures import FormData

from contracts.events import ACCOUNT_ID_PATTERN
from enforcement.http import (
    accounts,
    bundles,
    groups,
    invoices,
    numbers,
    subscriptions,
    tenants,
)
from enforcement.invoices import InvoiceStatus
from infra.clock import utc_datetime
from infra.http.access import Permission
from infra.http.errors import ApiError
from portal.calls import data, file, with_body
from portal.web import Ctx, act, context, field, form, html, may, render, see
from recharge import routes as payment_routes

router = APIRouter()

_PROFILE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

Account = Annotated[str, Path(pattern=ACCOUNT_ID_PATTERN)]
InvoiceId = Annotated[str, Path(pattern=r"^inv_[a-z0-9]{16}$")]
Number = Annotated[str, Path(pattern=r"^\+[1-9]\d{1,14}$")]
GroupId = Annotated[str, Path(pattern=r"^bg_[a-z0-9]{16}$")]
ProfileId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Month = Annotated[str | None, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")]

#: Every page of an account -> the permission it needs (its forms need their routes' own).
PAGES: Final[dict[str, Permission]] = {
    "/portal/a/{account_id}": "account.read",
    "/portal/a/{account_id}/billing": "billing.read",
    "/portal/a/{account_id}/invoices": "billing.read",
    "/portal/a/{account_id}/invoices/{invoice_id}": "billing.read",
    "/portal/a/{account_id}/invoices/{invoice_id}.pdf": "billing.read",
    "/portal/a/{account_id}/plan": "billing.read",
    "/portal/a/{account_id}/numbers": "billing.read",
    "/portal/a/{account_id}/ledger": "billing_units.read",
    "/portal/a/{account_id}/groups": "billing_units.read",
}

#: The account's navigation: label, page, permission (shown to those the rules let in).
NAV: Final = (
    ("Overview", "", "account.read"),
    ("Billing", "/billing", "billing.read"),
    ("Invoices", "/invoices", "billing.read"),
    ("Plan", "/plan", "billing.read"),
    ("Numbers", "/numbers", "billing.read"),
    ("Ledger records", "/ledger", "billing_units.read"),
    ("Billing groups", "/groups", "billing_units.read"),
    ("Settings", "/settings", "billing.write"),
    ("People", "/users", "people.manage"),
    ("Access groups", "/access_groups", "people.manage"),
    ("API keys", "/keys", "people.manage"),
)

#: What a post that worked says on the page it leads to (by key: no text from the URL).
NOTICES: Final = {
    "paid": "Payment received: the balance has it.",
    "pending": "Payment sent: the card's answer is pending, the balance gets it once it lands.",
    "method_deleted": "Payment method deleted. Make a payment to save another.",
    "auto_recharge": "Auto-recharge settings saved.",
    "invoice_paid": "Payment applied to the invoice.",
    "bundle": "Bundle purchased: its minutes are yours.",
    "auto_pay": "Auto-pay changed.",
    "released": "Number released: it is no longer charged.",
    "suspended": "Account suspended.",
    "resumed": "Account resumed.",
    "group_created": "Billing group created.",
    "group_deleted": "Billing group deleted.",
    "group_members": "The group's numbers and users saved.",
    "profile_saved": "Outbound profile saved: its calls from now on go to its group.",
    "profile_deleted": "Outbound profile deleted.",
}

#: The sandbox gateway's test cards (recharge.sandbox), offered when no method is saved. With
#: Stripe, the token comes from Stripe's own card form, which is not part of the portal yet.
TEST_CARDS: Final = (
    ("pm_card_visa", "Visa ending 4242 (test card)"),
    ("pm_card_mastercard", "Mastercard ending 4444 (test card)"),
    ("pm_card_chargeDeclined", "Card that is declined (test card)"),
)


async def _nav(ctx: Ctx, account_id: str, current: str) -> list[dict[str, Any]]:
    base = f"/portal/a/{account_id}"
    return [
        {"label": label, "href": base + suffix, "current": suffix == current}
        for label, suffix, permission in NAV
        if await may(ctx, account_id, permission)  # type: ignore[arg-type]
    ]


async def account_page(
    ctx: Ctx,
    account_id: str,
    template: str,
    current: str,
    *,
    status: int = 200,
    error: ApiError | None = None,
    notices: Mapping[str, str] = NOTICES,
    **values: Any,
) -> Response:
    """An account's page: its header, navigation, the notice a post left (by key, from
    ``notices``: no text from the URL), the route's error, and ``values``."""
    notice = notices.get(ctx.request.query_params.get("notice", ""))
    profile = await data(_profile(ctx, account_id))
    return render(
        template,
        status,
        ctx=ctx,
        account=profile,
        account_id=account_id,
        nav=await _nav(ctx, account_id, current),
        notice=None if error else notice,
        error=error,
        csrf=ctx.session.csrf,
        **values,
    )


async def _profile(ctx: Ctx, account_id: str) -> Response:
    # The account's name in the header: whoever may open any page of the account holds
    # account.read on it (RULES: every billing and billing-unit reader does).
    return await tenants.read(account_id, ctx.who, ctx.svc)


async def _enter(request: Request, account_id: str, path: str) -> Ctx:
    return await enter(request, account_id, PAGES[path])


async def enter(request: Request, account_id: str, permission: Permission) -> Ctx:
    """The signed-in person, once the rules let it open a page needing ``permission``."""
    ctx = await context(request)
    await ctx.who.on(account_id, permission)
    return ctx


# --- the person's start page -------------------------------------------------------------------


@router.get("/portal/")
@html
async def start(request: Request) -> Response:
    ctx = await context(request)
    key = ctx.session.key
    if key.role == "operator":
        return see("/portal/console")
    if key.account_id is None:
        raise ApiError(403, "forbidden", "this person has no account")
    return see(f"/portal/a/{key.account_id}")


# --- overview: balance and status ----------------------------------------------------------------


async def _overview(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    balance = await data(accounts.balance(account_id, ctx.who, ctx.svc))
    return await account_page(
        ctx,
        account_id,
        "overview.html",
        "",
        balance=balance,
        may_status=await may(ctx, account_id, "account.status"),
        **extra,
    )


@router.get("/portal/a/{account_id}")
@html
async def overview(request: Request, account_id: Account) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}")
    return await _overview(ctx, account_id)


@router.post("/portal/a/{account_id}/status")
@html
async def status(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    action = field(posted, "action")
    route = {"suspend": accounts.suspend, "resume": accounts.resume}.get(action)
    if route is None:
        raise ApiError(422, "validation_error", "action: suspend or resume", "action")
    try:
        await route(with_body(), account_id, ctx.who, ctx.svc)
    except ApiError as exc:
        if exc.status == 403 and exc.code == "forbidden":
            raise
        # e.g. 403 lift_not_permitted: the tenant's page says who holds the suspension
        return await _overview(ctx, account_id, error=exc, status=exc.status)
    return see(f"/portal/a/{account_id}", "suspended" if action == "suspend" else "resumed")


# --- Billing -----------------------------------------------------------------------------------


async def optional(work: Any) -> Any:
    """A route's answer, or None where it answers 404 (nothing set yet)."""
    try:
        return await data(work)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def _billing(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    who, svc, host = ctx.who, ctx.svc, ctx.host
    balance = await data(accounts.balance(account_id, who, svc))
    method = await optional(payment_routes.get_method(account_id, who, host))
    recharge = await optional(payment_routes.get_auto_recharge(account_id, who, host))
    history = await data(payment_routes.history(account_id, who, host))
    return await account_page(
        ctx,
        account_id,
        "billing.html",
        "/billing",
        balance=balance,
        method=method,
        recharge=recharge,
        payments=history["payments"],
        expiry=card_expiry(method, utc_datetime(svc.clock)),
        may_write=await may(ctx, account_id, "billing.write"),
        test_cards=TEST_CARDS,
        payment_id=f"portal_{secrets.token_hex(8)}",
        **extra,
    )


def card_expiry(method: Any, now: datetime) -> Literal["expired", "this_month", "valid"] | None:
    """Where the saved card stands by the clock: a card is good through the last day of its
    expiry month (UTC). None: no card, or its expiry is not known."""
    if not method or not method.get("exp_month") or not method.get("exp_year"):
        return None
    expires, current = (method["exp_year"], method["exp_month"]), (now.year, now.month)
    if expires < current:
        return "expired"
    return "this_month" if expires == current else "valid"


@router.get("/portal/a/{account_id}/billing")
@html
async def billing(request: Request, account_id: Account) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/billing")
    return await _billing(ctx, account_id)


async def _or_billing_page(ctx: Ctx, account_id: str, exc: ApiError) -> Response:
    if exc.status == 403 and exc.code in ("forbidden", "csrf_failed"):
        raise exc
    return await _billing(ctx, account_id, error=exc, status=exc.status)


@router.post("/portal/a/{account_id}/billing/payments")
@html
async def make_payment(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body: dict[str, object] = {
        "amount": field(posted, "amount"),
        "payment_id": field(posted, "payment_id"),
    }
    card = field(posted, "card")
    try:
        if card:  # no saved method: the card chosen is saved first, as the seed says
            await data(
                payment_routes.put_method(with_body({"token": card}), account_id, ctx.who, ctx.host)
            )
        try:
            out = await data(payment_routes.pay(with_body(body), account_id, ctx.who, ctx.host))
        except ApiError as exc:
            if card and exc.code != "card_declined":
                # Refused before any charge (an amount under the minimum, over the limit): the
                # card is not kept for a payment that never was. A declined card is kept, as
                # the API keeps it, so that the history names it.
                await payment_routes.delete_method(account_id, ctx.who, ctx.host)
            raise
    except ApiError as exc:
        return await _or_billing_page(ctx, account_id, exc)
    notice = "pending" if out["status"] == "pending" else "paid"
    return see(f"/portal/a/{account_id}/billing", notice)


@router.post("/portal/a/{account_id}/billing/method/delete")
@html
async def delete_method(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    await form(ctx)
    try:
        await payment_routes.delete_method(account_id, ctx.who, ctx.host)
    except ApiError as exc:
        return await _or_billing_page(ctx, account_id, exc)
    return see(f"/portal/a/{account_id}/billing", "method_deleted")


def auto_recharge_body(posted: FormData) -> dict[str, object]:
    """The auto-recharge form's post (``_auto_recharge_form.html``, on the Billing and Settings
    pages) as the API route's body; the route validates it."""
    return {
        "enabled": field(posted, "enabled") == "on",
        "threshold_amount": field(posted, "threshold_amount"),
        "recharge_amount": field(posted, "recharge_amount"),
    }


@router.post("/portal/a/{account_id}/billing/auto_recharge")
@html
async def auto_recharge(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    body = auto_recharge_body(await form(ctx))
    try:
        await data(payment_routes.put_auto_recharge(with_body(body), account_id, ctx.who, ctx.host))
    except ApiError as exc:
        return await _or_billing_page(ctx, account_id, exc)
    return see(f"/portal/a/{account_id}/billing", "auto_recharge")


# --- Invoices ----------------------------------------------------------------------------------


@router.get("/portal/a/{account_id}/invoices")
@html
async def invoice_list(
    request: Request,
    account_id: Account,
    status: Annotated[str | None, Query(max_length=20)] = None,
    order: Annotated[Literal["newest", "oldest"], Query()] = "newest",
) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/invoices")
    chosen = next((s for s in get_args(InvoiceStatus) if s == status), None)
    listed = await data(invoices.list_(account_id, ctx.who, ctx.svc, chosen, order, 200, None))
    return await account_page(
        ctx,
        account_id,
        "invoices.html",
        "/invoices",
        invoices=listed["data"],
        statuses=get_args(InvoiceStatus),
        chosen=chosen,
        order=order,
    )


async def _invoice(ctx: Ctx, account_id: str, invoice_id: str, **extra: Any) -> Response:
    inv = await data(invoices.read(account_id, invoice_id, ctx.who, ctx.svc))
    return await account_page(
        ctx,
        account_id,
        "invoice.html",
        "/invoices",
        invoice=inv,
        may_write=await may(ctx, account_id, "billing.write"),
        payment_id=f"portal_{secrets.token_hex(8)}",
        **extra,
    )


@router.get("/portal/a/{account_id}/invoices/{invoice_id}.pdf")
@html
async def invoice_pdf(request: Request, account_id: Account, invoice_id: InvoiceId) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/invoices/{invoice_id}.pdf")
    out = await file(invoices.pdf(account_id, invoice_id, ctx.who, ctx.svc))
    out.headers["Content-Disposition"] = out.headers["Content-Disposition"].replace(
        "inline", "attachment"
    )
    return out


@router.get("/portal/a/{account_id}/invoices/{invoice_id}")
@html
async def invoice(request: Request, account_id: Account, invoice_id: InvoiceId) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/invoices/{invoice_id}")
    return await _invoice(ctx, account_id, invoice_id)


@router.post("/portal/a/{account_id}/invoices/{invoice_id}/pay")
@html
async def pay_invoice(request: Request, account_id: Account, invoice_id: InvoiceId) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body: dict[str, object] = {"payment_id": field(posted, "payment_id")}
    if field(posted, "amount"):
        body["amount"] = field(posted, "amount")
    return await act(
        data(invoices.pay(with_body(body), account_id, invoice_id, ctx.who, ctx.svc)),
        partial(_invoice, ctx, account_id, invoice_id),
        f"/portal/a/{account_id}/invoices/{invoice_id}",
        "invoice_paid",
    )


# --- Plan --------------------------------------------------------------------------------------


async def _plan(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    sub = await optional(subscriptions.read(account_id, ctx.who, ctx.svc))
    on_sale = await data(subscriptions.plans(ctx.who, ctx.svc))
    balance = await data(accounts.balance(account_id, ctx.who, ctx.svc))
    return await account_page(
        ctx,
        account_id,
        "plan.html",
        "/plan",
        sub=sub,
        bundles=on_sale["bundles"],
        balance=balance,
        may_write=await may(ctx, account_id, "billing.write"),
        purchase_id=f"portal_{secrets.token_hex(8)}",
        percent=_percent(sub),
        **extra,
    )


def _percent(sub: Any) -> float:
    if not sub:
        return 0.0
    return min(100.0, max(0.0, float(sub["minutes"]["percent_used"])))


@router.get("/portal/a/{account_id}/plan")
@html
async def plan(request: Request, account_id: Account) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/plan")
    return await _plan(ctx, account_id)


@router.post("/portal/a/{account_id}/plan/bundles")
@html
async def buy_bundle(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body = {"bundle_id": field(posted, "bundle_id"), "purchase_id": field(posted, "purchase_id")}
    return await act(
        data(bundles.buy(with_body(body), account_id, ctx.who, ctx.svc)),
        partial(_plan, ctx, account_id),
        f"/portal/a/{account_id}/plan",
        "bundle",
    )


# --- Numbers -----------------------------------------------------------------------------------


async def _numbers(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    listed = await data(numbers.list_(account_id, ctx.who, ctx.svc, None, None, 200, None))
    return await account_page(
        ctx,
        account_id,
        "numbers.html",
        "/numbers",
        numbers=listed["data"],
        may_write=await may(ctx, account_id, "billing.write"),
        **extra,
    )


@router.get("/portal/a/{account_id}/numbers")
@html
async def number_list(request: Request, account_id: Account) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/numbers")
    return await _numbers(ctx, account_id)


@router.post("/portal/a/{account_id}/numbers/{number}/auto_pay")
@html
async def number_auto_pay(request: Request, account_id: Account, number: Number) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body = {"auto_pay": field(posted, "auto_pay") == "on"}
    return await act(
        data(numbers.update(with_body(body), account_id, number, ctx.who, ctx.svc)),
        partial(_numbers, ctx, account_id),
        f"/portal/a/{account_id}/numbers",
        "auto_pay",
    )


@router.post("/portal/a/{account_id}/numbers/{number}/release")
@html
async def number_release(request: Request, account_id: Account, number: Number) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    if field(posted, "confirm") != number:
        exc = ApiError(422, "not_confirmed", f"type {number} to confirm its release", "confirm")
        return await _numbers(ctx, account_id, error=exc, status=422)
    return await act(
        data(numbers.release(account_id, number, ctx.who, ctx.svc)),
        partial(_numbers, ctx, account_id),
        f"/portal/a/{account_id}/numbers",
        "released",
    )


# --- Ledger records ----------------------------------------------------------------------------


def _this_month(ctx: Ctx) -> str:
    return utc_datetime(ctx.svc.clock).strftime("%Y-%m")


@router.get("/portal/a/{account_id}/ledger")
@html
async def ledger(request: Request, account_id: Account, month: Month = None) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/ledger")
    chosen = month or _this_month(ctx)
    report = await data(groups.ledger_records(account_id, ctx.who, ctx.svc, chosen, "json"))
    named = await _group_names(ctx, account_id)
    currency = await ctx.host.known(account_id)
    return await account_page(
        ctx,
        account_id,
        "ledger.html",
        "/ledger",
        month=chosen,
        report=report,
        names=named,
        currency=currency,
    )


async def _group_names(ctx: Ctx, account_id: str) -> dict[str, str]:
    try:
        listed = await data(groups.list_(account_id, ctx.who, ctx.svc))
    except ApiError as exc:
        if exc.status == 403:
            return {}
        raise
    return {g["id"]: g["name"] for g in listed["data"]}


@router.get("/portal/a/{account_id}/ledger.csv")
@html
async def ledger_csv(request: Request, account_id: Account, month: Month = None) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/ledger")
    chosen = month or _this_month(ctx)
    return await file(groups.ledger_records(account_id, ctx.who, ctx.svc, chosen, "csv"))


# --- Billing groups ----------------------------------------------------------------------------


async def _groups(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    listed = await data(groups.list_(account_id, ctx.who, ctx.svc))
    profiles = await data(groups.list_profiles(account_id, ctx.who, ctx.svc))
    may_write = await may(ctx, account_id, "billing_units.write")
    return await account_page(
        ctx,
        account_id,
        "groups.html",
        "/groups",
        groups=listed["data"],
        profiles=profiles["data"],
        group_names={g["id"]: g["name"] for g in listed["data"]},
        may_write=may_write,
        # An account's profiles are its admins' (and its manager's), not one unit's: a user
        # with Edit Billing unit is refused by the route (403), so is shown no form.
        may_profiles=may_write and ctx.session.key.role == "admin",
        **extra,
    )


@router.get("/portal/a/{account_id}/groups")
@html
async def group_list(request: Request, account_id: Account) -> Response:
    ctx = await _enter(request, account_id, "/portal/a/{account_id}/groups")
    return await _groups(ctx, account_id)


@router.post("/portal/a/{account_id}/groups")
@html
async def group_create(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    async def work() -> None:
        await data(
            groups.create(with_body({"name": field(posted, "name")}), account_id, ctx.who, ctx.svc)
        )
    return await act(
        work(),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/groups",
        "group_created",
    )


def _listed(text: str) -> list[str]:
    """A form's list: one item per line or comma, blanks dropped."""
    return [t.strip() for t in text.replace(",", "\n").splitlines() if t.strip()]


@router.post("/portal/a/{account_id}/groups/{group_id}/members")
@html
async def group_members(request: Request, account_id: Account, group_id: GroupId) -> Response:
    """The group's numbers and users, each list replaced whole (the API's PUT routes: a number
    moves here from any other group; charges already rated keep their group)."""
    ctx = await context(request)
    posted = await form(ctx)
    async def work() -> None:
        await data(
            groups.put_numbers(
                with_body({"numbers": _listed(field(posted, "numbers"))}),
                account_id,
                group_id,
                ctx.who,
                ctx.svc,
            )
        )
        await data(
            groups.put_users(
                with_body({"user_ids": _listed(field(posted, "user_ids"))}),
                account_id,
                group_id,
                ctx.who,
                ctx.svc,
            )
        )
    return await act(
        work(),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/groups",
        "group_members",
    )


@router.post("/portal/a/{account_id}/groups/{group_id}/delete")
@html
async def group_delete(request: Request, account_id: Account, group_id: GroupId) -> Response:
    ctx = await context(request)
    await form(ctx)
    return await act(
        groups.delete(account_id, group_id, ctx.who, ctx.svc, "none"),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/groups",
        "group_deleted",
    )


# --- outbound profiles (on the Billing groups page) ---------------------------------------------


async def _profile_name(ctx: Ctx, account_id: str, profile_id: str) -> str | None:
    listed = await data(groups.list_profiles(account_id, ctx.who, ctx.svc))
    return next((p["name"] for p in listed["data"] if p["id"] == profile_id), None)


async def _put_profile(
    ctx: Ctx, account_id: str, profile_id: str, name: str, group_id: str
) -> Response:
    body = {"name": name, "billing_group_id": group_id or None}
    return await act(
        data(groups.put_profile(with_body(body), account_id, profile_id, ctx.who, ctx.svc)),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/groups",
        "profile_saved",
    )


@router.post("/portal/a/{account_id}/profiles")
@html
async def profile_create(request: Request, account_id: Account) -> Response:
    """A new outbound profile (or one replaced whole: the API's PUT), with its group."""
    ctx = await context(request)
    posted = await form(ctx)
    profile_id = field(posted, "profile_id")
    if not _PROFILE.fullmatch(profile_id):
        exc = ApiError(
            422,
            "validation_error",
            "a profile id is 1 to 64 letters, digits or _ . : -",
            "profile_id",
        )
        return await _groups(ctx, account_id, error=exc, status=422)
    return await _put_profile(
        ctx, account_id, profile_id, field(posted, "name"), field(posted, "billing_group_id")
    )


@router.post("/portal/a/{account_id}/profiles/{profile_id}")
@html
async def profile_assign(request: Request, account_id: Account, profile_id: ProfileId) -> Response:
    """The profile's billing group (none: unassigned); its name is kept."""
    ctx = await context(request)
    posted = await form(ctx)
    name = await _profile_name(ctx, account_id, profile_id)
    if name is None:
        exc = ApiError(
            404, "outbound_profile_not_found", f"no profile {profile_id!r}", "profile_id"
        )
        return await _groups(ctx, account_id, error=exc, status=404)
    return await _put_profile(ctx, account_id, profile_id, name, field(posted, "billing_group_id"))


@router.post("/portal/a/{account_id}/profiles/{profile_id}/delete")
@html
async def profile_delete(request: Request, account_id: Account, profile_id: ProfileId) -> Response:
    ctx = await context(request)
    await form(ctx)
    return await act(
        groups.delete_profile(account_id, profile_id, ctx.who, ctx.svc),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/groups",
        "profile_deleted",
    )
