"""Every portal page x every kind of person, table-driven: a page answers 200 to whom the
API's own table lets in and 403 to the others, the same whether or not the account exists.

The pages name their permission (``portal.pages.PAGES``, ``portal.people.PAGES``,
``portal.console.PAGES``); who holds
each is not read from ``infra.http.access.RULES`` here but from the API permission test's own
copy of the table (tests/enforcement/test_permissions.py), so the portal, the API and the two
tests must all agree. A page without a row fails ``test_every_page_has_a_row``."""

from __future__ import annotations

import secrets
from typing import Any, Final

import httpx

from balance.accounts import AccountSpec, create_accounts
from meter.apiserver import asgi_app, create_app
from portal import console, pages, people, settings
from tests.api import Api
from tests.enforcement import test_permissions as api_table
from tests.portal.conftest import person, sign_in

T = api_table
#: What each permission opens, as the API's permission test has it (people only: a portal
#: session is a user, never a service or a bare account key).
HOLDERS: Final[dict[str, frozenset[str]]] = {
    "account.read": T.OWN | {T.MANAGER, T.OPERATOR},
    "billing.read": T.BILLING_READ,
    "billing.write": T.BILLING_WRITE,
    "billing_units.read": T.UNITS_READ,
    "account.settings": frozenset({T.OPERATOR}),
    "accounts.list": T.MANAGERS | {T.OPERATOR},
    "people.manage": T.PEOPLE_MANAGE,
}
PEOPLE: Final = (
    T.OPERATOR,
    T.ADMIN,
    T.USER,
    T.EDIT_BILLING,
    T.VIEW_UNIT,
    T.EDIT_UNIT,
    T.MANAGER,
    T.MANAGER_FOREIGN,
    T.MANAGED_ON_MANAGER,
)
INVOICE: Final = "inv_" + "0" * 16


async def world(api: Api) -> dict[str, tuple[str, str]]:
    """As the API's test: ``ten``, ``mgr`` managing ``sub``, ``other``; person -> (email, the
    account it opens)."""
    await api.seed("ten", "mgr", "other")
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    await create_accounts(api.svc.pool, api.svc.balances, [AccountSpec(id="sub", manager_id="mgr")])
    mgr = await person(api, "mgr", "admin")
    return {
        T.OPERATOR: (await person(api, None, "operator"), "ten"),
        T.ADMIN: (await person(api, "ten", "admin"), "ten"),
        T.USER: (await person(api, "ten", "user"), "ten"),
        T.EDIT_BILLING: (await person(api, "ten", "user", ("edit_billing",)), "ten"),
        T.VIEW_UNIT: (await person(api, "ten", "user", ("view_billing_unit",)), "ten"),
        T.EDIT_UNIT: (await person(api, "ten", "user", ("edit_billing_unit",)), "ten"),
        T.MANAGER: (mgr, "sub"),
        T.MANAGER_FOREIGN: (mgr, "other"),
        T.MANAGED_ON_MANAGER: (await person(api, "sub", "admin"), "mgr"),
    }


def url(page: str, target: str) -> str:
    return page.replace("{account_id}", target).replace("{invoice_id}", INVOICE)


def _get_paths(routes: list[Any]) -> set[str]:
    # Routers included in routers (FastAPI keeps them nested); the portal uses no prefixes.
    found: set[str] = set()
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            found |= _get_paths(inner.routes)
        elif "GET" in getattr(r, "methods", ()):
            found.add(r.path)
    return found


def portal_pages(api: Api) -> set[str]:
    """Every page a person opens: the GET routes of the served app under /portal/ but the
    sign-in page, the start page (a redirect), static files and the CSV (the ledger page's)."""
    paths = _get_paths(create_app(api.settings, api.svc).routes)
    skip = {"/portal/", "/portal/signin", "/portal/static/{name}"}
    return {
        p for p in paths if p.startswith("/portal/") and p not in skip and not p.endswith(".csv")
    }


async def test_every_page_has_a_row(api: Api) -> None:
    table = {**pages.PAGES, **settings.PAGES, **people.PAGES, **console.PAGES}
    assert portal_pages(api) == set(table)
    assert set(table.values()) <= set(HOLDERS)
    # none of them in the API's document (test_permissions walks that one)
    assert not [p for p in create_app(api.settings, api.svc).openapi()["paths"] if "portal" in p]


async def test_every_page_x_every_person(api: Api) -> None:
    who = await world(api)
    table = {**pages.PAGES, **settings.PAGES, **people.PAGES, **console.PAGES}
    wrong: list[str] = []
    app = asgi_app(api.settings, api.svc)
    for name in PEOPLE:
        email, target = who[name]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://meter"
        ) as c:
            assert (await sign_in(c, email)).status_code == 303
            for page, permission in table.items():
                allowed = name in HOLDERS[permission]
                r = await c.get(url(page, target))
                # An invoice nobody has is 404 to whoever may read invoices; 403 to the rest.
                ok = (
                    r.status_code in (200, 404) and "Not allowed" not in r.text
                    if allowed
                    else r.status_code == 403
                )
                if not ok:
                    want = "allowed" if allowed else "403"
                    wrong.append(f"{page} as {name}: {r.status_code} ({want})")
                if "{account_id}" in page and not allowed and name != T.OPERATOR:
                    # the same answer for an account that does not exist
                    nowhere = await c.get(url(page, "acc_" + secrets.token_hex(6)))
                    if nowhere.status_code != r.status_code:
                        wrong.append(f"{page} as {name}: {nowhere.status_code} for no account")
    assert not wrong, "\n".join(wrong)


async def test_a_tenant_user_has_no_billing_in_its_navigation(api: Api) -> None:
    who = await world(api)
    app = asgi_app(api.settings, api.svc)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://meter"
    ) as c:
        await sign_in(c, who[T.USER][0])
        home = await c.get("/portal/", follow_redirects=True)
        assert home.status_code == 200
        assert "/billing" not in home.text and "/invoices" not in home.text
        assert (await c.get("/portal/a/ten/billing")).status_code == 403
