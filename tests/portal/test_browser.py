"""The portal in a real browser: Debian's headless Chromium, driven by Playwright
(``executable_path``: Playwright's own browser downloads do not work here), against the API
served by uvicorn on a loopback port, on the real Redis and PostgreSQL.

A tenant admin signs in, sees the balance the API reports, pays with the sandbox card, sets
auto-recharge, downloads an invoice PDF and the month's ledger CSV whose figures are the
ledger's; a tenant user never sees Billing (and its URL answers 403); a managed account's
pages show no rate or price; an operator's suspension cannot be lifted from the tenant's
pages; a form posted without its CSRF token is refused. Each page is photographed into
``.artifacts/screenshots/`` (ignored by git; CI keeps it as an artefact).

``./run test`` installs ``chromium`` with apt-get when it is missing; without it these tests
skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pytest
from playwright.async_api import Browser, Page, async_playwright
from pypdf import PdfReader

from balance.accounts import AccountSpec, BundleSpec, create_accounts, put_bundle
from contracts.money import parse_money
from meter.apiserver import asgi_app, server_for
from tests.api import Api
from tests.enforcement.test_invoices_api import issued
from tests.portal.conftest import PASSWORD, person

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / ".artifacts" / "screenshots"

if not Path(CHROMIUM).exists() and os.environ.get("CI") == "true":
    pytest.fail("CI must run the browser tests; apt-get install chromium", pytrace=False)
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="!!! SKIPPED: Debian's chromium is not installed (./run test installs it)",
    ),
    pytest.mark.timeout(240),
]


@pytest.fixture
async def served(api: Api) -> AsyncIterator[str]:
    """The API with its portal on a loopback port: its base URL."""
    server = server_for(asgi_app(api.settings, api.svc), "127.0.0.1", 0)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.025)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        # --no-sandbox: Chromium refuses its sandbox as root, which tests here run as.
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


async def signed_in(browser: Browser, base: str, email: str) -> Page:
    context = await browser.new_context(base_url=base, accept_downloads=True)
    page = await context.new_page()
    await page.goto("/portal/")
    assert "/portal/signin" in page.url
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()
    assert "/portal/signin" not in page.url, await page.content()
    return page


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def figure(page: Page, name: str) -> str:
    return (await page.locator(f'[data-figure="{name}"]').first.inner_text()).strip()


async def test_a_tenant_admin_pays_sets_auto_recharge_and_downloads_its_records(
    api: Api, served: str, browser: Browser
) -> None:
    admin_key, invoice_id = await issued(api)  # account "acc", its November invoice issued
    email = await person(api, "acc", "admin")
    page = await signed_in(browser, served, email)
    await shot(page, "overview")

    # The balance the API reports, with its currency.
    await page.get_by_role("link", name="Billing", exact=True).click()
    reported = (await api.client.get("/v1/accounts/acc/balance", headers=admin_key)).json()
    assert await figure(page, "balance") == f"{reported['balance']} USD"
    assert await figure(page, "available") == f"{reported['available_credit']} USD"
    assert "the minimum payment is 10.00 usd" in (await page.inner_text("main")).lower()
    await shot(page, "billing")

    # Below the minimum: refused, and the page says why.
    await page.get_by_label("Amount (USD)").fill("5.00")
    await page.get_by_role("button", name="Pay", exact=True).click()
    assert "10.00" in await page.locator(".error").inner_text()

    # Make Payment with the sandbox card: saved, charged, credited.
    await page.get_by_label("Amount (USD)").fill("25.00")
    await page.get_by_label("Card").select_option("pm_card_visa")
    await page.get_by_role("button", name="Pay", exact=True).click()
    await page.wait_for_load_state()
    assert "Payment received" in await page.locator(".notice").inner_text()
    after = parse_money(reported["balance"]) + 25_000_000
    assert parse_money((await figure(page, "balance")).removesuffix(" USD")) == after
    assert "Visa ending 4242" in await figure(page, "method")
    history = page.get_by_role("table", name="Payments, newest first")
    assert "25.00 USD" in await history.inner_text()

    # Auto-recharge, with the seed's warning beside it.
    assert "threshold + recharge amount" in await page.locator("#ar-warning").inner_text()
    await page.get_by_label("Auto-recharge on").check()
    await page.get_by_label("Threshold (USD)").fill("5.00")
    await page.get_by_label("Recharge amount (USD, at least 10.00)").fill("20.00")
    await page.get_by_role("button", name="Save auto-recharge").click()
    await page.wait_for_load_state()
    ar = (await api.client.get("/v1/accounts/acc/auto_recharge", headers=admin_key)).json()
    assert (ar["enabled"], ar["threshold_amount"], ar["recharge_amount"]) == (
        True,
        "5.00",
        "20.00",
    )
    await shot(page, "billing-after-payment")

    # Invoices: the list, the detail with its lines, the PDF.
    await page.get_by_role("link", name="Invoices", exact=True).click()
    await shot(page, "invoices")
    inv = (
        await api.client.get(f"/v1/accounts/acc/invoices/{invoice_id}", headers=admin_key)
    ).json()
    await page.get_by_role("link", name=f"View {inv['number']}", exact=True).click()
    assert await figure(page, "total") == f"{inv['amount_due']} USD"
    for line in inv["lines"]:
        assert line["description"] in await page.inner_text("main")
    await shot(page, "invoice")
    async with page.expect_download() as pdf_download:
        await page.get_by_role("link", name="Download PDF", exact=True).click()
    pdf_path = await (await pdf_download.value).path()
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf_path.read_bytes())).pages)
    assert inv["number"] in text and inv["amount_due"] in text

    # Ledger records of this month: the CSV's figures are the ledger's.
    month = datetime.now(UTC).strftime("%Y-%m")
    await page.get_by_role("link", name="Ledger records", exact=True).click()
    await page.get_by_label("Month (UTC)").fill(month)
    await page.get_by_role("button", name="Show", exact=True).click()
    await shot(page, "ledger")
    async with page.expect_download() as csv_download:
        await page.get_by_role("link", name=f"Download CSV for {month}", exact=True).click()
    csv_path = await (await csv_download.value).path()
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    total = next(r for r in rows if r["kind"] == "total")
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    in_ledger = await api.svc.pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM ledger"
        " WHERE account_id = 'acc' AND event_time >= $1 AND event_time < $2",
        start,
        end,
    )
    assert parse_money(total["amount"]) == in_ledger
    lines = [r for r in rows if r["kind"] != "total"]
    assert sum(parse_money(r["amount"]) for r in lines) == in_ledger
    assert any(r["kind"] == "payment" or parse_money(r["amount"]) >= 25_000_000 for r in lines)
    assert await figure(page, "total") == f"{total['amount']} USD"

    for name, link in (("plan", "Plan"), ("numbers", "Numbers"), ("groups", "Billing groups")):
        await page.get_by_role("link", name=link, exact=True).click()
        await shot(page, name)


async def test_a_tenant_user_never_sees_billing(api: Api, served: str, browser: Browser) -> None:
    await api.seed("ten")
    page = await signed_in(browser, served, await person(api, "ten", "user"))
    nav = await page.get_by_role("navigation", name="Sections").inner_text()
    assert "Overview" in nav and "Billing" not in nav and "Invoices" not in nav
    await shot(page, "user-overview")
    response = await page.goto("/portal/a/ten/billing")
    assert response is not None and response.status == 403
    await shot(page, "user-billing-403")


async def test_a_managed_accounts_pages_show_no_rate(
    api: Api, served: str, browser: Browser
) -> None:
    await api.seed("mgr")
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    await create_accounts(api.svc.pool, api.svc.balances, [AccountSpec(id="sub", manager_id="mgr")])
    await put_bundle(
        api.svc.pool, BundleSpec(id="nexus", description="Nexus", minutes=300, price="7.35")
    )
    # The manager sees the bundle's price ...
    manager = await signed_in(browser, served, await person(api, "mgr", "admin"))
    await manager.goto("/portal/a/mgr/plan")
    assert "7.35 USD" in await manager.inner_text("main")
    await manager.goto("/portal/managed")
    await shot(manager, "managed-accounts")
    # ... the managed account's own admin sees none, on any page.
    page = await signed_in(browser, served, await person(api, "sub", "admin"))
    links = await page.get_by_role("navigation", name="Sections").get_by_role("link").all()
    hrefs = [await a.get_attribute("href") for a in links]
    assert "/portal/a/sub/plan" in hrefs
    for href in hrefs:
        assert href
        await page.goto(href)
        text = (await page.inner_text("body")).lower()
        html = (await page.content()).lower()
        assert "7.35" not in html and "price" not in text, href
        assert " rate" not in text and "/min" not in text, href
    await page.goto("/portal/a/sub/plan")
    assert "Nexus" in await page.inner_text("main")
    await shot(page, "managed-plan")


async def test_an_operators_suspension_cannot_be_lifted_from_the_tenants_pages(
    api: Api, served: str, browser: Browser
) -> None:
    await api.seed("ten")
    operator = await signed_in(browser, served, await person(api, None, "operator"))
    assert operator.url.endswith("/portal/console")
    await operator.get_by_label("Account id").fill("ten")
    await operator.get_by_role("button", name="Find").click()
    await operator.get_by_role("button", name="Suspend", exact=True).click()
    await operator.wait_for_load_state()
    assert await figure(operator, "status") == "suspended"
    assert await operator.locator('[data-origin="operator"]').count() == 1
    await shot(operator, "console")

    tenant = await signed_in(browser, served, await person(api, "ten", "admin"))
    assert await figure(tenant, "status") == "suspended"
    await tenant.get_by_role("button", name="Resume account").click()
    await tenant.wait_for_load_state()
    assert "lift_not_permitted" in await tenant.locator(".error").inner_text()
    await shot(tenant, "tenant-cannot-resume")
    headers = await api.key("ten", "admin")
    st = (await api.client.get("/v1/accounts/ten/balance", headers=headers)).json()
    assert st["status"] == "suspended"


async def test_a_form_posted_without_its_csrf_token_is_refused(
    api: Api, served: str, browser: Browser
) -> None:
    await api.seed("ten")
    page = await signed_in(browser, served, await person(api, "ten", "admin"))
    await page.goto("/portal/a/ten/billing")
    await page.evaluate(
        "document.querySelectorAll('form input[name=csrf]').forEach((e) => e.remove())"
    )
    await page.get_by_role("button", name="Save auto-recharge").click()
    await page.wait_for_load_state()
    assert "csrf_failed" in await page.inner_text("main")
    headers = await api.key("ten", "admin")
    r = await api.client.get("/v1/accounts/ten/auto_recharge", headers=headers)
    assert r.status_code == 404  # never set


async def test_an_operator_refunds_a_payment_from_the_console(
    api: Api, served: str, browser: Browser
) -> None:
    await api.seed("ten", balance="0.00")
    headers = await api.key("ten", "admin")
    r = await api.client.put(
        "/v1/accounts/ten/payment_method", json={"token": "pm_card_visa"}, headers=headers
    )
    assert r.status_code == 201, r.text
    r = await api.client.post(
        "/v1/accounts/ten/payments", json={"amount": "20.00", "payment_id": "p1"}, headers=headers
    )
    assert r.status_code == 201, r.text
    operator = await signed_in(browser, served, await person(api, None, "operator"))
    await operator.get_by_label("Account id").fill("ten")
    await operator.get_by_role("button", name="Find").click()
    await operator.get_by_label("Payment id").fill("p1")
    await operator.get_by_label("Amount (USD; empty: all that is left)").fill("5.00")
    await operator.get_by_label("Reason").last.fill("goodwill")
    await operator.get_by_role("button", name="Refund", exact=True).click()
    await operator.wait_for_load_state()
    assert "Refund sent" in await operator.inner_text("main")
    await shot(operator, "console-refund")
    history = (await api.client.get("/v1/accounts/ten/payments", headers=headers)).json()
    [p1] = [p for p in history["payments"] if p["id"] == "p1"]
    assert (p1["refunded"], p1["refund_status"]) == ("5.00", "partially_refunded")
    balance = (await api.client.get("/v1/accounts/ten/balance", headers=headers)).json()
    assert balance["balance"] == "15.00"
    # More than is left is refused, with the API's code on the page.
    await operator.get_by_label("Payment id").fill("p1")
    await operator.get_by_label("Amount (USD; empty: all that is left)").fill("50.00")
    await operator.get_by_label("Reason").last.fill("too much")
    await operator.get_by_role("button", name="Refund", exact=True).click()
    await operator.wait_for_load_state()
    assert "refund_exceeds_capture" in await operator.locator(".error").inner_text()


# --- accessibility, checked in the browser ---------------------------------------------------


async def _filled_account(api: Api) -> tuple[str, str]:
    """Account "acc" with something on every page: an issued invoice, a card and a payment,
    a billing group, an outbound profile, a user in an access group, a key. Its admin's email
    and the invoice's id."""
    admin_key, invoice_id = await issued(api)
    r = await api.client.post(
        "/v1/accounts/acc/payments",
        json={"amount": "20.00", "payment_id": "a11y-1"},
        headers=admin_key,
    )
    if r.status_code == 409:  # no saved method yet
        await api.client.put(
            "/v1/accounts/acc/payment_method", json={"token": "pm_card_visa"}, headers=admin_key
        )
        r = await api.client.post(
            "/v1/accounts/acc/payments",
            json={"amount": "20.00", "payment_id": "a11y-1"},
            headers=admin_key,
        )
    assert r.status_code == 201, r.text
    g = await api.client.post(
        "/v1/accounts/acc/billing_groups", json={"name": "Sales"}, headers=admin_key
    )
    assert g.status_code == 201, g.text
    await api.client.put(
        "/v1/accounts/acc/outbound_profiles/trunk-1",
        json={"name": "Main trunk", "billing_group_id": g.json()["id"]},
        headers=admin_key,
    )
    email = await person(api, "acc", "admin")
    u = await api.client.post(
        "/v1/accounts/acc/users",
        json={"email": "ann@example.com", "role": "user"},
        headers=admin_key,
    )
    assert u.status_code == 201, u.text
    ag = await api.client.post(
        "/v1/accounts/acc/access_groups",
        json={"name": "Billing", "privileges": ["edit_billing"]},
        headers=admin_key,
    )
    await api.client.put(
        f"/v1/accounts/acc/access_groups/{ag.json()['id']}/members",
        json={"user_ids": [u.json()["id"]]},
        headers=admin_key,
    )
    k = await api.client.post(
        "/v1/accounts/acc/keys", json={"user_id": u.json()["id"]}, headers=admin_key
    )
    assert k.status_code == 201, k.text
    return email, invoice_id


