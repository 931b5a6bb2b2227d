"""The call-control API under test: the ASGI app ``meter run api`` serves, on the real Redis and
PostgreSQL, driven in-process through httpx. ``api`` is the fixture (found through the
conftest.py of each test folder that uses it); ``api_on`` opens another one on other settings
(a broken Redis, a stalled PostgreSQL)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, cast

import httpx
import pytest

from balance import keys
from balance.accounts import AccountSpec, create_accounts, put_price_list
from balance.store import RedisBalances
from infra.http.api_keys import Role
from infra.settings import Settings
from meter.apiserver import ServedServices, asgi_app, connect_api
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
    grants: list[int] = []
    while True:
        fits = [d for d in range(1, grant_s + 1) if voice_cost(d, rate)[0] <= available]
        if not fits:
            return grants
        grants.append(max(fits))
        available -= voice_cost(max(fits), rate)[0]


async def granted_seconds(svc: ServedServices, account_id: str) -> list[int]:
    """The seconds granted to each open reservation of the account, longest first, as Redis
    holds them."""
    redis = cast(RedisBalances, svc.balances)._r  # the API runs on the Redis store
    raw = cast(dict[bytes, bytes], await redis.hgetall(keys.reservations(account_id)))
    return sorted((int(v.split(b"|")[1]) for v in raw.values()), reverse=True)


def assert_error(r: httpx.Response, status: int, code: str, field: str | None = None) -> None:
    """``r`` is the contract's error shape: ``{"error": {code, message, field}}`` as JSON, with
    this status, code and field, and no traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert "Traceback" not in r.text
