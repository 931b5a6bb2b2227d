"""Managed accounts (seed 003): a manager's admin creates them, lists them, reads their balance
and acts for them; an operator creates and configures any account; a managed account never
sees a price, in any answer it can get."""

from __future__ import annotations

import json
from typing import Any

import httpx

from balance.accounts import AccountSpec, BundleSpec, create_accounts, put_bundle
from meter.apiserver import create_app
from tests.api import Api, assert_error, call
from tests.enforcement.test_permissions import user_key
from tests.helpers import run_meter

#: Field names that carry a price or say which price list applies.
PRICE_FIELDS = {
    "rate",
    "rate_per_min",
    "inbound_per_min",
    "connect_fee",
    "price",
    "price_list_id",
    "unit_cost",
    "sms_per_part",
    "number_monthly_fee",
}


def price_fields(value: Any, where: str = "") -> list[str]:
    """Every place in a JSON value where a price field appears."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k in PRICE_FIELDS:
                found.append(f"{where}.{k}")
            found += price_fields(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += price_fields(v, f"{where}[{i}]")
    return found


async def manager_world(api: Api) -> dict[str, dict[str, str]]:
    await api.seed("mgr", "other")
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    _, op = await api.svc.keys.create(None, "operator")
    return {
        "operator": {"Authorization": f"Bearer {op}"},
        "manager": await user_key(api, "mgr", "admin"),
        "stranger": await user_key(api, "other", "admin"),
    }


async def test_a_manager_creates_lists_and_acts_for_its_managed_accounts(api: Api) -> None:
    keys = await manager_world(api)
    r = await api.client.post("/v1/accounts", json={"name": "Branch"}, headers=keys["manager"])
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["id"].startswith("acc_") and sub["manager_id"] == "mgr"
    assert sub["name"] == "Branch" and sub["credit_limit"] == "0.00"
    # its own balance, zero: money comes through its own payments
    r = await api.client.get(f"/v1/accounts/{sub['id']}/balance", headers=keys["manager"])
    assert r.status_code == 200 and r.json()["balance"] == "0.00", r.text
    # the manager authorizes for it: rated with the manager's prices, denied for no credit
    r = await api.client.post(
        "/v1/authorizations", json=call(sub["id"], "c-sub"), headers=keys["manager"]
    )
    assert r.status_code == 200 and r.json()["reason"] == "insufficient_credit", r.text
    # listed to its manager, and to nobody else but operators
    await api.client.post("/v1/accounts", json={"name": "Second"}, headers=keys["manager"])
    r = await api.client.get("/v1/accounts?limit=1", headers=keys["manager"])
    page = r.json()
    assert len(page["data"]) == 1 and page["next_cursor"], r.text
    r = await api.client.get(
        f"/v1/accounts?limit=5&cursor={page['next_cursor']}", headers=keys["manager"]
    )
    names = {a["name"] for a in page["data"] + r.json()["data"]}
    assert names == {"Branch", "Second"} and r.json()["next_cursor"] is None
    r = await api.client.get("/v1/accounts", headers=keys["stranger"])
    assert_error(r, 403, "forbidden")
    r = await api.client.get("/v1/accounts?limit=200", headers=keys["operator"])
    assert {a["id"] for a in r.json()["data"]} >= {"mgr", "other", sub["id"]}
    # a stranger may not see it; its manager may not suspend... (see the permission table)
    r = await api.client.get(f"/v1/accounts/{sub['id']}", headers=keys["stranger"])
    assert_error(r, 403, "forbidden")


async def test_what_a_manager_may_not_set_and_what_an_operator_must(api: Api) -> None:
    keys = await manager_world(api)
    for body, field in (
        ({"id": "mine"}, "id"),
        ({"price_list_id": "standard"}, "price_list_id"),
        ({"manager_id": "other"}, "manager_id"),
        ({"credit_limit": "50.00"}, "credit_limit"),
    ):
        r = await api.client.post("/v1/accounts", json=body, headers=keys["manager"])
        assert_error(r, 422, "operator_only", field)
    r = await api.client.post("/v1/accounts", json={"name": 7}, headers=keys["manager"])
    assert r.status_code == 422
    r = await api.client.post("/v1/accounts", json={"nope": 1}, headers=keys["manager"])
    assert r.status_code == 422
    op = keys["operator"]
    r = await api.client.post("/v1/accounts", json={"id": "top"}, headers=op)
    assert_error(r, 422, "price_list_required", "price_list_id")
    r = await api.client.post(
        "/v1/accounts", json={"id": "top", "price_list_id": "nope"}, headers=op
    )
    assert_error(r, 422, "unknown_price_list", "price_list_id")
    r = await api.client.post(
        "/v1/accounts", json={"id": "top", "price_list_id": "standard"}, headers=op
    )
    assert r.status_code == 201 and r.json()["price_list_id"] == "standard", r.text
    r = await api.client.post(
        "/v1/accounts", json={"id": "top", "price_list_id": "standard"}, headers=op
    )
    assert_error(r, 409, "account_exists", "id")
    # only a manager manages: "other" is not one, and a managed account never becomes one
    r = await api.client.post("/v1/accounts", json={"manager_id": "other"}, headers=op)
    assert_error(r, 422, "not_a_manager", "manager_id")
    r = await api.client.post("/v1/accounts", json={"id": "m1", "manager_id": "mgr"}, headers=op)
    assert r.status_code == 201
    r = await api.client.patch("/v1/accounts/m1", json={"is_manager": True}, headers=op)
    assert_error(r, 409, "managed_account", "is_manager")
    r = await api.client.patch("/v1/accounts/mgr", json={"is_manager": False}, headers=op)
    assert_error(r, 409, "has_managed_accounts", "is_manager")
    r = await api.client.patch("/v1/accounts/nope", json={"name": "x"}, headers=op)
    assert_error(r, 404, "account_not_found", "account_id")


async def test_an_operators_credit_limit_moves_the_account_where_its_credit_says(
    api: Api,
) -> None:
    keys = await manager_world(api)
    await api.seed("dry", balance="0.00")
    r = await api.client.get("/v1/accounts/dry/balance", headers=keys["operator"])
    assert r.json()["status"] == "hold"
    before = await api.svc.balances.pending_outboxes()
    r = await api.client.patch(
        "/v1/accounts/dry",
        json={"credit_limit": "20.00", "verification_level": 2},
        headers=keys["operator"],
    )
    assert r.status_code == 200, r.text
    assert (r.json()["credit_limit"], r.json()["verification_level"]) == ("20.00", 2)
    r = await api.client.get("/v1/accounts/dry/balance", headers=keys["operator"])
    assert (r.json()["status"], r.json()["available_credit"]) == ("active", "20.00")
    after = await api.svc.balances.pending_outboxes()
    new = [s for s in after.get("dry", []) if s not in before.get("dry", [])]
    assert [s.type for s in new] == ["account.resume"]
    # and down again: held, once
    r = await api.client.patch(
        "/v1/accounts/dry", json={"credit_limit": "0.00"}, headers=keys["operator"]
    )
    r = await api.client.get("/v1/accounts/dry/balance", headers=keys["operator"])
    assert r.json()["status"] == "hold"
    # the ledger is the book of record for the limit too: a rebuild keeps it
    row = await api.svc.pool.fetchrow("SELECT credit_limit FROM accounts WHERE id = 'dry'")
    assert row["credit_limit"] == 0


async def test_a_managed_account_never_sees_a_price(api: Api) -> None:
    keys = await manager_world(api)
    await put_bundle(
        api.svc.pool,
        BundleSpec.model_validate({"id": "b100", "minutes": 100, "price": "5.00"}),
    )
    await create_accounts(
        api.svc.pool,
        api.svc.balances,
        [AccountSpec.model_validate({"id": "sub", "manager_id": "mgr", "balance": "10.00"})],
    )
    sub = await user_key(api, "sub", "admin")
    # what the manager sees of the same purchase has the price: the check below can fail
    r = await api.client.post(
        "/v1/accounts/sub/bundles",
        json={"bundle_id": "b100", "purchase_id": "p-mgr"},
        headers=keys["manager"],
    )
    assert r.status_code == 200 and r.json()["price"] == "5.00", r.text

    answers: list[tuple[str, httpx.Response]] = []

    async def get(method: str, url: str, body: Any = None) -> None:
        answers.append(
            (f"{method} {url}", await api.client.request(method, url, json=body, headers=sub))
        )

    app = create_app(api.settings, api.svc)
    for path, ops in app.openapi()["paths"].items():
        for method in ops:
            if method.upper() == "GET":
                await get("GET", path.replace("{account_id}", "sub"))
                await get("GET", path.replace("{account_id}", "mgr"))  # its manager: 403
    await get("POST", "/v1/accounts/sub/bundles", {"bundle_id": "b100", "purchase_id": "p1"})
    await get("POST", "/v1/accounts/sub/bundles", {"bundle_id": "b100", "purchase_id": "p1"})
    await get("POST", "/v1/accounts/sub/bundles", {"bundle_id": "b100", "purchase_id": "p2"})
    await get(
        "POST", "/v1/accounts/sub/bundles", {"bundle_id": "b100", "purchase_id": "p3"}
    )  # no credit
    await get("POST", "/v1/accounts/sub/bundles", {"bundle_id": "nope", "purchase_id": "p4"})
    await get("POST", "/v1/authorizations", call("sub", "c1"))
    await get("POST", "/v1/authorizations", call("sub", "c2", to="+99912345678"))  # no rate
    await get("POST", "/v1/accounts/sub/payments", {"amount": "1.00", "payment_id": "x"})
    await get("PUT", "/v1/accounts/sub/auto_recharge", {"enabled": True})
    bought = [r for what, r in answers if what.endswith("/bundles")]
    assert [r.status_code for r in bought] == [200, 200, 409, 409, 404], [r.text for r in bought]
    refused = bought[2].json()["error"]
    assert refused["code"] == "insufficient_credit" and "5.00" not in refused["message"]
    leaks = []
    for what, r in answers:
        assert r.headers["content-type"].startswith("application/json"), (what, r.text)
        leaks += [f"{what}: {f}" for f in price_fields(r.json())]
    assert not leaks, leaks
    # the OpenAPI document's examples carry no price either
    examples: list[Any] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("example", "examples"):
                    examples.append(v)
                else:
                    collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(app.openapi())
    assert not price_fields(examples)


async def test_meter_accounts_create_list_verify(api: Api) -> None:
    await manager_world(api)

    async def meter(*args: str) -> tuple[int, str, str]:
        return await meter_cmd("accounts", *args)

    async def meter_cmd(*args: str) -> tuple[int, str, str]:
        return await run_meter(api.settings.redis_url, api.settings.database_url, *args)

    assert await meter("create", "--account", "cli1", "--price-list", "standard") == (
        0,
        "cli1\n",
        "",
    )
    code, out, err = await meter("create", "--manager", "mgr", "--name", "Shop")
    assert code == 0 and out.startswith("acc_"), err
    code, _, err = await meter("create", "--account", "cli1", "--price-list", "standard")
    assert code == 1 and "exists" in err
    assert (await meter("create", "--account", "cli2"))[0] == 2
    code, _, err = await meter("verify", "--account", "cli1")
    assert code == 0 and "verification level 2" in err
    level = await api.svc.pool.fetchval("SELECT verification_level FROM accounts WHERE id = 'cli1'")
    assert level == 2
    assert (await meter("verify", "--account", "nope"))[0] == 1
    code, out, err = await meter("suspend", "--account", "cli1", "--reason", "fraud_review")
    assert code == 0, err
    assert json.loads(out) | {"changed": True} == {
        "account_id": "cli1",
        "status": "suspended",
        "changed": True,
        "suspended_by": ["operator"],
        "hold_reason": None,
    }
    code, out, err = await meter("resume", "--account", "cli1")
    assert code == 0 and json.loads(out)["status"] == "hold", err  # no credit: held
    assert (await meter("resume", "--account", "nope"))[0] == 1
    code, out, err = await meter_cmd("ledger", "report", "--account", "cli1", "--month", "2026-13")
    assert code == 2, err
    code, out, err = await meter_cmd("ledger", "report", "--account", "mgr", "--month", "1999-01")
    assert code == 0 and json.loads(out.splitlines()[-1]) == {"total": "0.00", "month": "1999-01"}
    code, out, _ = await meter("list", "--manager", "mgr")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [a["name"] for a in listed] == ["Shop"]