#: Each control without a label (its own <label>, aria-label or aria-labelledby), and each
#: <time> without a datetime and a UTC title: described, for the failure message.
_UNLABELLED_JS: Final = """() => {
  const bad = [];
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (el.type === 'hidden') continue;
    const named = (el.labels && el.labels.length && el.labels[0].innerText.trim())
      || (el.getAttribute('aria-label') || '').trim()
      || (el.getAttribute('aria-labelledby') || '').trim();
    if (!named) bad.push('unlabelled ' + el.outerHTML.slice(0, 120));
  }
  for (const el of document.querySelectorAll('button')) {
    if (!el.innerText.trim() && !(el.getAttribute('aria-label') || '').trim())
      bad.push('button without a name ' + el.outerHTML.slice(0, 120));
  }
  for (const t of document.querySelectorAll('time')) {
    const at = t.getAttribute('datetime') || '';
    const title = t.getAttribute('title') || '';
    if (!at || !title.includes(at) || !title.includes('UTC'))
      bad.push('time without a UTC title ' + t.outerHTML.slice(0, 120));
  }
  return bad;
}"""


async def test_every_control_on_every_page_has_a_label_and_every_time_a_utc_title(
    api: Api, served: str, browser: Browser
) -> None:
    from portal import console as console_pages
    from portal import pages as account_pages
    from portal import people as people_pages
    from portal import settings as settings_pages

    email, invoice_id = await _filled_account(api)
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'acc'")
    await create_accounts(api.svc.pool, api.svc.balances, [AccountSpec(id="sub", manager_id="acc")])
    page = await signed_in(browser, served, email)
    account = {**account_pages.PAGES, **settings_pages.PAGES, **people_pages.PAGES}
    wrong: list[str] = []
    times = 0
    for path in account:
        url = path.replace("{account_id}", "acc").replace("{invoice_id}", invoice_id)
        if url.endswith(".pdf"):
            continue
        response = await page.goto(url)
        assert response is not None and response.status == 200, url
        wrong += [f"{url}: {b}" for b in await page.evaluate(_UNLABELLED_JS)]
        times += await page.locator("time").count()
        name = url.removeprefix("/portal/a/acc").strip("/").replace("/", "-") or "overview"
        await shot(page, f"a11y-{name}")
    await page.goto("/portal/managed")
    wrong += [f"/portal/managed: {b}" for b in await page.evaluate(_UNLABELLED_JS)]
    operator = await signed_in(browser, served, await person(api, None, "operator"))
    assert set(console_pages.PAGES) == {"/portal/console", "/portal/managed"}
    await operator.goto("/portal/console?q=acc")
    wrong += [f"/portal/console: {b}" for b in await operator.evaluate(_UNLABELLED_JS)]
    await operator.goto("/portal/signin")
    wrong += [f"/portal/signin: {b}" for b in await operator.evaluate(_UNLABELLED_JS)]
    assert not wrong, "\n".join(wrong)
    assert times >= 5  # the check saw times: payments, invoices, users, keys


