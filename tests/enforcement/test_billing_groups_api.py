"""Billing groups through the API: create, rename, numbers and users, delete (refused while in
use, unless reassigned), what a user with the billing-unit privileges sees, and the month's
ledger records as JSON and CSV, which agree to the micro-unit."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.money import parse_money
from enforcement import groups
from infra.ledger import PostgresLedger
from tests.api import Api, assert_error
from tests.enforcement.test_permissions import user_key

SALES = "+14155550111"


async def test_groups_numbers_users_and_deleting_one_in_use(api: Api) -> None:
    await api.seed("ten")
    admin = await user_key(api, "ten", "admin")
    r = await api.client.post(
        "/v1/accounts/ten/billing_groups", json={"name": "Sales"}, headers=admin
    )
    assert r.status_code == 201, r.text
    sales = r.json()["id"]
    r = await api.client.post(
        "/v1/accounts/ten/billing_groups", json={"name": "Sales"}, headers=admin
    )
    assert_error(r, 409, "name_taken", "name")
    r = await api.client.post(
        "/v1/accounts/ten/billing_groups", json={"name": "Support"}, headers=admin
    )
    support = r.json()["id"]
    r = await api.client.put(
        f"/v1/accounts/ten/billing_groups/{sales}/numbers",
        json={"numbers": [SALES, "+14155550112"]},
        headers=admin,
    )
    assert r.json()["numbers"] == [SALES, "+14155550112"], r.text
    # a number is in one group at most: listed in Support, it leaves Sales
    r = await api.client.put(
        f"/v1/accounts/ten/billing_groups/{support}/numbers",
        json={"numbers": [SALES]},
        headers=admin,
    )
    r = await api.client.get("/v1/accounts/ten/billing_groups", headers=admin)
    by_name = {g["name"]: g for g in r.json()["data"]}
    assert by_name["Sales"]["numbers"] == ["+14155550112"]
    assert by_name["Support"]["numbers"] == [SALES]
    r = await api.client.put(
        f"/v1/accounts/ten/billing_groups/{support}/numbers",
        json={"numbers": ["0044 20"]},
        headers=admin,
    )
    assert r.status_code == 422
    r = await api.client.put(
        "/v1/accounts/ten/outbound_profiles/trunk-1",
        json={"name": "Trunk", "billing_group_id": support},
        headers=admin,
    )
    assert r.json() == {"id": "trunk-1", "name": "Trunk", "billing_group_id": support}
    r = await api.client.delete(f"/v1/accounts/ten/billing_groups/{support}", headers=admin)
    assert_error(r, 409, "billing_group_in_use")
    assert "1 numbers and 1 outbound profiles" in r.json()["error"]["message"]
    r = await api.client.delete(
        f"/v1/accounts/ten/billing_groups/{support}?reassign_to={sales}", headers=admin
    )
    assert r.status_code == 204
    r = await api.client.get("/v1/accounts/ten/billing_groups", headers=admin)
    (only,) = r.json()["data"]
    assert only["numbers"] == [SALES, "+14155550112"] and only["outbound_profiles"] == ["trunk-1"]
    r = await api.client.delete(f"/v1/accounts/ten/billing_groups/{support}", headers=admin)
    assert_error(r, 404, "billing_group_not_found", "group_id")


async def test_a_unit_user_sees_and_edits_only_its_units(api: Api) -> None:
    await api.seed("ten")
    admin = await user_key(api, "ten", "admin")
    viewer = await user_key(api, "ten", "user", ("view_billing_unit",))
    editor = await user_key(api, "ten", "user", ("edit_billing_unit",))
    mine = (await api.client.post(
        "/v1/accounts/ten/billing_groups", json={"name": "Editor's"}, headers=editor
    )).json()  # fmt: skip
    assert len(mine["users"]) == 1  # its creator belongs to it
    other = (await api.client.post(
        "/v1/accounts/ten/billing_groups", json={"name": "Other"}, headers=admin
    )).json()  # fmt: skip
    r = await api.client.get("/v1/accounts/ten/billing_groups", headers=editor)
    assert [g["name"] for g in r.json()["data"]] == ["Editor's"]
    r = await api.client.patch(
        f"/v1/accounts/ten/billing_groups/{other['id']}", json={"name": "Mine now"}, headers=editor
    )
    assert_error(r, 404, "billing_group_not_found", "group_id")  # as if it did not exist
    r = await api.client.get("/v1/accounts/ten/billing_groups", headers=viewer)
    assert r.json()["data"] == []  # in no unit yet
    r = await api.client.post("/v1/accounts/ten/billing_groups", json={"name": "x"}, headers=viewer)
    assert_error(r, 403, "forbidden")
    viewer_id = await api.svc.pool.fetchval(
        "SELECT u.id FROM users u JOIN access_group_members m ON m.user_id = u.id"
        " JOIN access_groups g ON g.id = m.group_id WHERE 'view_billing_unit' = ANY(g.privileges)"
    )
    r = await api.client.put(
        f"/v1/accounts/ten/billing_groups/{other['id']}/users",
        json={"user_ids": [viewer_id]},
        headers=admin,
    )
    assert r.json()["users"] == [viewer_id], r.text
    r = await api.client.get("/v1/accounts/ten/billing_groups", headers=viewer)
    assert [g["name"] for g in r.json()["data"]] == ["Other"]
    r = await api.client.put(
        f"/v1/accounts/ten/billing_groups/{other['id']}/users",
        json={"user_ids": ["usr_0000000000000000"]},
        headers=admin,
    )
    assert_error(r, 422, "unknown_user", "user_ids")


async def test_ledger_records_as_json_and_csv_agree_and_a_unit_user_gets_its_units(
    api: Api,
) -> None:
    await api.seed("ten")
    admin = await user_key(api, "ten", "admin")
    viewer = await user_key(api, "ten", "user", ("view_billing_unit",))
    sales = await groups.create(api.svc.pool, "ten", "Sales")
    # the month of the opening balance's row, so that every row of the test is in it
    now = await api.svc.pool.fetchval("SELECT event_time FROM ledger WHERE account_id = 'ten'")
    now = now.astimezone(UTC)
    month = f"{now.year:04d}-{now.month:02d}"
    # two rows of this month in Sales, one in no group (the opening balance)
    await api.svc.pool.execute(
        "INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, event_time,"
        " source, event_id, billing_group_id, direction) VALUES"
        " ($1, 'ten', 'call', -61000, 66, 'c1', $3, 'urn:t', 'c1', $4, 'outbound'),"
        " ($2, 'ten', 'sms', -4000, 1, 'm1', $3, 'urn:t', 'm1', $4, '')",
        b"k" * 16,
        b"m" * 16,
        now,
        sales.id,
    )
    r = await api.client.get(f"/v1/accounts/ten/ledger_records?month={month}", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    total = await api.svc.pool.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = 'ten'")
    assert parse_money(body["total"]) == total
    assert sum(parse_money(line["amount"]) for line in body["lines"]) == total
    assert "rate" not in r.text
    r = await api.client.get(
        f"/v1/accounts/ten/ledger_records?month={month}&format=csv", headers=admin
    )
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows[-1]["kind"] == "total" and parse_money(rows[-1]["amount"]) == total
    assert [
        (x["billing_group_id"] or None, x["kind"], parse_money(x["amount"])) for x in rows[:-1]
    ] == [
        (line["billing_group_id"], line["kind"], parse_money(line["amount"]))
        for line in body["lines"]
    ]
    # a unit user sees only the lines of its units: none, then Sales's
    r = await api.client.get(f"/v1/accounts/ten/ledger_records?month={month}", headers=viewer)
    assert r.json()["lines"] == [] and r.json()["total"] == "0.00"
    viewer_id = await api.svc.pool.fetchval("SELECT user_id FROM access_group_members LIMIT 1")
    await groups.set_users(api.svc.pool, "ten", sales.id, [viewer_id])
    r = await api.client.get(f"/v1/accounts/ten/ledger_records?month={month}", headers=viewer)
    assert {line["billing_group_id"] for line in r.json()["lines"]} == {sales.id}
    assert r.json()["total"] == "-0.065"
    for bad in ("2026-13", "26-11", "2026-1", ""):
        r = await api.client.get(f"/v1/accounts/ten/ledger_records?month={bad}", headers=admin)
        assert r.status_code == 422, bad


async def test_the_usage_history_pages_and_filters_and_shows_no_rate(api: Api) -> None:
    await api.seed("ten")
    admin = await user_key(api, "ten", "admin")
    sales = await groups.create(api.svc.pool, "ten", "Sales")
    base = datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC)  # across a month's end
    rows = []
    for i in range(7):
        kind = "call" if i % 2 == 0 else "sms"
        rows.append(
            (
                f"k{i:015d}".encode(),
                "ten",
                kind,
                -1000 * (i + 1),
                60 if kind == "call" else 1,
                f"ev{i}",
                "standard:44",  # a rate reference: never shown
                base + timedelta(seconds=20 * i),
                "urn:t",
                f"ev{i}",
                b"f",
                0,
                sales.id if i < 3 else "",
                "outbound" if kind == "call" else "",
                SALES if i < 3 else "+14155550100",
                "+442071234567",
            )
        )
    await PostgresLedger(api.svc.pool).write_usage(rows)
    got: list[dict[str, Any]] = []
    url = "/v1/accounts/ten/usage?limit=3"
    while url:
        r = await api.client.get(url, headers=admin)
        assert r.status_code == 200, r.text
        page = r.json()
        got += page["data"]
        assert "standard" not in r.text and "rate" not in r.text
        url = (
            f"/v1/accounts/ten/usage?limit=3&cursor={page['next_cursor']}"
            if page["next_cursor"]
            else ""
        )
    assert [x["id"] for x in got] == [f"ev{i}" for i in reversed(range(7))]
    first = got[-1]
    assert first == {
        "time": "2026-11-30T23:59:00Z",
        "type": "call",
        "id": "ev0",
        "from": SALES,
        "to": "+442071234567",
        "direction": "outbound",
        "billed_s": 60,
        "quantity": 60,
        "included_s": 0,
        "amount": "-0.001",
        "billing_group_id": sales.id,
    }
    r = await api.client.get("/v1/accounts/ten/usage?type=sms", headers=admin)
    assert {x["type"] for x in r.json()["data"]} == {"sms"} and len(r.json()["data"]) == 3
    r = await api.client.get(f"/v1/accounts/ten/usage?billing_group_id={sales.id}", headers=admin)
    assert [x["id"] for x in r.json()["data"]] == ["ev2", "ev1", "ev0"]
    r = await api.client.get(f"/v1/accounts/ten/usage?number=%2B{SALES[1:]}", headers=admin)
    assert len(r.json()["data"]) == 3
    r = await api.client.get("/v1/accounts/ten/usage?since=2026-12-01T00:00:00Z", headers=admin)
    assert [x["id"] for x in r.json()["data"]] == ["ev6", "ev5", "ev4", "ev3"]
    r = await api.client.get("/v1/accounts/ten/usage?until=2026-12-01T00:00:00Z", headers=admin)
    assert [x["id"] for x in r.json()["data"]] == ["ev2", "ev1", "ev0"]
    # a unit user in no unit sees nothing, even asking for a group by id
    viewer = await user_key(api, "ten", "user", ("view_billing_unit",))
    r = await api.client.get(f"/v1/accounts/ten/usage?billing_group_id={sales.id}", headers=viewer)
    assert r.json()["data"] == []
    for bad in ("cursor=xyz", "since=2026-12-01T00:00:00", "type=opening", "limit=0", "number=44"):
        r = await api.client.get(f"/v1/accounts/ten/usage?{bad}", headers=admin)
        assert r.status_code == 422, (bad, r.text)
