"""The saved card's expiry on the Billing page: shown with the card, and a warning when the
card has expired or expires this month, by the API's injected clock (never the machine's)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import httpx

from infra.clock import SettableClock
from meter.apiserver import asgi_app
from portal.pages import card_expiry
from tests.api import Api
from tests.portal.conftest import person, sign_in


async def billing_at(api: Api, email: str, at: datetime) -> str:
    svc = dataclasses.replace(api.svc, clock=SettableClock(at))
    app = asgi_app(api.settings, svc)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://meter"
    ) as c:
        assert (await sign_in(c, email)).status_code == 303
        page = await c.get("/portal/a/ten/billing")
        assert page.status_code == 200, page.text
        return page.text


async def test_the_billing_page_shows_the_expiry_and_warns_by_the_clock(api: Api) -> None:
    await api.seed("ten")
    admin = await api.key("ten", "admin")
    r = await api.client.put(
        "/v1/accounts/ten/payment_method", json={"token": "pm_card_visa"}, headers=admin
    )
    assert r.status_code == 201, r.text
    email = await person(api, "ten", "admin")

    before = await billing_at(api, email, datetime(2034, 11, 30, 23, 59, tzinfo=UTC))
    assert 'expires <span data-figure="expiry">12/2034</span>' in before
    assert "expiry-warning" not in before

    during = await billing_at(api, email, datetime(2034, 12, 1, 0, 0, tzinfo=UTC))
    assert "This card expires this month" in during

    last = await billing_at(api, email, datetime(2034, 12, 31, 23, 59, tzinfo=UTC))
    assert "This card expires this month" in last

    after = await billing_at(api, email, datetime(2035, 1, 1, 0, 0, tzinfo=UTC))
    assert "This card has expired" in after


async def test_a_card_saved_before_its_expiry_was_kept_shows_none_and_no_warning(
    api: Api,
) -> None:
    await api.seed("ten")
    admin = await api.key("ten", "admin")
    await api.client.put(
        "/v1/accounts/ten/payment_method", json={"token": "pm_card_visa"}, headers=admin
    )
    # as a row saved before migration 0019 reads
    await api.svc.pool.execute(
        "UPDATE payment_methods SET exp_month = 0, exp_year = 0 WHERE account_id = 'ten'"
    )
    got = (await api.client.get("/v1/accounts/ten/payment_method", headers=admin)).json()
    assert (got["exp_month"], got["exp_year"]) == (None, None)
    page = await billing_at(
        api, await person(api, "ten", "admin"), datetime(2099, 1, 1, tzinfo=UTC)
    )
    assert "Visa ending 4242</p>" in page and "expiry-warning" not in page


def test_where_a_card_stands_by_the_month() -> None:
    card = {"exp_month": 2, "exp_year": 2028}
    assert card_expiry(card, datetime(2028, 1, 31, tzinfo=UTC)) == "valid"
    assert card_expiry(card, datetime(2028, 2, 29, 23, 59, tzinfo=UTC)) == "this_month"
    assert card_expiry(card, datetime(2028, 3, 1, tzinfo=UTC)) == "expired"
    assert card_expiry(card, datetime(2029, 1, 1, tzinfo=UTC)) == "expired"
    assert card_expiry({"exp_month": None, "exp_year": None}, datetime.now(UTC)) is None
    assert card_expiry(None, datetime.now(UTC)) is None