_FOCUS_JS: Final = """(() => {
  const e = document.activeElement, s = getComputedStyle(e);
  return [e.id || e.tagName, s.outlineStyle !== 'none' && s.outlineWidth !== '0px',
          !!e.closest('main')];
})()"""
#: The outermost elements that stick out of the window on the right (a scrolling table's
#: insides do not count: they scroll in their own box).
_WIDE_JS: Final = """(() => {
  const w = document.documentElement.clientWidth, out = [];
  for (const e of document.querySelectorAll('body *')) {
    if (e.getBoundingClientRect().right <= w + 1) continue;
    let p = e.parentElement, inside = false;
    while (p) {
      if (p.getBoundingClientRect().right > w + 1
          || ['auto', 'scroll'].includes(getComputedStyle(p).overflowX)) { inside = true; break; }
      p = p.parentElement;
    }
    if (!inside) out.push(e.outerHTML.slice(0, 100));
  }
  return out;
})()"""


async def test_a_page_is_used_with_the_keyboard_alone(
    api: Api, served: str, browser: Browser
) -> None:
    """Tab from the top: the skip link first, then on to the new group's name; type it, Tab to
    its button, Enter: the group is made, and every stop on the way showed its focus."""
    await api.seed("ten")
    page = await signed_in(browser, served, await person(api, "ten", "admin"))
    await page.goto("/portal/a/ten/groups")
    await page.keyboard.press("Tab")
    first = await page.evaluate("document.activeElement.textContent.trim()")
    assert first == "Skip to content"
    await page.keyboard.press("Enter")  # to the content: the next Tab is in <main>
    stops: list[str] = []
    for _ in range(40):
        await page.keyboard.press("Tab")
        active = await page.evaluate(_FOCUS_JS)
        stops.append(active[0])
        assert active[1], f"no visible focus on {active[0]}"
        assert active[2], f"{active[0]} is outside <main>: the skip link did not skip the header"
        if active[0] == "name":
            break
    assert stops[-1] == "name", stops
    await page.keyboard.type("Keyboard only")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent.trim()") == "Create"
    await page.keyboard.press("Enter")
    await page.wait_for_load_state()
    assert "Billing group created" in await page.locator(".notice").inner_text()
    names = await api.svc.pool.fetch("SELECT name FROM billing_groups WHERE account_id = 'ten'")
    assert [r["name"] for r in names] == ["Keyboard only"]
    await shot(page, "keyboard-only")


async def test_pages_read_at_200_percent_zoom_without_scrolling_sideways(
    api: Api, served: str, browser: Browser
) -> None:
    """200 % zoom on a 960-pixel-wide window: 480 CSS pixels at two device pixels each. No page
    is wider than the window (a wide table scrolls inside itself, as WCAG 1.4.10 allows)."""
    email, invoice_id = await _filled_account(api)
    context = await browser.new_context(
        base_url=served, viewport={"width": 480, "height": 900}, device_scale_factor=2
    )
    page = await context.new_page()
    await page.goto("/portal/signin")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()
    wide: list[str] = []
    for suffix in (
        "",
        "/billing",
        "/invoices",
        f"/invoices/{invoice_id}",
        "/plan",
        "/ledger",
        "/groups",
        "/settings",
        "/users",
        "/access_groups",
        "/keys",
    ):
        await page.goto(f"/portal/a/acc{suffix}")
        scroll, client = await page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        if scroll > client:
            wide.append(f"{suffix or '/'}: {scroll} > {client}: {await page.evaluate(_WIDE_JS)}")
        if suffix in ("/billing", "/users"):
            await shot(page, f"zoom200{suffix.replace('/', '-')}")
    await context.close()
    assert not wide, "\n".join(wide)
