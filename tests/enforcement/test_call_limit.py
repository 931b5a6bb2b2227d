"""The concurrent-call limit of an account's plan, enforced at authorize in the script that
reserves the call's credit, against the real Redis and PostgreSQL: a thousand authorizations at
once allow exactly the plan's calls, a hangup through the metering path frees exactly one slot,
a retry keeps its first answer, inbound calls count, the sweep and a terminated call's hangup
free their slot, a rebuilt Redis keeps the limit, and no plan (or a limit of 0) is no limit."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from balance import keys
from balance.accounts import AccountSpec, PlanSpec, create_accounts, put_plan
from balance.store import RedisBalances
from enforcement.authorize import DENY_REASONS
from infra import metrics
from infra.ledger import PostgresLedger
from metering.calls import sweep_reservations
from metering.worker import Connections
from tests.api import Api
from tests.calls import Clock, answered, feed, hangup, make, progress

LIMITED = "concurrent_call_limit"


async def subscriber(
    api: Api, account_id: str, *, max_calls: int | None, balance: str = "100.00"
) -> dict[str, str]:
    """An account on a plan allowing ``max_calls`` concurrent calls (None: on no plan), made as
    an operator makes it; returns its call-control key's headers."""
    plan = None
    if max_calls is not None:
        plan = f"calls{max_calls}"
        await put_plan(api.svc.pool, PlanSpec(id=plan, max_concurrent_calls=max_calls))
    spec = {"id": account_id, "price_list_id": "standard", "plan_id": plan, "balance": balance}
    await create_accounts(api.svc.pool, api.svc.balances, [AccountSpec.model_validate(spec)])
    return await api.key(account_id, "service")


def redis_of(api: Api) -> RedisBalances:
    return cast(RedisBalances, api.svc.balances)  # the API runs on the Redis store


async def live_ids(api: Api, account_id: str) -> set[str]:
    """The calls whose reservation is live: not closed by a marker (terminate_at -1, the
    ninth field), counted one by one."""
    raw = cast(dict[bytes, bytes], await redis_of(api)._r.hgetall(keys.reservations(account_id)))
    return {k.decode() for k, v in raw.items() if v.split(b"|")[8] != b"-1"}


async def live_calls(api: Api, account_id: str) -> tuple[int | None, int]:
    """(the count of live calls the scripts keep, the live reservations counted one by one)."""
    kept = await redis_of(api)._r.hget(keys.account(account_id), "lc")
    return (int(kept) if kept is not None else None), len(await live_ids(api, account_id))


async def decide(
    api: Api, headers: dict[str, str], account_id: str, call_id: str, **kw: str
) -> str:
    """Authorize one call: its decision's reason (``ok`` when allowed)."""
    r = await api.authorize(headers, account_id=account_id, call_id=call_id, **kw)
    assert r.status_code == 200, r.text
    return str(r.json()["reason"])


async def burst(api: Api, headers: dict[str, str], account_id: str, prefix: str) -> list[str]:
    """1,000 authorizations at once; returns the call ids allowed, after checking that every
    other one was denied for the limit alone."""
    answers = await asyncio.gather(
        *(
            api.authorize(headers, account_id=account_id, call_id=f"{prefix}{i}")
            for i in range(1000)
        )
    )
    assert {r.status_code for r in answers} == {200}
    bodies = [r.json() for r in answers]
    denied = {b["reason"] for b in bodies if b["decision"] == "deny"}
    assert denied == {LIMITED}
    assert all(b["max_duration_s"] == 0 for b in bodies if b["decision"] == "deny")
    return [f"{prefix}{i}" for i, b in enumerate(bodies) if b["decision"] == "allow"]


def now_dt() -> datetime:
    # The API reserves on the system clock; the metering path's clock starts there too.
    return datetime.now(UTC).replace(microsecond=0)


async def test_a_thousand_concurrent_authorizations_allow_exactly_the_plans_five_calls(
    api: Api, conns: Connections
) -> None:
    service = await subscriber(api, "five", max_calls=5)  # $100: credit for 1,333 grants
    allowed = await burst(api, service, "five", "a")
    assert len(allowed) == 5
    # the denied reserved nothing: only the five hold credit
    held = await redis_of(api).reservations("five")
    assert sorted(held) == sorted(allowed)
    state = await api.svc.balances.get("five")
    assert state is not None and state.reserved == sum(held.values()) == 5 * 75_000
    assert await live_calls(api, "five") == (5, 5)

    # one of them hangs up, through the metering hot path (rated, debited, in the ledger)
    t = now_dt()
    p, _ = await make(conns, Clock(t))
    ended = hangup("five", allowed[0], t - timedelta(seconds=61), 61)
    assert (await feed(p, ended)).charged == 1
    assert (await feed(p, ended)).duplicates == 1  # a redelivery frees nothing more
    assert await live_calls(api, "five") == (4, 4)

    again = await burst(api, service, "five", "b")
    assert len(again) == 1
    assert await live_ids(api, "five") == {*allowed[1:], *again}
    assert await live_calls(api, "five") == (5, 5)


