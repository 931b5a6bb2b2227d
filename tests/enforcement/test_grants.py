"""What an authorization grants is what it reserves: switches that trust the answer alone, set
a timer from ``max_duration_s`` and hang up exactly then, can never together talk past the
account's credit, at any concurrency; a retry of the same ``call_id`` gets the first answer,
byte for byte."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import cast

from balance import keys
from balance.coalesce import CoalescingBalances
from enforcement.authorize import Authorizer, AuthorizeRequest, Decision
from metering.processor import MeteringProcessor
from metering.worker import Connections
from rating.rating import VoiceRate, voice_cost
from tests.api import Api
from tests.calls import UK, Clock, answered, feed, hangup, make, progress
from tests.conftest import Seeder

UK_RATE = VoiceRate("44", 15_000)  # 0.015/min, 6/6
INCREMENT = voice_cost(6, UK_RATE)[0]  # 6 s at 0.015/min: the slack every bound allows
#: a moment of the tests' own clock (the scripts take ``now`` as an argument)
T0 = datetime(2027, 1, 31, 23, 50, tzinfo=UTC)


async def _authorizations(
    conns: Connections, clock: Clock, calls: int, tries: int
) -> dict[str, list[Decision]]:
    """``calls`` x ``tries`` authorizations at once, every call_id asked ``tries`` times, over
    the coalescing store as the API runs it; the answers by call_id."""
    _, plain = await make(conns, clock)
    auth = Authorizer(
        CoalescingBalances(conns.redis, timeout_s=30),
        plain._catalog,
        grant_s=300,
        grace_s=60,
        clock=clock,
        deadline_s=30,  # a stress test, not a latency test
    )
    ids = [f"c{i % calls}" for i in range(calls * tries)]
    answers = await asyncio.gather(
        *(auth.authorize(AuthorizeRequest("acc_1", c, "outbound", "+14155550100", UK)) for c in ids)
    )
    out: dict[str, list[Decision]] = {}
    for c, d in zip(ids, answers, strict=True):
        out.setdefault(c, []).append(d)
    return out


async def _covered(conns: Connections, call_id: str) -> int:
    """The seconds after its answer that the call's reservation covers now (its grant)."""
    raw = await conns.redis.hget(keys.reservations("acc_1"), call_id)
    assert raw is not None, call_id
    return int(cast(bytes, raw).split(b"|")[1])


async def _billed(conns: Connections) -> int:
    spent = await conns.pool.fetchval(
        "SELECT -coalesce(sum(amount), 0) FROM ledger WHERE account_id = 'acc_1' AND kind = 'call'"
    )
    return int(spent)


async def test_switches_that_trust_only_max_duration_never_talk_past_the_credit(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="1.00")  # 4,000 s at 0.015/min
    clock = Clock(T0)
    by_call = await _authorizations(conns, clock, calls=50, tries=20)
    first = {c: ds[0] for c, ds in by_call.items()}
    for c, ds in by_call.items():
        assert all(d == ds[0] for d in ds), c  # a retry is the first answer, whoever was first
    allowed = {c: d for c, d in first.items() if d.decision == "allow"}
    assert sum(d.max_duration_s for d in allowed.values()) <= 4_000
    assert all(0 < d.max_duration_s <= 300 for d in allowed.values())
    # every switch answers its call and hangs up exactly when its timer says
    p, _ = await make(conns, clock)
    await feed(p, *(answered("acc_1", c, T0) for c in allowed))
    clock.now = (T0 + timedelta(seconds=400)).timestamp()
    await feed(p, *(hangup("acc_1", c, T0, d.max_duration_s) for c, d in allowed.items()))
    billed = await _billed(conns)
    assert billed <= 1_000_000 + INCREMENT
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 1_000_000 - billed and st.reserved == 0
    assert st.balance > -INCREMENT


async def _talk(
    p: MeteringProcessor, conns: Connections, clock: Clock, calls: dict[str, int], every: int
) -> dict[str, int]:
    """Switches that send ``call.progress`` every ``every`` seconds while they want to talk
    (``calls``: call_id -> seconds wanted) and stop where their reservation stops growing: the
    seconds each talks."""
    talked: dict[str, int] = {}
    live = dict(calls)
    elapsed = 0
    while live:
        elapsed += every
        clock.now = (T0 + timedelta(seconds=elapsed)).timestamp()
        for c in list(live):
            covered = await _covered(conns, c)
            if elapsed >= live[c] or covered < elapsed:
                talked[c] = min(live.pop(c), covered)
        if live:
            await feed(p, *(progress("acc_1", c, T0, elapsed) for c in live))
    return talked


async def test_calls_extended_by_progress_never_talk_past_the_credit_together(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")  # 40,000 s at 0.015/min
    clock = Clock(T0)
    by_call = await _authorizations(conns, clock, calls=50, tries=20)
    allowed = {c: ds[0] for c, ds in by_call.items() if ds[0].decision == "allow"}
    assert len(allowed) == 50 and {d.max_duration_s for d in allowed.values()} == {300}
    p, _ = await make(conns, clock)
    await feed(p, *(answered("acc_1", c, T0) for c in allowed))
    # One call in three wants 40 minutes and sends progress; the others trust their timer.
    long = {c: 2_400 for i, c in enumerate(sorted(allowed)) if i % 3 == 0}
    short = {c: d.max_duration_s for c, d in allowed.items() if c not in long}
    talked = await _talk(p, conns, clock, long, every=240)
    talked.update(short)
    assert max(talked[c] for c in long) > 300  # extension worked while the credit lasted
    assert min(talked[c] for c in long) < 2_400  # and stopped where it ran out
    clock.now = (T0 + timedelta(seconds=3_000)).timestamp()
    await feed(p, *(hangup("acc_1", c, T0, s) for c, s in talked.items()))
    billed = await _billed(conns)
    assert billed <= 10_000_000 + INCREMENT
    st = await conns.balances.get("acc_1")
    assert st is not None and st.balance == 10_000_000 - billed and st.reserved == 0


async def test_a_retried_authorization_answers_byte_for_byte_the_first_answer(api: Api) -> None:
    await api.seed("acc_1", balance="1.00")
    service = await api.key("acc_1", "service")
    calls = [f"c{i % 10}" for i in range(200)]
    rs = await asyncio.gather(*(api.authorize(service, call_id=c) for c in calls))
    bodies: dict[str, set[bytes]] = {}
    for c, r in zip(calls, rs, strict=True):
        assert r.status_code == 200, r.text
        bodies.setdefault(c, set()).add(r.content)
    assert all(len(b) == 1 for b in bodies.values()), bodies
    # later, with the credit spent by other calls, still the first answer
    for i in range(20):
        await api.authorize(service, call_id=f"other{i}")
    again = await api.authorize(service, call_id="c0")
    assert {again.content} == bodies["c0"]
