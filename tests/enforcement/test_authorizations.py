"""Authorizations through the ASGI app that ``meter run api`` serves, against the real Redis and
PostgreSQL: a thousand at once never reserve more than the credit, every deny reason, the
reservation and its times, retries, the FastAPI route answering as the fast path does, a call
that already hung up, and an account Redis lost rebuilt by its first authorization."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import httpx

from balance import keys
from meter.apiserver import create_app
from rating.rating import VoiceRate, voice_cost
from tests.api import (
    NOWHERE,
    SATELLITE,
    UK_MOBILE,
    Api,
    assert_error,
    call,
    granted_seconds,
    grants_bought,
)


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
    # held for money alone: the credit buys nothing, and credit is what lifts it
    assert await reason(account_id="dry") == "insufficient_credit"
    assert await reason(account_id="dry", direction="inbound", call_id="in1") == "ok"
    # held for another reason (the recharge cap, a declined card): money does not lift it
    await api.seed("capped")
    await api.svc.balances.set_status("capped", "hold", "recharge_cap")
    assert await reason(account_id="capped") == "account_on_hold"
    assert await reason(account_id="capped", direction="inbound", call_id="in3") == "ok"
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
    # max_duration_s: the first grant (300 s) it reserved, not all that 1.00 buys at 0.035/min
    # after the 0.005 connect fee (60/6): 1,704 s.
    mobile = VoiceRate("447", 35_000, 5_000, 60, 6)
    assert grants_bought(1_000_000, mobile, 14_400)[0] == 1_704
    assert out["max_duration_s"] == 300
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