async def test_a_retried_authorization_of_an_allowed_call_gets_its_first_answer_at_the_limit(
    api: Api,
) -> None:
    service = await subscriber(api, "two", max_calls=2)
    first = [(await api.authorize(service, account_id="two", call_id=c)).json() for c in "xy"]
    assert [b["decision"] for b in first] == ["allow", "allow"]
    assert await decide(api, service, "two", "z") == LIMITED
    # at the limit, the same call_ids again: no new calls, their first answers byte for byte
    for c, body in zip("xy", first, strict=True):
        r = await api.authorize(service, account_id="two", call_id=c)
        assert r.json() == body
    assert await decide(api, service, "two", "z") == LIMITED
    assert await live_calls(api, "two") == (2, 2)


async def test_inbound_calls_count_too(api: Api, conns: Connections) -> None:
    service = await subscriber(api, "two", max_calls=2)
    t = now_dt()
    p, _ = await make(conns, Clock(t))
    assert await decide(api, service, "two", "out1") == "ok"
    # an inbound call answered without an authorization: the switch's call.answered opens it
    await feed(p, answered("two", "in1", t - timedelta(seconds=30), direction="inbound"))
    assert await live_calls(api, "two") == (2, 2)
    assert await decide(api, service, "two", "out2") == LIMITED
    assert await decide(api, service, "two", "in2", direction="inbound") == LIMITED
    # the inbound call hangs up: its slot is free, for an inbound call as for any
    await feed(p, hangup("two", "in1", t - timedelta(seconds=30), 30, direction="inbound"))
    assert await decide(api, service, "two", "in2", direction="inbound") == "ok"
    assert await decide(api, service, "two", "out2") == LIMITED
    # a call already up when the switch first tells of it is counted, never cut by the limit
    await feed(p, answered("two", "in3", t - timedelta(seconds=5), direction="inbound"))
    assert "in3" in await redis_of(api).reservations("two")
    assert await live_calls(api, "two") == (3, 3)


async def test_the_sweep_frees_the_slot_of_a_call_whose_hangup_never_came(
    api: Api, conns: Connections
) -> None:
    service = await subscriber(api, "one", max_calls=1)
    assert await decide(api, service, "one", "lost") == "ok"
    assert await decide(api, service, "one", "next") == LIMITED
    expiry = int(now_dt().timestamp()) + api.settings.authorize_grant_s
    expiry += api.settings.authorize_grace_s + 2
    ledger = PostgresLedger(api.svc.pool)
    assert await sweep_reservations(api.svc.balances, ledger, expiry) == 1  # charged, provisionally
    assert await live_calls(api, "one") == (0, 0)
    assert await decide(api, service, "one", "next") == "ok"
    # the lost call's hangup comes at last: it settles the charge and frees nothing more
    t = now_dt()
    p, _ = await make(conns, Clock(t))
    assert (await feed(p, hangup("one", "lost", t - timedelta(seconds=61), 61))).charged == 1
    assert await live_calls(api, "one") == (1, 1)
    assert await decide(api, service, "one", "third") == LIMITED


async def test_a_terminated_call_holds_its_slot_until_it_hangs_up(
    api: Api, conns: Connections
) -> None:
    # $0.10 buys 396 s at 0.015/min: the first grant, then a call.terminate at 396 s
    service = await subscriber(api, "one", max_calls=1, balance="0.10")
    assert await decide(api, service, "one", "c1") == "ok"
    start = now_dt() - timedelta(seconds=600)
    clock = Clock(start)
    p, _ = await make(conns, clock)
    await feed(p, answered("one", "c1", start))
    clock.now = start.timestamp() + 240
    await feed(p, progress("one", "c1", start, 240))
    raw = cast(bytes, await redis_of(api)._r.hget(keys.reservations("one"), "c1"))
    assert int(raw.split(b"|")[8]) == int(start.timestamp()) + 396  # terminate_at
    # told to end, not ended: the call is still up and holds its slot
    assert await decide(api, service, "one", "in1", direction="inbound") == LIMITED
    clock.now = start.timestamp() + 396
    assert (await feed(p, hangup("one", "c1", start, 396))).charged == 1
    assert await live_calls(api, "one") == (0, 0)
    # no credit left: an inbound call still rings, and the slot is there for it
    assert await decide(api, service, "one", "in1", direction="inbound") == "ok"


