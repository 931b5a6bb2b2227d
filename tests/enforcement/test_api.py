"""The rest of the HTTP API through the ASGI app that ``meter run api`` serves, against the real
Redis and PostgreSQL: auth and roles, bad bodies and the error shape, balances, suspend /
resume, the OpenAPI document, what happens when Redis is gone, the catch-all, and bundles
(the authorizations themselves: test_authorizations.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from balance import keys
from meter.apiserver import create_app
from tests.api import Api, api_on, assert_error, call


async def test_authentication_and_roles(api: Api) -> None:
    await api.seed("acc_a", "acc_b")
    user_a = await api.key("acc_a", "user")
    admin_a = await api.key("acc_a", "admin")
    service = await api.key("acc_a", "service")

    r = await api.client.post("/v1/authorizations", json=call("acc_a"))
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    # No key and a broken body: the missing key is what the caller hears about.
    r = await api.client.post("/v1/authorizations", content=b"{oops")
    assert_error(r, 401, "unauthorized")
    for header in ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", "Bearer", "Bearer not-a-key"):
        r = await api.client.get("/v1/accounts/acc_a/balance", headers={"Authorization": header})
        assert_error(r, 401, "unauthorized")
    unknown = "Bearer mk_0123456789abcdef_" + "A" * 43
    r = await api.client.get("/v1/accounts/acc_a/balance", headers={"Authorization": unknown})
    assert_error(r, 401, "unauthorized")

    # user/admin keys act on their own account only; service keys authorize for any.
    assert_error(await api.authorize(user_a, account_id="acc_b"), 403, "forbidden")
    assert (await api.authorize(user_a, account_id="acc_a")).status_code == 200
    assert (await api.authorize(service, account_id="acc_b", call_id="s")).status_code == 200
    r = await api.client.get("/v1/accounts/acc_b/balance", headers=user_a)
    assert_error(r, 403, "forbidden")
    assert (await api.client.get("/v1/accounts/acc_b/balance", headers=service)).status_code == 200
    # Suspend / resume need an admin key of the account (or its manager's, or an operator's).
    for headers in (user_a, service):
        r = await api.client.post("/v1/accounts/acc_a/suspend", headers=headers)
        assert_error(r, 403, "forbidden")
    r = await api.client.post("/v1/accounts/acc_b/suspend", headers=admin_a)
    assert_error(r, 403, "forbidden")
    # Another account's id tells a user key nothing, existing or not; a service key learns.
    assert_error(
        await api.client.get("/v1/accounts/ghost/balance", headers=user_a), 403, "forbidden"
    )
    r = await api.client.get("/v1/accounts/ghost/balance", headers=service)
    assert_error(r, 404, "account_not_found", "account_id")

    # A revoked key stops working once the process's cache forgets it.
    key_id = await api.svc.pool.fetchval("SELECT key_id FROM api_keys WHERE role = 'user'")
    assert await api.svc.keys.revoke(key_id)
    api.svc.keys.forget()
    assert_error(await api.authorize(user_a, account_id="acc_a"), 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 400, "malformed_json", None),
        (b"", 400, "malformed_json", None),
        (b"[1, 2]", 422, "validation_error", None),
        ({"account_id": 123}, 422, "validation_error", "account_id"),
        ({"to": None}, 422, "validation_error", "to"),
        ({"direction": "sideways"}, 422, "validation_error", "direction"),
        ({"from": ""}, 422, "validation_error", "from"),
        ({"call_id": "a|b"}, 422, "validation_error", "call_id"),
        ({"call_id": 17}, 422, "validation_error", "call_id"),
        ({"account_id": "no spaces here"}, 422, "validation_error", "account_id"),
        ({"colour": "blue"}, 422, "validation_error", "colour"),
        (b'{"account_id": "acc_1", "x": "' + b"y" * 70_000 + b'"}', 413, "payload_too_large", None),
    ],
)
async def test_bad_bodies(
    api: Api, body: bytes | dict[str, Any], status: int, code: str, field: str | None
) -> None:
    await api.seed("acc_1")
    service = await api.key("acc_1", "service")
    content = orjson.dumps(call() | body) if isinstance(body, dict) else body
    r = await api.client.post("/v1/authorizations", content=content, headers=service)
    assert_error(r, status, code, field)
    assert await api.svc.balances.reservations("acc_1") == {}


async def test_missing_field_and_other_routes(api: Api) -> None:
    await api.seed("acc_1")
    service = await api.key("acc_1", "service")
    body = call()
    del body["to"]
    r = await api.client.post("/v1/authorizations", json=body, headers=service)
    assert_error(r, 422, "validation_error", "to")
    r = await api.client.get("/v1/accounts/bad%20id!/balance", headers=service)
    assert_error(r, 422, "validation_error", "account_id")
    assert_error(await api.client.get("/v1/nothing", headers=service), 404, "not_found")
    r = await api.client.get("/v1/authorizations", headers=service)
    assert_error(r, 405, "method_not_allowed")
    r = await api.client.post("/v1/accounts/acc_1/suspend", content=b"{", headers=service)
    assert_error(r, 403, "forbidden")  # the role is checked before the body is read


async def test_balance(api: Api) -> None:
    await api.seed("acc_1", balance="10.00", credit_limit="5.00", low="1.00")
    service = await api.key("acc_1", "service")
    assert (await api.authorize(service)).json()["decision"] == "allow"  # holds 0.075
    r = await api.client.get("/v1/accounts/acc_1/balance", headers=service)
    assert r.status_code == 200
    assert r.json() == {
        "balance": "10.00",
        "pending": "0.075",
        "credit_limit": "5.00",
        "available_credit": "14.925",
        "currency": "USD",
        "status": "active",
    }


async def test_balance_of_an_account_redis_lost_is_rebuilt_from_the_ledger(api: Api) -> None:
    await api.seed("acc_1", balance="7.25")
    user = await api.key("acc_1", "user")
    await api.svc.balances._r.delete(keys.account("acc_1"))
    r = await api.client.get("/v1/accounts/acc_1/balance", headers=user)
    assert r.status_code == 200
    assert r.json()["balance"] == "7.25" and r.json()["available_credit"] == "7.25"


async def test_suspend_and_resume(api: Api) -> None:
    await api.seed("acc_1", balance="3.00")
    # an operator's fraud review: the account's own admin could not lift it (see
    # test_status_origins.py for who lifts what)
    key, secret = await api.svc.keys.create(None, "operator")
    operator = {"Authorization": f"Bearer {secret}"}

    async def suspended_in_postgres() -> bool:
        return bool(
            await api.svc.pool.fetchval("SELECT suspended FROM accounts WHERE id = 'acc_1'")
        )

    async def outbox() -> list[tuple[str, str]]:
        return [(s.type, s.reason) for s in await api.svc.balances.pending_outbox("acc_1")]

    r = await api.client.post(
        "/v1/accounts/acc_1/suspend", json={"reason": "fraud_review"}, headers=operator
    )
    assert r.status_code == 200
    suspended = {
        "account_id": "acc_1",
        "status": "suspended",
        "changed": True,
        "suspended_by": ["operator"],
        "hold_reason": None,
    }
    assert r.json() == suspended
    assert await suspended_in_postgres()
    row = await api.svc.pool.fetchrow("SELECT * FROM account_suspensions")
    assert row is not None
    assert (row["origin"], row["reason"], row["set_by"]) == ("operator", "fraud_review", key.key_id)
    assert await outbox() == [("account.suspend", "fraud_review")]
    again = await api.client.post("/v1/accounts/acc_1/suspend", headers=operator)
    assert again.json() == suspended | {"changed": False}
    assert await outbox() == [("account.suspend", "fraud_review")]
    bad = await api.client.post(
        "/v1/accounts/acc_1/resume", json={"reason": "No!"}, headers=operator
    )
    assert_error(bad, 422, "validation_error", "reason")

    r = await api.client.post("/v1/accounts/acc_1/resume", headers=operator)
    assert r.json() == {
        "account_id": "acc_1",
        "status": "active",
        "changed": True,
        "suspended_by": [],
        "hold_reason": None,
    }
    assert not await suspended_in_postgres()
    assert await outbox() == [("account.suspend", "fraud_review"), ("account.resume", "operator")]
    seqs = [s.seq for s in await api.svc.balances.pending_outbox("acc_1")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 2


async def test_resume_without_credit_lands_on_hold(api: Api) -> None:
    await api.seed("acc_1", balance="0")
    admin = await api.key("acc_1", "admin")
    await api.client.post("/v1/accounts/acc_1/suspend", headers=admin)
    r = await api.client.post("/v1/accounts/acc_1/resume", headers=admin)
    assert r.json()["status"] == "hold"
    types = [s.type for s in await api.svc.balances.pending_outbox("acc_1")]
    assert types[-3:] == ["account.suspend", "account.resume", "account.hold"]


async def test_suspend_of_an_account_redis_lost_still_queues_the_signal(api: Api) -> None:
    await api.seed("acc_1")
    admin = await api.key("acc_1", "admin")
    await api.svc.balances._r.delete(keys.account("acc_1"))
    r = await api.client.post("/v1/accounts/acc_1/suspend", headers=admin)
    assert r.json()["changed"] is True
    types = [s.type for s in await api.svc.balances.pending_outbox("acc_1")]
    assert types == ["account.suspend"]


async def test_openapi_document(api: Api) -> None:
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert {
        "/v1/authorizations",
        "/v1/accounts/{account_id}/balance",
        "/v1/accounts/{account_id}/suspend",
        "/v1/accounts/{account_id}/resume",
    } <= set(doc["paths"])
    post = doc["paths"]["/v1/authorizations"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["required"]) == {"account_id", "call_id", "direction", "from", "to"}
    assert {"200", "401", "403", "422", "503"} <= set(post["responses"])
    balance = doc["components"]["schemas"]["BalanceOut"]["properties"]
    assert all(balance[f]["type"] == "string" for f in ("balance", "pending", "available_credit"))
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("redis_down", ["refused", "hangs"])
async def test_an_unavailable_redis_answers_503_in_bounded_time(api: Api, redis_down: str) -> None:
    await api.seed("acc_1")
    service = await api.key("acc_1", "service")
    async with contextlib.AsyncExitStack() as stack:
        port = (
            closed_port()
            if redis_down == "refused"
            else await stack.enter_async_context(black_hole())
        )
        broken = replace(
            api.settings, redis_url=f"redis://127.0.0.1:{port}/0", authorize_deadline_s=0.3
        )
        down = await stack.enter_async_context(api_on(broken))
        for i in range(3):
            t = time.monotonic()
            r = await down.authorize(service, call_id=f"c{i}")
            assert time.monotonic() - t < 2.0
            assert_error(r, 503, "balance_store_unavailable")
            assert r.headers["retry-after"] == "1"
        t = time.monotonic()
        r = await down.client.get("/v1/accounts/acc_1/balance", headers=service)
        assert time.monotonic() - t < 2.0
        assert_error(r, 503, "balance_store_unavailable")
    # The healthy side never saw any of it.
    assert (await api.authorize(service, call_id="after")).json()["decision"] == "allow"


async def test_the_catch_all_answers_500_without_a_trace(api: Api) -> None:
    await api.seed("acc_1")
    service = await api.key("acc_1", "service")

    async def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug with a secret in it")

    api.svc.authorizer.authorize = broken  # type: ignore[method-assign]
    r = await api.authorize(service)
    assert_error(r, 500, "internal")
    assert "secret" not in r.text
    # The same through the FastAPI route (Starlette's ServerErrorMiddleware path).
    plain = httpx.ASGITransport(app=create_app(api.settings, api.svc), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=plain, base_url="http://meter") as slow:
        r = await slow.post("/v1/authorizations", json=call(), headers=service)
        assert_error(r, 500, "internal")
        assert "secret" not in r.text


async def test_buy_a_bundle_once_per_purchase_id(api: Api) -> None:
    from balance.accounts import BundleSpec, put_bundle

    await put_bundle(
        api.svc.pool,
        BundleSpec.model_validate({"id": "min300", "minutes": 300, "price": "3.00"}),
    )
    await api.seed("acc_1", balance="5.00")
    admin = await api.key("acc_1", "admin")
    user = await api.key("acc_1", "user")
    body = {"bundle_id": "min300", "purchase_id": "p-1"}
    assert_error(
        await api.client.post("/v1/accounts/acc_1/bundles", json=body, headers=user),
        403,
        "forbidden",
        None,
    )
    r = await api.client.post("/v1/accounts/acc_1/bundles", json=body, headers=admin)
    assert r.status_code == 200, r.text
    assert (r.json()["minutes"], r.json()["price"], r.json()["created"]) == (300, "3.00", True)
    again = await api.client.post("/v1/accounts/acc_1/bundles", json=body, headers=admin)
    assert again.json()["created"] is False and again.json()["balance"] == "2.00"
    st = await api.svc.balances.get("acc_1")
    assert st is not None and st.balance == 2_000_000  # taken once
    poor = await api.client.post(
        "/v1/accounts/acc_1/bundles",
        json={"bundle_id": "min300", "purchase_id": "p-2"},
        headers=admin,
    )
    assert_error(poor, 409, "insufficient_credit", None)
    unknown = await api.client.post(
        "/v1/accounts/acc_1/bundles",
        json={"bundle_id": "nope", "purchase_id": "p-3"},
        headers=admin,
    )
    assert_error(unknown, 404, "unknown_bundle", "bundle_id")
