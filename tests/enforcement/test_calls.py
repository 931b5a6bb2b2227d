"""Call credit control: reservations under concurrency, live-call extension and termination,
hangups that close what was reserved, the sweep, and a balance store that does not answer."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis.asyncio as aioredis

from balance.coalesce import CoalescingBalances
from balance.store import RedisBalances
from balance.values import Provisional
from balance.values import StatusChange as Changed
from contracts import topics
from enforcement.authorize import Authorizer, AuthorizeRequest, BalanceStoreUnavailable
from infra.kafkatools import read_all
from infra.settings import Settings
from metering.worker import Connections
from rating.catalog import Catalog
from rating.rating import VoiceRate, voice_cost
from tests.calls import UK, Clock, answered, feed, hangup, make, progress
from tests.conftest import Seeder

UK_RATE = VoiceRate("44", 15_000)
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


async def test_concurrent_authorizations_never_reserve_more_than_the_credit(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="1.00")
    _, auth = await make(conns, Clock(T0))
    # Over CoalescingBalances, as the API runs it: a plain RedisBalances would open a
    # connection per concurrent call, past redis-py's pool of 100.
    auth = Authorizer(
        CoalescingBalances(conns.redis, timeout_s=30),
        auth._catalog,
        grant_s=300,
        grace_s=60,
        clock=Clock(T0),
        deadline_s=30,
    )  # a stress test, not a latency test
    decisions = await asyncio.gather(
        *(
            auth.authorize(AuthorizeRequest("acc_1", f"c{i}", "outbound", "+14155550100", UK))
            for i in range(1000)
        )
    )
    allowed = [d for d in decisions if d.decision == "allow"]
    held = await conns.balances.reservations("acc_1")
    st = await conns.balances.get("acc_1")
    assert st is not None
    assert sum(held.values()) == st.reserved <= 1_000_000
    assert len(held) == len(allowed)
    # $1.00 buys 4,000 s at 0.015/min: 13 grants of 300 s, then one of what is left (96 s).
    granted = sorted(d.max_duration_s for d in allowed)
    assert len(allowed) == 14 and granted[0] == 96
    # what the answers grant is what they reserve: 4,000 s less the last partial increment
    assert sum(granted) == 13 * 300 + 96
    left = st.available
    assert 0 <= left < voice_cost(6, UK_RATE)[0]  # not enough for another first increment
    assert {d.reason for d in decisions if d.decision == "deny"} == {"insufficient_credit"}


async def test_a_call_whose_credit_runs_out_gets_one_terminate_at_the_right_time(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="0.10")  # 400 s at 0.015/min: 396 s in whole 6 s increments
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    d = await auth.authorize(AuthorizeRequest("acc_1", "call-1", "outbound", "+1415", UK))
    assert d.decision == "allow" and d.max_duration_s == 300  # the first grant of 396 s
    await feed(p, answered("acc_1", "call-1", T0))
    for elapsed in (60, 120, 180, 240, 120):  # the last one is a redelivery
        clock.now = T0.timestamp() + elapsed
        await feed(p, progress("acc_1", "call-1", T0, elapsed))
    clock.now = T0.timestamp() + 396
    out = await feed(p, hangup("acc_1", "call-1", T0, 396))  # the switch ended it on time
    assert out.charged == 1
    signals = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, idle_s=1.0)
    ]
    terminates = [s for s in signals if s["type"] == "call.terminate"]
    assert len(terminates) == 1
    t = terminates[0]["data"]
    assert t["call_id"] == "call-1" and t["reason"] == "credit_exhausted"
    assert datetime.fromisoformat(t["terminate_at"]) == T0 + timedelta(seconds=396)
    assert [s["type"] for s in signals] == ["call.terminate"]
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 1_000 and st.reserved == 0  # 0.099 charged


async def test_hangups_twice_or_without_answer_are_charged_once_and_release(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    cost = voice_cost(61, UK_RATE)[0]
    # authorized, answered, hung up twice
    await auth.authorize(AuthorizeRequest("acc_1", "a", "outbound", "+1415", UK))
    await feed(p, answered("acc_1", "a", T0))
    out = await feed(p, hangup("acc_1", "a", T0, 61), hangup("acc_1", "a", T0, 61))
    assert (out.charged, out.duplicates) == (1, 1)
    # neither authorized nor answered
    out = await feed(p, hangup("acc_1", "b", T0, 61))
    assert out.charged == 1
    # an inbound call never authorized: answered opens a reservation, hangup closes it
    await feed(p, answered("acc_1", "c", T0, direction="inbound"))
    assert "c" in await conns.balances.reservations("acc_1")
    await feed(p, hangup("acc_1", "c", T0, 61, direction="inbound"))
    st = await conns.balances.get("acc_1")
    assert st is not None and st.reserved == 0
    assert st.balance == 10_000_000 - 2 * cost - voice_cost(61, VoiceRate("", 3_500))[0]
    # a late answered for a call already hung up does not open it again
    await feed(p, answered("acc_1", "a", T0 + timedelta(seconds=1)))
    assert (await conns.balances.get("acc_1")).reserved == 0  # type: ignore[union-attr]


async def test_unclosed_reservations_expire_and_a_late_hangup_is_still_charged_once(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    d = await auth.authorize(AuthorizeRequest("acc_1", "lost", "outbound", "+1415", UK))
    assert d.reserved > 0
    assert await conns.balances.sweep_expired(now_s=int(T0.timestamp()) + 100) == []
    at = int(T0.timestamp()) + 300 + 60
    swept = await conns.balances.sweep_expired(now_s=at)
    assert swept == [Provisional("acc_1", "lost", d.reserved, 0, at, True)]
    st = await conns.balances.get("acc_1")
    # charged what it held, provisionally
    assert st is not None and st.reserved == 0 and st.balance == 10_000_000 - d.reserved
    clock.now += 3600
    out = await feed(p, hangup("acc_1", "lost", T0, 61), hangup("acc_1", "lost", T0, 61))
    assert (out.charged, out.duplicates) == (1, 1)
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 10_000_000 - voice_cost(61, UK_RATE)[0]


async def test_extended_reservations_are_not_swept_early(conns: Connections, seed: Seeder) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    await auth.authorize(AuthorizeRequest("acc_1", "long", "outbound", "+1415", UK))
    await feed(p, answered("acc_1", "long", T0))
    clock.now = T0.timestamp() + 290
    await feed(p, progress("acc_1", "long", T0, 290))  # now covered to 590 s
    assert await conns.balances.sweep_expired(now_s=int(T0.timestamp()) + 400) == []
    assert "long" in await conns.balances.reservations("acc_1")


async def test_authorize_answers_in_bounded_time_when_redis_is_unreachable(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    # A port nothing listens on, with the short timeouts the API process uses.
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_timeout=0.1, socket_connect_timeout=0.1)
    auth = Authorizer(RedisBalances(dead), catalog, deadline_s=0.3)
    start = time.monotonic()
    with pytest.raises(BalanceStoreUnavailable):
        await auth.authorize(AuthorizeRequest("acc_1", "x", "outbound", "+1415", UK))
    assert time.monotonic() - start < 1.0
    await dead.aclose()


async def test_operator_suspend_and_resume_are_relayed_in_order(
    settings: Settings, conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    b = conns.balances
    assert await b.set_status("acc_1", "suspend", "operator") == Changed(True, "suspended")
    assert await b.set_status("acc_1", "suspend", "operator") == Changed(False, "suspended")
    d = await auth.authorize(AuthorizeRequest("acc_1", "c1", "inbound", "+1415", UK))
    assert (d.decision, d.reason) == ("deny", "account_suspended")
    assert await b.set_status("acc_1", "resume", "operator") == Changed(True, "active")
    assert await p.relay_outboxes() == 2
    assert await p.relay_outboxes() == 0  # published once, then the marks are gone
    signals = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, expect=2)
    ]
    assert [(s["type"], s["data"]["seq"], s["data"]["reason"]) for s in signals] == [
        ("account.suspend", 1, "operator"),
        ("account.resume", 2, "operator"),
    ]
    rows = await conns.pool.fetch("SELECT seq, type FROM signals ORDER BY seq")
    assert [(r["seq"], r["type"]) for r in rows] == [(1, "account.suspend"), (2, "account.resume")]
