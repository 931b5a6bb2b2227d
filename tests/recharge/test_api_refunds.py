"""Refunds through the served ASGI app (the sandbox gateway): only an operator refunds or
credits, each refusal is a clear 4xx, a retry is the same refund, and the payment history
shows the Refunded rows and each payment's refunded amount."""

from __future__ import annotations

from typing import Any

import httpx

from infra.ledger import PostgresLedger
from ops.reconcile import reconcile
from tests.api import Api, assert_error

PAY = "/v1/accounts/acc/payments"
REFUNDS = "/v1/accounts/acc/payments/p1/refunds"
CREDITS = "/v1/accounts/acc/credits"


async def _paid(api: Api) -> tuple[dict[str, str], dict[str, str]]:
    """Account ``acc`` (5.00) with a card and a 40.00 top-up ``p1``; its admin's headers and
    an operator's."""
    await api.seed("acc", balance="5.00")
    admin = await api.key("acc", "admin")
    r = await api.client.put(
        "/v1/accounts/acc/payment_method", json={"token": "pm_card_visa"}, headers=admin
    )
    assert r.status_code == 201, r.text
    r = await api.client.post(PAY, json={"amount": "40.00", "payment_id": "p1"}, headers=admin)
    assert r.status_code == 201, r.text
    _, op = await api.svc.keys.create(None, "operator")
    return admin, {"Authorization": f"Bearer {op}"}


async def _balance(api: Api, headers: dict[str, str]) -> str:
    r = await api.client.get("/v1/accounts/acc/balance", headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["balance"])


async def _post(api: Api, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return await api.client.post(path, json=body, headers=headers)


async def test_only_an_operator_refunds_or_credits(api: Api) -> None:
    admin, op = await _paid(api)
    user = await api.key("acc", "user")
    service = await api.key("acc", "service")
    refund = {"refund_id": "r1", "reason": "asked"}
    credit = {"credit_id": "c1", "amount": "1.00", "reason": "disputed call"}
    for headers in (admin, user, service):
        assert_error(await _post(api, REFUNDS, refund, headers), 403, "forbidden")
        assert_error(await _post(api, CREDITS, credit, headers), 403, "forbidden")
    assert await _balance(api, admin) == "45.00"  # nothing moved
    assert (await _post(api, REFUNDS, refund, op)).status_code == 201
    assert (await _post(api, CREDITS, credit, op)).status_code == 201


async def test_refunds_to_the_card_through_the_api(api: Api) -> None:
    admin, op = await _paid(api)

    r = await _post(api, REFUNDS, {"refund_id": "r1", "amount": "15.00", "reason": "x"}, op)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["kind"], body["status"], body["amount"], body["balance_change"]) == (
        "card",
        "succeeded",
        "15.00",
        "-15.00",
    )
    assert (body["payment_id"], body["applied"]) == ("p1", True)
    again = await _post(api, REFUNDS, {"refund_id": "r1", "amount": "15.00", "reason": "x"}, op)
    assert (again.status_code, again.json()) == (201, body)
    assert await _balance(api, admin) == "30.00"

    for refund, status, code, field in (
        (
            {"refund_id": "r2", "amount": "25.01", "reason": "x"},
            409,
            "refund_exceeds_capture",
            "amount",
        ),
        ({"refund_id": "r1", "amount": "16.00", "reason": "x"}, 409, "refund_id_reused", None),
        ({"refund_id": "r2", "amount": "1.001", "reason": "x"}, 422, "invalid_amount", "amount"),
        ({"refund_id": "r2", "amount": 1, "reason": "x"}, 422, "validation_error", "amount"),
        ({"refund_id": "r 2", "reason": "x"}, 422, "validation_error", "refund_id"),
        ({"refund_id": "r2", "reason": ""}, 422, "validation_error", "reason"),
    ):
        assert_error(await _post(api, REFUNDS, refund, op), status, code, field)
    r = await _post(
        api, "/v1/accounts/acc/payments/p9/refunds", {"refund_id": "r2", "reason": "x"}, op
    )
    assert_error(r, 404, "payment_not_found")
    r = await _post(
        api, "/v1/accounts/nobody/payments/p1/refunds", {"refund_id": "r2", "reason": "x"}, op
    )
    assert_error(r, 404, "account_not_found", "account_id")

    r = await _post(api, REFUNDS, {"refund_id": "r3", "reason": "the rest"}, op)
    assert r.status_code == 201 and r.json()["amount"] == "25.00"
    assert_error(
        await _post(api, REFUNDS, {"refund_id": "r4", "reason": "x"}, op),
        409,
        "refund_exceeds_capture",
    )
    assert await _balance(api, admin) == "5.00"


