"""The numbers routes, through the served API on the real Redis and PostgreSQL: the inventory
listed (filtered, paged), one number read, auto-pay and billing group changed, a release that
publishes ``number.release`` once, what a managed account is not shown, and the refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

import orjson

from balance.accounts import AccountSpec, create_accounts, put_price_list
from balance.store import RedisBalances
from enforcement.billing_worker import valid_event
from enforcement.numbers import NumberLifecycle
from meter.traffic import demo_price_list, number_event
from rating.catalog import Catalog
from tests.api import Api, assert_error

NUMBERS = ("+14155550101", "+14155550102", "+14155550103")


async def activate(api: Api, account: str, *numbers: str) -> None:
    """The numbers activated now, as ``meter run billing`` records inventory's events."""
    catalog = Catalog(api.svc.pool)
    await catalog.refresh()
    lifecycle = NumberLifecycle(api.svc.pool, api.svc.balances, catalog.lookup)
    for number in numbers:
        at = datetime.now(UTC)
        raw = orjson.dumps(number_event("number.activated", account, number, at=at))
        ev = valid_event(
            account.encode(), raw, now=at.timestamp(), max_skew_s=300, max_bytes=65_536
        )
        assert not isinstance(ev, str)
        assert await lifecycle.on_event(ev) == "activated"


async def seed(api: Api) -> dict[str, str]:
    spec = demo_price_list("pl_n").model_copy(
        update={"number_monthly_fee": 2_500_000, "one_time_fees": {"number_setup": 1_000_000}}
    )
    await put_price_list(api.svc.pool, spec)
    await create_accounts(
        api.svc.pool,
        api.svc.balances,
        [AccountSpec.model_validate({"id": "acc", "price_list_id": "pl_n", "balance": "20.00"})],
    )
    await activate(api, "acc", *NUMBERS)
    return await api.key("acc", "admin")


