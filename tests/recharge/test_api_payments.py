"""The payment endpoints through the served ASGI app, with the sandbox gateway (the default):
admin-only billing, the saved method, manual top-ups under the rules, auto-recharge settings,
the payment history, and every refusal as a clear 4xx."""

from __future__ import annotations

from dataclasses import replace

import httpx

from enforcement.http.app import create_app as enforcement_app
from meter.apiserver import asgi_app
from tests.api import ERROR_KEYS, Api


async def _new_account(api: Api, account: str, hours_old: int = 1) -> dict[str, str]:
    await api.seed(account, balance="5.00")
    await api.svc.pool.execute(
        "UPDATE accounts SET created_at = now() - make_interval(hours => $2) WHERE id = $1",
        account,
        hours_old,
    )
    return await api.key(account, "admin")


def _error(r: object) -> dict[str, object]:
    body = r.json()  # type: ignore[attr-defined]
    assert set(body["error"]) == ERROR_KEYS
    return body["error"]  # type: ignore[no-any-return]


async def test_billing_is_admin_only(api: Api) -> None:
    await api.seed("a", "b")
    user = await api.key("a", "user")
    service = await api.key("a", "service")
    other_admin = await api.key("b", "admin")
    for headers in (user, service, other_admin):
        for method, path, body in (
            ("POST", "/v1/accounts/a/payments", {"amount": "10.00", "payment_id": "p"}),
            ("GET", "/v1/accounts/a/payments", None),
            ("PUT", "/v1/accounts/a/payment_method", {"token": "pm_card_visa"}),
            (
                "PUT",
                "/v1/accounts/a/auto_recharge",
                {"enabled": True, "threshold_amount": "5.00", "recharge_amount": "10.00"},
            ),
        ):
            r = await api.client.request(method, path, json=body, headers=headers)
            assert r.status_code == 403, (method, path, r.text)
            assert _error(r)["code"] == "forbidden"


async def test_top_ups_through_the_api(api: Api) -> None:
    admin = await _new_account(api, "acc")
    pay = "/v1/accounts/acc/payments"
    r = await api.client.post(pay, json={"amount": "20.00", "payment_id": "p0"}, headers=admin)
    assert r.status_code == 409 and _error(r)["code"] == "no_payment_method"

    r = await api.client.put(
        "/v1/accounts/acc/payment_method", json={"token": "pm_card_visa"}, headers=admin
    )
    assert r.status_code == 201 and r.json()["last4"] == "4242"
    # the card's expiry, as the gateway gave it (an additive field of the method's answer)
    assert (r.json()["exp_month"], r.json()["exp_year"]) == (12, 2034)
    got = (await api.client.get("/v1/accounts/acc/payment_method", headers=admin)).json()
    assert (got["brand"], got["exp_month"], got["exp_year"]) == ("visa", 12, 2034)
    r = await api.client.put(
        "/v1/accounts/acc/payment_method", json={"token": "pm_card_mastercard"}, headers=admin
    )
    assert r.status_code == 409 and _error(r)["code"] == "payment_method_exists"
    r = await api.client.put(
        "/v1/accounts/acc/payment_method", json={"token": "pm_nonsense"}, headers=admin
    )
    assert r.status_code == 409  # one is saved; the token is not even looked at

    for amount, status, code in (
        ("9.99", 422, "amount_below_minimum"),
        ("10.001", 422, "invalid_amount"),
        (10, 422, "validation_error"),  # money is a string, never a number
        ("100.01", 409, "payment_limit_exceeded"),
    ):
        r = await api.client.post(pay, json={"amount": amount, "payment_id": "x"}, headers=admin)
        assert r.status_code == status, (amount, r.text)
        assert _error(r)["code"] == code
        if code == "payment_limit_exceeded":
            assert int(r.headers["retry-after"]) > 0

    r = await api.client.post(pay, json={"amount": "100.00", "payment_id": "p1"}, headers=admin)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["captured"], body["paid_for"], body["credited"]) == (
        "succeeded",
        "100.00",
        "top_up",
        True,
    )
    again = await api.client.post(pay, json={"amount": "100.00", "payment_id": "p1"}, headers=admin)
    assert again.status_code == 201 and again.json()["id"] == body["id"]
    bal = await api.client.get("/v1/accounts/acc/balance", headers=admin)
    assert bal.json()["balance"] == "105.00"
    history = await api.client.get(pay, headers=admin)
    assert [p["id"] for p in history.json()["payments"]] == ["p1"]