async def test_a_call_that_never_connected_frees_its_slot_with_its_hangup_of_0_s(
    api: Api, conns: Connections
) -> None:
    service = await subscriber(api, "one", max_calls=1)
    assert await decide(api, service, "one", "busy") == "ok"  # the callee was busy
    assert await decide(api, service, "one", "next") == LIMITED
    t = now_dt()
    p, _ = await make(conns, Clock(t))
    assert (await feed(p, hangup("one", "busy", t, 0))).charged == 1
    assert await live_calls(api, "one") == (0, 0)
    assert await decide(api, service, "one", "next") == "ok"


async def test_a_rebuilt_redis_keeps_the_limit(api: Api) -> None:
    service = await subscriber(api, "two", max_calls=2)
    assert [await decide(api, service, "two", c) for c in "abc"] == ["ok", "ok", LIMITED]
    await redis_of(api)._r.flushall()  # a Redis that lost everything (the test's own)
    # the first authorization rebuilds the account from the book of record, plan limit included
    # (the calls Redis lost went with it: they are no longer counted)
    assert [await decide(api, service, "two", c) for c in "xyz"] == ["ok", "ok", LIMITED]
    assert await redis_of(api)._r.hget(keys.account("two"), "mc") == b"2"
    assert await live_calls(api, "two") == (2, 2)


async def test_no_plan_or_a_limit_of_zero_is_no_limit(api: Api) -> None:
    for account_id, limit in (("planless", None), ("unlimited", 0)):
        service = await subscriber(api, account_id, max_calls=limit)
        answers = await asyncio.gather(
            *(api.authorize(service, account_id=account_id, call_id=f"c{i}") for i in range(50))
        )
        assert [r.json()["decision"] for r in answers] == ["allow"] * 50
        assert await redis_of(api)._r.hget(keys.account(account_id), "mc") is None
        assert await live_calls(api, account_id) == (50, 50)


async def test_a_change_of_limit_bars_new_calls_only(api: Api) -> None:
    service = await subscriber(api, "acc", max_calls=None)
    store = redis_of(api)
    assert await store.set_call_limit("ghost", 3) is None
    with pytest.raises(ValueError):
        await store.set_call_limit("acc", -1)
    assert await store.set_call_limit("acc", 3) == 0
    assert [await decide(api, service, "acc", c) for c in "abcd"] == ["ok"] * 3 + [LIMITED]
    # lowered below the calls up: none is cut, new ones wait until enough have ended
    assert await store.set_call_limit("acc", 1) == 3
    assert len(await store.reservations("acc")) == 3
    assert await decide(api, service, "acc", "d") == LIMITED
    assert await store.set_call_limit("acc", 5) == 3
    assert [await decide(api, service, "acc", c) for c in "def"] == ["ok", "ok", LIMITED]
    assert await store.set_call_limit("acc", 0) == 5  # no limit
    assert await decide(api, service, "acc", "f") == "ok"
    assert await live_calls(api, "acc") == (6, 6)


async def test_the_count_is_taken_from_the_calls_where_it_is_missing_or_wrong(api: Api) -> None:
    service = await subscriber(api, "acc", max_calls=2)
    r = redis_of(api)._r
    assert [await decide(api, service, "acc", c) for c in "ab"] == ["ok", "ok"]
    # an account whose calls were reserved before the count existed: counted at its next call
    await r.hdel(keys.account("acc"), "lc")
    assert await decide(api, service, "acc", "c") == LIMITED
    assert await live_calls(api, "acc") == (2, 2)
    # a count gone wrong is set right from the calls by the next change of limit
    await r.hset(keys.account("acc"), "lc", 99)
    assert await redis_of(api).set_call_limit("acc", 3) == 2
    assert await decide(api, service, "acc", "c") == "ok"
    assert await live_calls(api, "acc") == (3, 3)


async def test_the_reason_is_in_every_list_of_deny_reasons(api: Api) -> None:
    assert LIMITED in DENY_REASONS
    assert set(metrics.AUTHORIZE_DENY_REASONS) == set(DENY_REASONS)
    doc = (await api.client.get("/openapi.json")).json()
    answer = doc["components"]["schemas"]["AuthorizationOut"]["properties"]["reason"]
    assert set(answer["enum"]) == {"ok", *DENY_REASONS}
    guide = (Path(__file__).parents[2] / "docs" / "integration.md").read_text()
    table = guide.split("### Deny reasons", 1)[1].split("\n\n", 2)[1]
    assert set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)) == set(DENY_REASONS)