async def test_the_inventory_lists_filters_and_pages(api: Api) -> None:
    admin = await seed(api)
    r = await api.client.get("/v1/accounts/acc/numbers", headers=admin)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert sorted(n["number"] for n in rows) == sorted(NUMBERS)
    first = rows[0]
    assert (first["status"], first["auto_pay"]) == ("active", True)
    assert (first["monthly_fee"], first["one_time_fees"]) == ("2.50", "1.00")
    assert first["paid_through"] == datetime.now(UTC).strftime("%Y-%m")
    assert first["next_renewal"].endswith("-01T00:00:00Z")

    seen: list[str] = []
    cursor = None
    while True:
        q = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = (await api.client.get(f"/v1/accounts/acc/numbers{q}", headers=admin)).json()
        seen += [n["number"] for n in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [n["number"] for n in rows]  # every number once, in the list's order

    held = await api.client.get("/v1/accounts/acc/numbers?status=on_hold", headers=admin)
    assert held.json() == {"data": [], "next_cursor": None}
    bad = await api.client.get("/v1/accounts/acc/numbers?status=lost", headers=admin)
    assert_error(bad, 422, "validation_error", "status")
    other = await api.client.get("/v1/accounts/acc/usage?limit=1", headers=admin)
    wrong = other.json()["next_cursor"]
    if wrong is not None:  # a cursor of another list is refused, not misread
        r = await api.client.get(f"/v1/accounts/acc/numbers?cursor={wrong}", headers=admin)
        assert_error(r, 422, "validation_error", "cursor")
    r = await api.client.get("/v1/accounts/acc/numbers?cursor=not-a-cursor", headers=admin)
    assert_error(r, 422, "validation_error", "cursor")


async def test_one_number_auto_pay_and_its_billing_group(api: Api) -> None:
    admin = await seed(api)
    number = NUMBERS[0]
    r = await api.client.get(f"/v1/accounts/acc/numbers/{number}", headers=admin)
    assert r.status_code == 200 and r.json()["number"] == number
    encoded = await api.client.get("/v1/accounts/acc/numbers/%2B14155550101", headers=admin)
    assert encoded.json() == r.json()
    assert_error(
        await api.client.get("/v1/accounts/acc/numbers/+14155550999", headers=admin),
        404,
        "number_not_found",
        "number",
    )
    assert_error(
        await api.client.get("/v1/accounts/acc/numbers/0044207", headers=admin),
        422,
        "validation_error",
        "number",
    )

    r = await api.client.patch(
        f"/v1/accounts/acc/numbers/{number}", json={"auto_pay": False}, headers=admin
    )
    assert r.status_code == 200 and r.json()["auto_pay"] is False
    group = await api.client.post(
        "/v1/accounts/acc/billing_groups", json={"name": "Sales"}, headers=admin
    )
    gid = group.json()["id"]
    r = await api.client.patch(
        f"/v1/accounts/acc/numbers/{number}", json={"billing_group_id": gid}, headers=admin
    )
    assert r.status_code == 200 and r.json()["billing_group_id"] == gid
    assert r.json()["auto_pay"] is False  # left out: unchanged
    in_group = await api.client.get(
        f"/v1/accounts/acc/numbers?billing_group_id={gid}", headers=admin
    )
    assert [n["number"] for n in in_group.json()["data"]] == [number]
    r = await api.client.patch(
        f"/v1/accounts/acc/numbers/{number}", json={"billing_group_id": None}, headers=admin
    )
    assert r.status_code == 200 and r.json()["billing_group_id"] is None

    for body, code, field in (
        ({"billing_group_id": "bg_0000000000000000"}, "unknown_billing_group", "billing_group_id"),
        ({"auto_pay": "yes"}, "validation_error", "auto_pay"),
        ({"status": "active"}, "validation_error", "status"),
    ):
        r = await api.client.patch(f"/v1/accounts/acc/numbers/{number}", json=body, headers=admin)
        assert_error(r, 422, code, field)
    r = await api.client.patch(
        "/v1/accounts/acc/numbers/+14155550999", json={"auto_pay": True}, headers=admin
    )
    assert_error(r, 404, "number_not_found", "number")


async def test_a_release_publishes_once_and_is_final(api: Api) -> None:
    admin = await seed(api)
    number = NUMBERS[1]
    url = f"/v1/accounts/acc/numbers/{number}/release"
    r = await api.client.post(url, headers=admin)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["status"], out["release_reason"], out["next_renewal"]) == (
        "released",
        "customer",
        None,
    )
    again = await api.client.post(url, headers=admin)
    assert again.status_code == 200 and again.json() == out
    box = await cast(RedisBalances, api.svc.balances).pending_outbox("acc")
    assert [(s.type, s.reason, s.number) for s in box] == [("number.release", "customer", number)]
    listed = await api.client.get("/v1/accounts/acc/numbers?status=released", headers=admin)
    assert [n["number"] for n in listed.json()["data"]] == [number]
    assert_error(
        await api.client.post("/v1/accounts/acc/numbers/+14155550999/release", headers=admin),
        404,
        "number_not_found",
        "number",
    )


async def test_a_managed_account_never_sees_a_fee(api: Api) -> None:
    await seed(api)
    await api.seed("mgr")
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    spec = AccountSpec.model_validate({"id": "sub", "manager_id": "mgr", "balance": "5.00"})
    await create_accounts(api.svc.pool, api.svc.balances, [spec])
    await activate(api, "sub", NUMBERS[0])
    own = await api.key("sub", "admin")
    manager = await api.key("mgr", "admin")
    for headers, shown in ((own, False), (manager, True)):
        listed = (await api.client.get("/v1/accounts/sub/numbers", headers=headers)).json()
        one = (
            await api.client.get(f"/v1/accounts/sub/numbers/{NUMBERS[0]}", headers=headers)
        ).json()
        for n in (listed["data"][0], one):
            assert ("monthly_fee" in n, "one_time_fees" in n) == (shown, shown), n
            assert n["status"] == "active"