async def test_a_declined_payment_is_not_refunded(api: Api) -> None:
    admin, op = await _paid(api)
    await api.client.delete("/v1/accounts/acc/payment_method", headers=admin)
    await api.client.put(
        "/v1/accounts/acc/payment_method", json={"token": "pm_card_chargeDeclined"}, headers=admin
    )
    r = await _post(api, PAY, {"amount": "10.00", "payment_id": "p2"}, admin)
    assert r.status_code == 402
    r = await _post(
        api, "/v1/accounts/acc/payments/p2/refunds", {"refund_id": "r1", "reason": "x"}, op
    )
    assert_error(r, 409, "payment_not_settled")


async def test_credits_through_the_api(api: Api) -> None:
    admin, op = await _paid(api)
    credit = {"credit_id": "c1", "amount": "2.50", "reason": "disputed call to +4420"}
    r = await _post(api, CREDITS, credit, op)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["kind"], body["status"], body["balance_change"], body["payment_id"]) == (
        "credit",
        "succeeded",
        "2.50",
        None,
    )
    assert (await _post(api, CREDITS, credit, op)).json() == body
    assert await _balance(api, admin) == "47.50"
    assert_error(
        await _post(api, CREDITS, {**credit, "amount": "3.00"}, op), 409, "refund_id_reused"
    )
    for amount in ("0", "-1.00"):
        assert_error(
            await _post(api, CREDITS, {**credit, "credit_id": "c2", "amount": amount}, op),
            422,
            "invalid_amount",
            "amount",
        )
    r = await _post(api, "/v1/accounts/nobody/credits", credit, op)
    assert_error(r, 404, "account_not_found", "account_id")


async def test_the_payment_history_shows_the_refunded_rows(api: Api) -> None:
    admin, op = await _paid(api)
    await _post(api, REFUNDS, {"refund_id": "r1", "amount": "10.00", "reason": "part"}, op)
    history = (await api.client.get(PAY, headers=admin)).json()
    (p,) = history["payments"]
    assert (p["id"], p["status"], p["refunded"], p["refund_status"]) == (
        "p1",
        "succeeded",
        "10.00",
        "partially_refunded",
    )
    await _post(api, REFUNDS, {"refund_id": "r2", "reason": "the rest"}, op)
    await _post(api, CREDITS, {"credit_id": "c1", "amount": "1.00", "reason": "call"}, op)
    history = (await api.client.get(PAY, headers=op)).json()  # operators read billing too
    (p,) = history["payments"]
    assert (p["refunded"], p["refund_status"]) == ("40.00", "refunded")
    rows = {r["id"]: r for r in history["refunds"]}
    assert {i: (r["kind"], r["status"], r["amount"]) for i, r in rows.items()} == {
        "r1": ("card", "succeeded", "10.00"),
        "r2": ("card", "succeeded", "30.00"),
        "c1": ("credit", "succeeded", "1.00"),
    }
    assert rows["r2"]["reason"] == "the rest"

    # the book and the balance agree, and the ledger has each refund by its id
    assert await _balance(api, admin) == "6.00"
    assert (await PostgresLedger(api.svc.pool).balances(["acc"]))["acc"] == 6_000_000
    result = await reconcile(api.svc.pool, api.svc.balances)
    assert (result.drift_micros, result.mismatched) == (0, {})
    kinds = await api.svc.pool.fetch(
        "SELECT event_id, amount, ref FROM ledger WHERE account_id = 'acc' AND kind = 'refund'"
        " ORDER BY entry_id"
    )
    assert [tuple(k) for k in kinds] == [
        ("r1", -10_000_000, "p1"),
        ("r2", -30_000_000, "p1"),
        ("c1", 1_000_000, "c1"),
    ]
