"""The plans and subscription routes through the served API on the real Redis and PostgreSQL:
what is on sale, subscribing, the summary, an upgrade refused for credit, the refusals, and what
a managed account is never shown (a price, at any depth)."""

from __future__ import annotations

from typing import Any

from balance.accounts import (
    AccountSpec,
    BundleSpec,
    PlanSpec,
    create_accounts,
    put_bundle,
    put_plan,
)
from tests.api import Api, assert_error

PRICE_FIELDS = {"monthly_fee", "did_rate", "extension_rate", "price", "rate"}


def keys_of(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in keys_of(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in keys_of(v)}
    return set()


async def seed(api: Api) -> dict[str, str]:
    await put_plan(
        api.svc.pool,
        PlanSpec(
            id="basic",
            name="Basic",
            monthly_fee="10.00",
            included_minutes=100,
            included_dids=1,
            did_rate="1.50",
            max_concurrent_calls=3,
        ),
    )
    await put_plan(api.svc.pool, PlanSpec(id="pro", name="Professional", monthly_fee="90.00"))
    await put_plan(api.svc.pool, PlanSpec(id="old", monthly_fee="5.00", on_sale=False))
    await put_plan(
        api.svc.pool,
        PlanSpec(id="payg", name="Pay As You Go", billing_model="payg", extension_rate="2.00"),
    )
    await put_bundle(api.svc.pool, BundleSpec(id="b100", minutes=100, price="4.00"))
    await api.seed("acc", balance="20.00")
    return await api.key("acc", "admin")


async def test_plans_on_sale_with_their_prices(api: Api) -> None:
    admin = await seed(api)
    r = await api.client.get("/v1/plans", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["id"] for p in body["data"]] == ["payg", "basic", "pro"]  # cheapest first, on sale
    basic = body["data"][1]
    assert (basic["monthly_fee"], basic["included_minutes"], basic["did_rate"]) == (
        "10.00",
        100,
        "1.50",
    )
    assert basic["max_concurrent_calls"] == 3
    assert body["data"][0]["monthly_fee"] is None  # PAYG: no fee
    assert body["bundles"] == [
        {"id": "b100", "description": "", "minutes": 100, "price": "4.00", "validity_days": 30}
    ]


async def test_subscribe_read_and_the_refusals(api: Api) -> None:
    admin = await seed(api)
    url = "/v1/accounts/acc/subscription"
    assert_error(await api.client.get(url, headers=admin), 404, "no_subscription", "account_id")
    r = await api.client.patch(url, json={"plan_id": "basic", "extensions": 2}, headers=admin)
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["plan"]["id"], s["status"], s["billing_model"]) == ("basic", "active", "flat_rate")
    assert (s["monthly_fee"], s["period_fee"]) == ("10.00", "10.00")
    assert s["minutes"] == {
        "used": 0,
        "used_s": 0,
        "included": 100,
        "included_s": 6_000,
        "reserved_s": 0,
        "remaining_s": 6_000,
        "percent_used": "0.00",
    }
    assert s["extensions"] == {"used": 2, "included": 0}
    assert s["next_invoice_date"] == s["period_end"]
    assert s["period_end"].endswith("-01T00:00:00Z")
    assert (await api.client.get(url, headers=admin)).json() == s
    balance = (await api.client.get("/v1/accounts/acc/balance", headers=admin)).json()
    assert balance["balance"] == "10.00"  # the first period, in full

    # 80.00 of a 90.00 plan, prorated, is more than the 10.00 left: refused, nothing changed.
    r = await api.client.patch(url, json={"plan_id": "pro"}, headers=admin)
    if r.status_code != 409:  # on the very last seconds of a month the prorated fee fits
        assert r.status_code == 200
    else:
        assert_error(r, 409, "insufficient_credit")
        assert (await api.client.get(url, headers=admin)).json()["plan"]["id"] == "basic"
    for body, status, code, field in (
        ({"plan_id": "nope"}, 422, "unknown_plan", "plan_id"),
        ({"plan_id": "old"}, 422, "plan_not_on_sale", "plan_id"),
        ({"plan_id": "bad id!"}, 422, "validation_error", "plan_id"),
        ({"extensions": -1}, 422, "validation_error", "extensions"),
        ({"trial_until": "2030-01-01T00:00:00Z"}, 422, "validation_error", "trial_until"),
    ):
        assert_error(await api.client.patch(url, json=body, headers=admin), status, code, field)
    r = await api.client.patch(url, json={"plan_id": "payg"}, headers=admin)
    assert r.status_code == 200 and r.json()["next_plan_id"] == "payg"  # next period


async def test_a_managed_account_sees_quantities_and_totals_never_a_price(api: Api) -> None:
    await seed(api)
    await api.seed("mgr")
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    spec = AccountSpec.model_validate({"id": "sub", "manager_id": "mgr", "balance": "50.00"})
    await create_accounts(api.svc.pool, api.svc.balances, [spec])
    own = await api.key("sub", "admin")
    manager = await api.key("mgr", "admin")
    r = await api.client.patch(
        "/v1/accounts/sub/subscription", json={"plan_id": "basic"}, headers=manager
    )
    assert r.status_code == 200 and r.json()["monthly_fee"] == "10.00"  # the manager sees it
    for path in ("/v1/plans", "/v1/accounts/sub/subscription"):
        doc = (await api.client.get(path, headers=own)).json()
        assert not keys_of(doc) & PRICE_FIELDS, (path, doc)
    s = (await api.client.get("/v1/accounts/sub/subscription", headers=own)).json()
    assert s["minutes"]["included"] == 100 and s["period_fee"] == "10.00"  # amounts: shown
    assert set(s["overage"]["dids"]) == {"quantity", "amount"}
