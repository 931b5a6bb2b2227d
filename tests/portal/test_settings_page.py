"""The Settings page: a manager's admin changes a managed account's plan, invoice auto-pay and
auto-recharge from that account's pages, through the API's routes; the managed account's own
admin reaches the same page and sees no price; whoever may not write billing gets a 403."""

from __future__ import annotations

from balance.accounts import AccountSpec, PlanSpec, create_accounts, put_plan
from tests.api import Api
from tests.portal.conftest import csrf_of, person, sign_in
from tests.portal.test_signin import client_of


async def managed_world(api: Api) -> None:
    await api.seed("mgr")
    pool = api.svc.pool
    await pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    await create_accounts(
        pool, api.svc.balances, [AccountSpec(id="sub", manager_id="mgr", balance="80.00")]
    )
    await put_plan(
        pool,
        PlanSpec.model_validate(
            {"id": "team", "name": "Team", "monthly_fee": "19.99", "included_minutes": 500}
        ),
    )


async def test_a_manager_changes_a_managed_accounts_settings_from_its_page(api: Api) -> None:
    await managed_world(api)
    admin = await api.key("mgr", "admin")
    async with client_of(api) as client:
        await sign_in(client, await person(api, "mgr", "admin"))
        listing = await client.get("/portal/managed")
        assert 'href="/portal/a/sub/settings"' in listing.text
        page = await client.get("/portal/a/sub/settings")
        assert page.status_code == 200, page.text
        assert "You manage this account" in page.text
        assert "19.99 USD a month" in page.text  # the manager sees its prices
        # The auto-recharge form (shared with the Billing page) posts to this page's route.
        assert 'action="/portal/a/sub/settings/auto_recharge"' in page.text
        token = csrf_of(page.text)
        r = await client.post(
            "/portal/a/sub/settings/plan",
            data={"csrf": token, "plan_id": "team", "extensions": "2"},
        )
        assert r.status_code == 303, r.text
        r = await client.post(
            "/portal/a/sub/settings/invoices", data={"csrf": token, "auto_pay": "on"}
        )
        assert r.status_code == 303, r.text
        r = await client.post(
            "/portal/a/sub/settings/auto_recharge",
            data={
                "csrf": token,
                "enabled": "on",
                "threshold_amount": "15.00",
                "recharge_amount": "30.00",
            },
        )
        assert r.status_code == 303, r.text
        low = await client.post(
            "/portal/a/sub/settings/auto_recharge",
            data={"csrf": token, "threshold_amount": "15.00", "recharge_amount": "5.00"},
        )
        assert low.status_code == 422 and "Not done" in low.text
        for hostile in ("²", "-1", "1e3", "9" * 40, "2\x00"):
            bad = await client.post(
                "/portal/a/sub/settings/plan", data={"csrf": token, "extensions": hostile}
            )
            assert bad.status_code == 422 and "Not done" in bad.text, (hostile, bad.status_code)
        nocsrf = await client.post("/portal/a/sub/settings/invoices", data={"auto_pay": ""})
        assert nocsrf.status_code == 403
    sub = (await api.client.get("/v1/accounts/sub/subscription", headers=admin)).json()
    assert (sub["plan"]["id"], sub["extensions"]["used"]) == ("team", 2)
    inv = (await api.client.get("/v1/accounts/sub/invoice_settings", headers=admin)).json()
    assert inv["auto_pay"] is True
    ar = (await api.client.get("/v1/accounts/sub/auto_recharge", headers=admin)).json()
    assert (ar["enabled"], ar["threshold_amount"], ar["recharge_amount"]) == (
        True,
        "15.00",
        "30.00",
    )


async def test_a_managed_accounts_own_settings_page_shows_no_price(api: Api) -> None:
    await managed_world(api)
    async with client_of(api) as client:
        await sign_in(client, await person(api, "sub", "admin"))
        page = await client.get("/portal/a/sub/settings")
        assert page.status_code == 200 and "Team" in page.text
        text = page.text.lower()
        assert "19.99" not in text and "price" not in text and " rate" not in text
        assert "You manage this account" not in page.text


async def test_who_may_not_write_billing_gets_no_settings_page(api: Api) -> None:
    await managed_world(api)
    await api.seed("ten")
    async with client_of(api) as client:
        await sign_in(client, await person(api, "ten", "user", ("view_billing_unit",)))
        home = await client.get("/portal/a/ten")
        assert "/settings" not in home.text
        assert (await client.get("/portal/a/ten/settings")).status_code == 403
        r = await client.post(
            "/portal/a/ten/settings/invoices", data={"csrf": csrf_of(home.text), "auto_pay": "on"}
        )
        assert r.status_code == 403
    async with client_of(api) as client:
        await sign_in(client, await person(api, None, "operator"))
        assert (await client.get("/portal/a/sub/settings")).status_code == 403
