"""The HTTP API against the real Redis and PostgreSQL, through the ASGI app that ``meter run api``
serves (``asgi_app``): authorizations under concurrency, every deny reason, auth and error
shapes, balances, suspend / resume, and what happens when Redis is gone."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast

import httpx
import orjson
import pytest

from balance import keys
from balance.accounts import AccountSpec, create_accounts, put_price_list
from infra.http.api_keys import Role
from infra.settings import Settings
from meter.apiserver import ServedServices, asgi_app, connect_api, create_app
from meter.traffic import demo_price_list
from rating.rating import VoiceRate, voice_cost

UK = "+442071234567"  # prefix 44: 0.015/min, 6/6
UK_MOBILE = "+447911123456"  # prefix 447: 0.035/min, connect 0.005, 60/6
SATELLITE = "+881612345678"  # prefix 8816: 4.50/min, connect 0.50, 60/60
NOWHERE = "+99912345678"  # no rate
ERROR_KEYS = {"code", "message", "field"}


@dataclass
class Api:
    settings: Settings
    svc: ServedServices
    client: httpx.AsyncClient

    async def seed(
        self, *ids: str, balance: str = "100.00", credit_limit: str = "0", low: str = "0"
    ) -> None:
        specs = [
            AccountSpec.model_validate(
                {
                    "id": i,
                    "price_list_id": "standard",
                    "balance": balance,
                    "credit_limit": credit_limit,
                    "low_balance_threshold": low,
                }
            )
            for i in ids
        ]
        await create_accounts(self.svc.pool, self.svc.balances, specs)

    async def key(self, account_id: str, role: Role) -> dict[str, str]:
        _, key = await self.svc.keys.create(account_id, role)
        return {"Authorization": f"Bearer {key}"}

    async def authorize(self, headers: dict[str, str], **body: Any) -> httpx.Response:
        return await self.client.post("/v1/authorizations", json=call(**body), headers=headers)


def call(
    account_id: str = "acc_1",
    call_id: str = "c1",
    direction: str = "outbound",
    to: str = UK,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "call_id": call_id,
        "direction": direction,
        "from": "+14155550100",
        "to": to,
        **extra,
    }


@contextlib.asynccontextmanager
async def api_on(settings: Settings) -> AsyncIterator[Api]:
    async with connect_api(settings) as svc:
        await put_price_list(svc.pool, demo_price_list())
        transport = httpx.ASGITransport(app=asgi_app(settings, svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://meter") as client:
            yield Api(settings, svc, client)


@pytest.fixture
async def api(db_settings: Settings) -> AsyncIterator[Api]:
    # A generous deadline: these tests are about answers, not about a loaded CI machine.
    async with api_on(replace(db_settings, authorize_deadline_s=5.0)) as a:
        yield a


def grants_bought(available: int, rate: VoiceRate, grant_s: int) -> list[int]:
    """The grants, in seconds, that successive calls get from ``available`` micro-units: the
    longest duration up to ``grant_s`` whose price fits, until not even one increment does.
    Found by search over ``rating.rating``, independently of the Lua script."""
    grants = []
    while True:
        fits = [d for d in range(1, grant_s + 1) if voice_cost(d, rate)[0] <= available]
        if not fits:
            return grants
        grants.append(max(fits))
        available -= voice_cost(max(fits), rate)[0]


async def granted_seconds(svc: ServedServices, account_id: str) -> list[int]:
    raw = cast(
        dict[bytes, bytes],
        await svc.balances._r.hgetall(keys.reservations(account_id)),
    )
    return sorted((int(v.split(b"|")[1]) for v in raw.values()), reverse=True)


async def test_a_thousand_concurrent_authorizations_never_reserve_more_than_the_credit(
    api: Api,
) -> None:
    await api.seed("acc_1", balance="1.00")
    service = await api.key("acc_1", "service")
    answers = await asyncio.gather(*(api.authorize(service, call_id=f"c{i}") for i in range(1000)))
    assert {r.status_code for r in answers} == {200}
    bodies = [r.json() for r in answers]
    allowed = [b for b in bodies if b["decision"] == "allow"]
    assert {b["reason"] for b in bodies if b["decision"] == "deny"} == {"insufficient_credit"}

    rate = VoiceRate("44", 15_000)
    expected = grants_bought(1_000_000, rate, api.settings.authorize_grant_s)
    assert expected == [300] * 13 + [96]  # 13 x 0.075 + 0.024 = 0.999 of 1.00
    held = await api.svc.balances.reservations("acc_1")
    assert len(held) == len(allowed) == len(expected)
    assert sum(held.values()) == sum(voice_cost(d, rate)[0] for d in expected) <= 1_000_000
    assert await granted_seconds(api.svc, "acc_1") == expected
    state = await api.svc.balances.get("acc_1")
    assert state is not None and state.reserved == sum(held.values())
    assert {b["reservation_id"] for b in allowed} == {f"acc_1:{c}" for c in held}


async def test_every_deny_reason(api: Api) -> None:
    await api.seed("rich", "poor")
    await api.seed("thin", balance="0.001")
    await api.seed("dry", balance="0")  # no credit at all: on hold from the start
    service = await api.key("rich", "service")

    async def reason(**body: Any) -> str:
        r = await api.authorize(service, **body)
        assert r.status_code == 200, r.text
        out = r.json()
        if out["decision"] == "deny":
            assert out["max_duration_s"] == 0
            assert out["reservation_id"] is None and out["expires_at"] is None
        return str(out["reason"])

    assert await reason(account_id="ghost") == "unknown_account"
    assert await reason(account_id="rich", to=NOWHERE) == "no_rate_for_destination"
    assert await reason(account_id="thin", to=SATELLITE) == "insufficient_credit"
    assert await reason(account_id="dry") == "account_on_hold"
    assert await reason(account_id="dry", direction="inbound", call_id="in1") == "ok"
    admin = await api.key("poor", "admin")
    r = await api.client.post("/v1/accounts/poor/suspend", headers=admin)
    assert r.status_code == 200, r.text
    assert await reason(account_id="poor") == "account_suspended"
    assert await reason(account_id="poor", direction="inbound", call_id="in2") == (
        "account_suspended"
    )
    assert await reason(account_id="rich") == "ok"


async def test_an_allowed_call_gets_its_reservation_and_times(api: Api) -> None:
    await api.seed("acc_1", balance="1.00")
    service = await api.key("acc_1", "service")
    before = time.time()
    r = await api.authorize(service, to=UK_MOBILE)
    out = r.json()
    assert r.status_code == 200
    assert out["decision"] == "allow" and out["reason"] == "ok"
    assert out["reservation_id"] == "acc_1:c1"
    # max_duration_s: all that 1.00 buys at 0.035/min after the 0.005 connect fee (60/6).
    mobile = VoiceRate("447", 35_000, 5_000, 60, 6)
    assert out["max_duration_s"] == grants_bought(1_000_000, mobile, 14_400)[0] == 1_704
    expires = out["expires_at"]
    assert expires.endswith("Z") or expires[-6] in "+-"  # RFC 3339 with an offset
    at = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
    grant = api.settings.authorize_grant_s + api.settings.authorize_grace_s
    assert before + grant - 1 <= at <= time.time() + grant + 1


async def test_a_retry_with_the_same_call_id_gets_the_first_answer(api: Api) -> None:
    await api.seed("acc_1", balance="10.00")
    service = await api.key("acc_1", "service")
    first = await api.authorize(service, call_id="retry-me")
    again = await api.authorize(service, call_id="retry-me")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    held = await api.svc.balances.reservations("acc_1")
    assert list(held) == ["retry-me"]
    state = await api.svc.balances.get("acc_1")
    assert state is not None and state.reserved == held["retry-me"] == 75_000


def assert_error(r: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert "Traceback" not in r.text


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
    # The operator's actions need an admin key of the account.
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


async def test_the_fastapi_route_answers_as_the_fast_path_does(api: Api) -> None:
    await api.seed("acc_1")
    service = await api.key("acc_1", "service")
    plain = httpx.ASGITransport(app=create_app(api.settings, api.svc))
    async with httpx.AsyncClient(transport=plain, base_url="http://meter") as slow:
        for body in (call(call_id="same"), call(to=NOWHERE), {"account_id": "acc_1"}):
            fast_r = await api.client.post("/v1/authorizations", json=body, headers=service)
            slow_r = await slow.post("/v1/authorizations", json=body, headers=service)
            assert (fast_r.status_code, fast_r.json()) == (slow_r.status_code, slow_r.json())
        r = await slow.post("/v1/authorizations", json=call())
        assert_error(r, 401, "unauthorized")


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
    admin = await api.key("acc_1", "admin")

    async def suspended_in_postgres() -> bool:
        return bool(
            await api.svc.pool.fetchval("SELECT suspended FROM accounts WHERE id = 'acc_1'")
        )

    async def outbox() -> list[tuple[str, str]]:
        return [(s.type, s.reason) for s in await api.svc.balances.pending_outbox("acc_1")]

    r = await api.client.post(
        "/v1/accounts/acc_1/suspend", json={"reason": "fraud_review"}, headers=admin
    )
    assert r.status_code == 200
    assert r.json() == {"account_id": "acc_1", "status": "suspended", "changed": True}
    assert await suspended_in_postgres()
    assert await outbox() == [("account.suspend", "fraud_review")]
    again = await api.client.post("/v1/accounts/acc_1/suspend", headers=admin)
    assert again.json() == {"account_id": "acc_1", "status": "suspended", "changed": False}
    assert await outbox() == [("account.suspend", "fraud_review")]
    bad = await api.client.post("/v1/accounts/acc_1/resume", json={"reason": "No!"}, headers=admin)
    assert_error(bad, 422, "validation_error", "reason")

    r = await api.client.post("/v1/accounts/acc_1/resume", headers=admin)
    assert r.json() == {"account_id": "acc_1", "status": "active", "changed": True}
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


async def test_authorizing_a_call_that_already_hung_up_is_a_conflict(api: Api) -> None:
    await api.seed("acc_1", balance="10.00")
    service = await api.key("acc_1", "service")
    assert (await api.authorize(service, call_id="done")).json()["decision"] == "allow"
    # the hangup's debit leaves a closed marker where the reservation was
    await api.svc.balances._r.hset(
        keys.reservations("acc_1"), "done", "0|0|9999999999|0|0|1|1|0|-1"
    )
    assert_error(await api.authorize(service, call_id="done"), 409, "call_closed", "call_id")


async def test_an_account_redis_lost_is_rebuilt_by_its_first_authorization(api: Api) -> None:
    await api.seed("acc_1", balance="1.00")
    service = await api.key("acc_1", "service")
    await api.svc.balances._r.flushall()  # a Redis that lost everything (the test's own)
    r = await api.authorize(service, call_id="after-loss")
    assert r.status_code == 200 and r.json()["decision"] == "allow", r.text
    state = await api.svc.balances.get("acc_1")
    assert state is not None and state.balance == 1_000_000 and state.reserved > 0
    # an account PostgreSQL does not know is still denied, and nothing is created for it
    r = await api.authorize(service, account_id="nobody", call_id="x")
    assert r.json()["reason"] == "unknown_account"
    assert await api.svc.balances.get("nobody") is None