async def test_a_declined_card_is_402_and_recorded(api: Api) -> None:
    admin = await _new_account(api, "acc")
    await api.client.put(
        "/v1/accounts/acc/payment_method",
        json={"token": "pm_card_chargeDeclined"},
        headers=admin,
    )
    r = await api.client.post(
        "/v1/accounts/acc/payments", json={"amount": "10.00", "payment_id": "d1"}, headers=admin
    )
    assert r.status_code == 402 and _error(r)["code"] == "card_declined"
    (p,) = (await api.client.get("/v1/accounts/acc/payments", headers=admin)).json()["payments"]
    assert (p["status"], p["reason"], p["captured"]) == ("declined", "generic_decline", "0.00")
    bal = await api.client.get("/v1/accounts/acc/balance", headers=admin)
    assert bal.json()["balance"] == "5.00"
    # replacing the method: delete, then save
    assert (
        await api.client.delete("/v1/accounts/acc/payment_method", headers=admin)
    ).status_code == 204
    assert (
        await api.client.delete("/v1/accounts/acc/payment_method", headers=admin)
    ).status_code == 404
    r = await api.client.put(
        "/v1/accounts/acc/payment_method", json={"token": "pm_card_visa"}, headers=admin
    )
    assert r.status_code == 201


async def test_auto_recharge_settings_are_validated_and_kept(api: Api) -> None:
    admin = await _new_account(api, "acc", hours_old=100)
    path = "/v1/accounts/acc/auto_recharge"
    assert (await api.client.get(path, headers=admin)).status_code == 404
    for body, field in (
        (
            {"enabled": True, "threshold_amount": "5.00", "recharge_amount": "9.99"},
            "recharge_amount",
        ),
        (
            {"enabled": True, "threshold_amount": "-1.00", "recharge_amount": "20.00"},
            "threshold_amount",
        ),
        ({"enabled": "yes", "threshold_amount": "1.00", "recharge_amount": "20.00"}, "enabled"),
        ({"enabled": True, "threshold_amount": "1.00"}, "recharge_amount"),
    ):
        r = await api.client.put(path, json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
        assert _error(r)["field"] == field
    ok = {"enabled": True, "threshold_amount": "10.00", "recharge_amount": "20.00"}
    r = await api.client.put(path, json=ok, headers=admin)
    assert r.status_code == 200 and r.json()["threshold_amount"] == "10.00"
    assert (await api.client.get(path, headers=admin)).json()["enabled"] is True
    # the balance ($5) is already below $10: turning it on fired a trigger in Redis
    state = await api.svc.balances.recharge_state("acc")
    threshold, open_seq = state.threshold, state.open_trigger
    assert threshold == 10_000_000 and open_seq is not None


async def test_payments_routes_come_with_the_composed_api_only(api: Api) -> None:
    """The enforcement app stands alone (it may not import recharge); ``meter.apiserver``
    includes payments' router, and without a payment service its routes answer 503 after the
    same checks as before (the role first)."""
    admin = await _new_account(api, "acc")
    user = await api.key("acc", "user")
    alone = httpx.ASGITransport(app=enforcement_app(api.settings, api.svc))
    async with httpx.AsyncClient(transport=alone, base_url="http://meter") as client:
        r = await client.get("/v1/accounts/acc/payments", headers=admin)
        assert r.status_code == 404 and _error(r)["code"] == "not_found"
        assert (await client.get("/v1/accounts/acc/balance", headers=admin)).status_code == 200
    assert (await api.client.get("/v1/accounts/acc/payments", headers=admin)).status_code == 200

    unpaid = httpx.ASGITransport(app=asgi_app(api.settings, replace(api.svc, payments=None)))
    async with httpx.AsyncClient(transport=unpaid, base_url="http://meter") as client:
        r = await client.get("/v1/accounts/acc/payments", headers=user)
        assert r.status_code == 403 and _error(r)["code"] == "forbidden"
        r = await client.get("/v1/accounts/nobody/payments", headers=admin)
        assert r.status_code == 403  # another account's
        r = await client.get("/v1/accounts/acc/payments", headers=admin)
        assert r.status_code == 503 and _error(r)["code"] == "payments_unavailable"
