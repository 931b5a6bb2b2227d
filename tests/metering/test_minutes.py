"""Included minutes on live calls, against real Redis and PostgreSQL: authorizations and
call.progress count the seconds the minute bucket can still give (the plan's allowance before
debit.lua has created its grant) before money, hold them so concurrent calls cannot share the
same seconds, and give them back at the hangup and at the sweep."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from balance import keys
from balance.keys import DAY_S
from balance.values import CallProgress, PlanPeriod, Provisional
from contracts import topics
from enforcement.authorize import Authorizer, AuthorizeRequest
from infra.kafkatools import read_all
from infra.settings import Settings
from metering.worker import Connections
from rating.plans import month_period, parse_bucket
from tests.calendar import CALENDAR_EDGES, at
from tests.calls import UK, Clock, answered, feed, hangup, make, progress
from tests.metering.accounts import account


@pytest.fixture(params=CALENDAR_EDGES)
def now(request: pytest.FixtureRequest) -> int:
    """The time the test runs at (unix s): one calendar edge per run."""
    return at(request.param)


@pytest.fixture
def t0(now: int) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def call(account_id: str, call_id: str) -> AuthorizeRequest:
    return AuthorizeRequest(account_id, call_id, "outbound", "+14155550100", UK)


async def test_a_flat_rate_account_at_zero_balance_calls_on_its_minutes(
    conns: Connections, t0: datetime
) -> None:
    await account(conns, "flat", minutes=100)  # 6,000 s, the period's grant not created yet
    await account(conns, "payg")
    await account(conns, "mixed", minutes=100, balance="0.15")  # + 600 s at 0.015/min
    _, auth = await make(conns, Clock(t0))
    st = await conns.balances.get("flat")
    assert st is not None and st.status == "hold"  # the state machine counts money only
    d = await auth.authorize(call("flat", "c1"))
    # granted: the first grant (300 s), never all the 6,000 s the minutes buy
    assert (d.decision, d.max_duration_s, d.reserved) == ("allow", 300, 0)
    assert await conns.balances.held_seconds("flat") == {"c1": 300}
    d = await auth.authorize(call("payg", "c1"))
    assert (d.decision, d.reason) == ("deny", "insufficient_credit")  # held for money alone
    d = await auth.authorize(call("mixed", "c1"))
    assert (d.decision, d.max_duration_s, d.reserved) == ("allow", 300, 0)
    # the same call_id again: the first answer, its own hold counted as its own
    again = await auth.authorize(call("flat", "c1"))
    assert (again.max_duration_s, again.reserved) == (300, 0)
    assert await conns.balances.held_seconds("flat") == {"c1": 300}


async def test_a_grant_takes_the_buckets_seconds_then_money(
    conns: Connections, now: int, t0: datetime
) -> None:
    await account(conns, "acc", balance="0.015")  # 60 s at 0.015/min
    out = await conns.balances.grant_minutes(
        "acc", "b1", price=0, seconds=100, valid_from=now - 10, expires_at=now + 86_400, now_s=now
    )
    assert out.result == "applied"
    _, auth = await make(conns, Clock(t0))
    d = await auth.authorize(call("acc", "c1"))
    # 100 s of bucket + 60 s of money = 160 s: 156 s in whole 6 s increments; 56 s of it paid
    assert (d.decision, d.max_duration_s, d.reserved) == ("allow", 156, 14_000)
    assert await conns.balances.held_seconds("acc") == {"c1": 100}
    st = await conns.balances.get("acc")
    assert st is not None and st.reserved == 14_000
    # nothing left for a second call: the bucket is held, the money reserved
    d = await auth.authorize(call("acc", "c2"))
    assert (d.decision, d.reason) == ("deny", "insufficient_credit")


async def test_concurrent_authorizations_never_hold_more_seconds_than_the_bucket(
    conns: Connections, now: int, t0: datetime
) -> None:
    await account(conns, "flat", minutes=5)  # 300 s allowance, not yet a grant in Redis
    out = await conns.balances.grant_minutes(
        "flat", "b1", price=0, seconds=300, valid_from=now - 10, expires_at=now + 86_400, now_s=now
    )
    assert out.result == "applied"  # 600 s in all, $0
    _, auth = await make(conns, Clock(t0))
    auth = Authorizer(
        conns.balances, auth._catalog, grant_s=240, grace_s=60, clock=Clock(t0), deadline_s=30
    )
    decisions = await asyncio.gather(*(auth.authorize(call("flat", f"c{i}")) for i in range(50)))
    allowed = [d for d in decisions if d.decision == "allow"]
    held = await conns.balances.held_seconds("flat")
    assert sorted(held.values()) == [120, 240, 240]  # 600 s exactly, in first-grant pieces
    # each answer grants what it holds: together exactly the 600 s the bucket has
    assert sorted(d.max_duration_s for d in allowed) == [120, 240, 240]
    assert len(allowed) == 3 and sum(d.reserved for d in allowed) == 0
    # not on hold: $0 with minutes left is "low"; what is left is held by the three calls
    assert {d.reason for d in decisions if d.decision == "deny"} == {"insufficient_credit"}
    st = await conns.balances.get("flat")
    assert st is not None and st.reserved == 0 and st.balance == 0 and st.status == "low"


async def test_progress_extends_on_minutes_and_the_hangup_frees_them(
    settings: Settings, conns: Connections, now: int, t0: datetime
) -> None:
    """At a month's end the call is answered in one month and extended and ended in the next:
    it draws on the month it was answered in throughout."""
    p_start, p_end = month_period(now)
    await account(conns, "flat", minutes=10)  # 600 s, $0
    clock = Clock(t0)
    p, auth = await make(conns, clock)
    d = await auth.authorize(call("flat", "c1"))
    assert (d.decision, d.max_duration_s) == ("allow", 300)
    await feed(p, answered("flat", "c1", t0))
    clock.now = t0.timestamp() + 240
    await feed(p, progress("flat", "c1", t0, 240))  # covered to 540 s, all of it minutes
    assert await conns.balances.held_seconds("flat") == {"c1": 540}
    # a second call gets what is left: 60 s
    d2 = await auth.authorize(call("flat", "c2"))
    assert (d2.decision, d2.max_duration_s, d2.reserved) == ("allow", 60, 0)
    assert (await conns.balances.release("flat", "c2", now_s=now + 240)) == 0
    clock.now = t0.timestamp() + 500
    await feed(p, progress("flat", "c1", t0, 500))  # 800 s wanted, 600 s there: ends at 600
    assert await conns.balances.held_seconds("flat") == {"c1": 600}
    signals = [
        orjson.loads(m.value)
        for m in await read_all(settings.kafka_bootstrap, topics.CONTROL_SIGNALS, expect=1)
    ]
    assert [(s["type"], datetime.fromisoformat(s["data"]["terminate_at"])) for s in signals] == [
        ("call.terminate", t0 + timedelta(seconds=600))
    ]
    clock.now = t0.timestamp() + 600
    out = await feed(p, hangup("flat", "c1", t0, 600))
    assert out.charged == 1
    # the draw and the release in one script: the hold is gone, the bucket is spent
    assert await conns.balances.held_seconds("flat") == {"c1": 0}  # the closed marker
    grants = parse_bucket(await conns.balances.bucket("flat"))
    st = await conns.balances.get("flat")
    assert st is not None and st.balance == 0 and st.reserved == 0
    d3 = await auth.authorize(call("flat", "c3"))
    if month_period(now + 600) == (p_start, p_end):
        assert [(g.id, g.remaining_s) for g in grants] == [(f"p{p_start}", 0)]
        assert (d3.decision, d3.reason) == ("deny", "insufficient_credit")
    else:
        # answered in the month's last seconds, ended in the next: all 600 s came from the
        # month it was answered in; the hangup's own month starts with its allowance whole
        assert [(g.id, g.remaining_s) for g in grants] == [(f"p{p_start}", 0), (f"p{p_end}", 600)]
        assert (d3.decision, d3.max_duration_s, d3.reserved) == ("allow", 300, 0)


async def test_the_sweep_keeps_the_seconds_of_a_lost_call_held_for_its_late_hangup(
    conns: Connections, now: int, t0: datetime
) -> None:
    await account(conns, "flat", minutes=10)
    _, auth = await make(conns, Clock(t0))
    d = await auth.authorize(call("flat", "lost"))
    assert (d.decision, d.max_duration_s) == ("allow", 300)
    assert (await auth.authorize(call("flat", "c2"))).max_duration_s == 300
    await conns.balances.release("flat", "c2", now_s=now)
    assert await conns.balances.sweep_expired(now_s=now + 100) == []
    swept = await conns.balances.sweep_expired(now_s=now + 300 + 60)
    assert swept == [Provisional("flat", "lost", 0, 300, now + 360, True)]
    # charged provisionally: its seconds stay held for a late hangup (which draws them)
    assert await conns.balances.held_seconds("flat") == {"lost": 300}
    # a day later no hangup came: the marker goes, its seconds are free again
    assert await conns.balances.sweep_expired(now_s=now + 360 + DAY_S) == []
    assert await conns.balances.held_seconds("flat") == {}
    assert (await auth.authorize(call("flat", "c3"))).max_duration_s == 300


async def test_a_reservation_written_before_held_seconds_existed_still_works(
    conns: Connections, now: int
) -> None:
    p_start, p_end = month_period(now)
    await account(conns, "flat", minutes=10)
    # the nine-field value of an older reserve.lua: 300 s covered by 75,000 micro-units
    await conns.redis.hset(
        keys.reservations("flat"), "old", f"75000|300|{now + 360}|15000|0|6|6|{now}|0"
    )
    await conns.redis.hset(keys.account("flat"), "res", 75_000)
    r = await conns.balances.progress(
        [CallProgress("flat", "old", now, 240)],
        now_s=now + 240,
        grant_s=300,
        grace_s=60,
        max_s=14_400,
        plans={"flat": PlanPeriod(600, p_start, p_end)},
    )
    # re-covered from the bucket: 540 s of minutes, the money given back
    assert (r[0].outcome, r[0].until) == ("extended", 540)
    assert await conns.balances.held_seconds("flat") == {"old": 540}
    st = await conns.balances.get("flat")
    assert st is not None and st.reserved == 0


async def test_a_flat_rate_account_at_zero_is_low_not_held_until_its_minutes_run_out(
    conns: Connections, now: int
) -> None:
    from balance.values import Debit
    from balance.values import Draw as CallDraw  # rating.plans.Draw is a replayed draw

    await account(conns, "flat", balance="0.50")
    await conns.balances.grant_minutes(
        "flat", "b1", price=0, seconds=120, valid_from=now - 10, expires_at=now + 86_400, now_s=now
    )

    def debit(i: int, amount: int, draw: CallDraw | None = None) -> Debit:
        return Debit(i.to_bytes(16, "big"), b"\x00" * 8, amount, now // 86_400, draw=draw)

    # an SMS takes the money to 0: minutes are left, so low (no hold for telephony)
    (o,) = await conns.balances.apply_debits({"flat": [debit(1, 500_000)]}, now)
    assert (o.balance, o.status) == (0, "low")
    assert [s.type for s in o.outbox] == ["account.low_balance"]
    # a 120 s call drawn from the bucket spends the minutes: now the account is held
    (o,) = await conns.balances.apply_debits(
        {"flat": [debit(2, 30_000, draw=CallDraw(120, 15000, 0, now - 5))]}, now
    )
    assert (o.balance, o.status) == (0, "hold")
    assert [s.type for s in o.outbox][-1] == "account.hold"
    # a bundle bought from nothing is refused; a free one brings it back to low with a resume
    out = await conns.balances.grant_minutes(
        "flat", "b2", price=0, seconds=60, valid_from=now - 10, expires_at=now + 86_400, now_s=now
    )
    assert (out.result, out.status) == ("applied", "low")
