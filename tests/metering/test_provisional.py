"""A stuck call is not free (issue 19): the sweep charges what an expired reservation held,
provisionally, with a ledger row; a late hangup settles it to the rated call, exactly once;
replays of either change nothing, and the ledger matches Redis (drift 0) at every step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from balance.keys import PROVISIONAL_KEEP_S
from balance.values import Provisional
from enforcement.authorize import AuthorizeRequest
from infra import metrics
from infra.ledger import Unsettled
from metering.worker import Connections
from ops.reconcile import reconcile, settle_double_charged
from rating.catalog import Catalog
from rating.rating import VoiceRate, voice_cost
from tests import harness
from tests.calls import UK, Clock, answered, feed, hangup, make
from tests.conftest import Seeder

UK_RATE = VoiceRate("44", 15_000)
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
START = 10_000_000
GRANT = voice_cost(300, UK_RATE)[0]  # what a first grant of 300 s reserves


async def rows(conns: Connections, call_id: str) -> list[tuple[str, int, str]]:
    """The call's ledger rows: (kind, amount, event_id), in a stable order."""
    got = await conns.pool.fetch(
        "SELECT kind, amount, event_id FROM ledger WHERE account_id = 'acc_1' AND ref = $1"
        " ORDER BY kind, event_id",
        call_id,
    )
    return [(r["kind"], r["amount"], r["event_id"]) for r in got]


async def balance(conns: Connections) -> int:
    st = await conns.balances.get("acc_1")
    assert st is not None
    return st.balance


async def drift_zero(conns: Connections) -> None:
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0, rec


def swept(outcome: str) -> float:
    return metrics.RESERVATIONS_SWEPT.labels(outcome)._value.get()


@pytest.mark.parametrize("seconds", [240, 300, 420], ids=["shorter", "equal", "longer"])
async def test_a_stuck_call_is_charged_provisionally_and_a_late_hangup_settles_it(
    conns: Connections, seed: Seeder, seconds: int
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    d = await auth.authorize(AuthorizeRequest("acc_1", "lost", "outbound", "+1415", UK))
    assert (d.decision, d.reserved) == ("allow", GRANT)
    await feed(p, answered("acc_1", "lost", T0))
    await drift_zero(conns)

    # The hangup never comes: past the grant and its grace the sweep charges what it held.
    before = swept("provisional")
    clock.now = T0.timestamp() + 300 + 60
    assert await p.sweep_reservations() == 1
    assert swept("provisional") == before + 1
    st = await conns.balances.get("acc_1")
    assert st is not None and (st.balance, st.reserved) == (START - GRANT, 0)
    assert await rows(conns, "lost") == [("provisional", -GRANT, "charge:lost")]
    await drift_zero(conns)
    # a second sweep (now, and once more later the same day) changes nothing
    assert await p.sweep_reservations() == 0
    clock.now += 3600
    assert await p.sweep_reservations() == 0
    assert await balance(conns) == START - GRANT
    assert swept("provisional") == before + 1
    await drift_zero(conns)

    # The hangup arrives late (twice): the call costs what it is rated, exactly once.
    cost = voice_cost(seconds, UK_RATE)[0]
    out = await feed(p, hangup("acc_1", "lost", T0, seconds), hangup("acc_1", "lost", T0, seconds))
    assert (out.charged, out.duplicates) == (1, 1)
    assert await balance(conns) == START - cost
    assert await rows(conns, "lost") == [
        ("call", -cost, "lost:hangup"),
        ("provisional", -GRANT, "charge:lost"),
        ("provisional", GRANT, "settle:lost"),
    ]
    await drift_zero(conns)
    assert (await conns.balances.get("acc_1")).reserved == 0  # type: ignore[union-attr]

    # Replays change nothing: the hangup again, and the sweep at the closed marker's end.
    out = await feed(p, hangup("acc_1", "lost", T0, seconds))
    assert (out.charged, out.duplicates) == (0, 1)
    clock.now += 2 * 86_400
    assert await p.sweep_reservations() == 0
    assert await balance(conns) == START - cost
    assert len(await rows(conns, "lost")) == 3
    assert await conns.balances.reservations("acc_1") == {}
    await drift_zero(conns)


async def test_a_sweep_that_crashed_before_its_ledger_row_is_repaired_by_the_next(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    await auth.authorize(AuthorizeRequest("acc_1", "lost", "outbound", "+1415", UK))
    at = int(T0.timestamp()) + 360
    # Redis charged it, then the worker died before the ledger: no row, drift GRANT.
    assert await conns.balances.sweep_expired(now_s=at) == [
        Provisional("acc_1", "lost", GRANT, 0, at, True)
    ]
    assert await rows(conns, "lost") == []
    assert (await reconcile(conns.pool, conns.balances)).drift_micros == GRANT
    # The next sweep finds the same charge (it stayed due), charges nothing more, writes the row.
    clock.now = at + 5
    before = swept("provisional")
    assert await p.sweep_reservations() == 0
    assert swept("provisional") == before  # counted once, by the sweep that charged it
    assert await balance(conns) == START - GRANT
    assert await rows(conns, "lost") == [("provisional", -GRANT, "charge:lost")]
    await drift_zero(conns)


async def test_a_hangup_after_a_crashed_sweep_writes_both_steps(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    p, auth = await make(conns, clock)
    await auth.authorize(AuthorizeRequest("acc_1", "lost", "outbound", "+1415", UK))
    at = int(T0.timestamp()) + 360
    await conns.balances.sweep_expired(now_s=at)  # Redis only: the ledger row never written
    clock.now = at + 60
    cost = voice_cost(61, UK_RATE)[0]
    await feed(p, hangup("acc_1", "lost", T0, 61))
    assert await balance(conns) == START - cost
    assert await rows(conns, "lost") == [
        ("call", -cost, "lost:hangup"),
        ("provisional", -GRANT, "charge:lost"),
        ("provisional", GRANT, "settle:lost"),
    ]
    await drift_zero(conns)
    # the sweep that finds the call still due changes nothing
    assert await p.sweep_reservations() == 0
    assert await balance(conns) == START - cost
    assert len(await rows(conns, "lost")) == 3
    await drift_zero(conns)


async def test_a_reservation_that_held_nothing_is_just_released(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="0.00")
    clock = Clock(T0)
    p, _ = await make(conns, clock)
    # inbound on an account with nothing: answered opens a reservation of nothing
    await feed(p, answered("acc_1", "in", T0, direction="inbound"))
    assert await conns.balances.reservations("acc_1") == {"in": 0}
    clock.now = (T0 + timedelta(seconds=360)).timestamp()
    await p.sweep_reservations()
    assert await conns.balances.reservations("acc_1") == {}
    assert await balance(conns) == 0
    assert await rows(conns, "in") == []
    await drift_zero(conns)


async def stuck(conns: Connections, seed: Seeder, clock: Clock) -> Any:
    """An account whose call ``lost`` was answered at T0 and charged provisionally by the
    sweep (its hangup never came); returns the processor."""
    await seed("acc_1", balance="10.00")
    p, auth = await make(conns, clock)
    await auth.authorize(AuthorizeRequest("acc_1", "lost", "outbound", "+1415", UK))
    await feed(p, answered("acc_1", "lost", T0))
    clock.now = T0.timestamp() + 360
    assert await p.sweep_reservations() == 1
    assert await balance(conns) == START - GRANT
    return p


@pytest.mark.parametrize("seconds", [0, 240, 420], ids=["unanswered", "shorter", "longer"])
async def test_a_hangup_later_than_the_markers_day_settles_from_the_ledger(
    conns: Connections, seed: Seeder, seconds: int
) -> None:
    clock = Clock(T0)
    p = await stuck(conns, seed, clock)
    # The marker's day is over: the sweep drops it, and Redis no longer knows the call.
    clock.now = T0.timestamp() + 360 + PROVISIONAL_KEEP_S + 5
    assert await p.sweep_reservations() == 0
    assert await conns.balances.reservations("acc_1") == {}
    assert await balance(conns) == START - GRANT

    # Three days late, the hangup comes (with a copy): the ledger's open charge is settled,
    # not charged a second time in full.
    clock.now = T0.timestamp() + 3 * 86_400
    cost = voice_cost(seconds, UK_RATE)[0]
    out = await feed(p, hangup("acc_1", "lost", T0, seconds), hangup("acc_1", "lost", T0, seconds))
    assert (out.charged, out.duplicates) == (1, 1)
    assert await balance(conns) == START - cost
    assert await rows(conns, "lost") == [
        ("call", -cost, "lost:hangup"),
        ("provisional", -GRANT, "charge:lost"),
        ("provisional", GRANT, "settle:lost"),
    ]
    await drift_zero(conns)

    # Replays, a week later (Redis has long forgotten the event), change nothing: the charge
    # is settled, so no marker is put back, and the ledger knows the hangup.
    clock.now = T0.timestamp() + 7 * 86_400
    assert await p.sweep_reservations() == 0
    out = await feed(p, hangup("acc_1", "lost", T0, seconds))
    assert (out.charged, out.duplicates) == (0, 1)
    assert await balance(conns) == START - cost
    assert len(await rows(conns, "lost")) == 3
    assert await conns.balances.reservations("acc_1") == {}
    await drift_zero(conns)


async def test_a_hangup_after_redis_lost_everything_settles_the_rebuilt_charge(
    conns: Connections, seed: Seeder
) -> None:
    clock = Clock(T0)
    await stuck(conns, seed, clock)
    await seed("acc_2", balance="5.00")  # an account with no provisional charge
    await conns.redis.flushall()  # the test's own Redis: the marker is lost with the account
    catalog = Catalog(conns.pool)
    await catalog.refresh()
    p = harness.processor(conns, catalog, clock=clock, rebuild=True)

    # The hangup an hour later: the account is rebuilt from the ledger, its open provisional
    # charge with it, and the hangup settles that charge.
    clock.now = T0.timestamp() + 3600
    cost = voice_cost(420, UK_RATE)[0]
    out = await feed(p, hangup("acc_1", "lost", T0, 420))
    assert out.charged == 1
    assert await balance(conns) == START - cost
    ids = [r[2] for r in await rows(conns, "lost")]
    assert ids == ["lost:hangup", "charge:lost", "settle:lost"]
    assert await conns.balances.reservations("acc_1") == {"lost": 0}  # the hangup's closed marker
    await drift_zero(conns)


async def test_putting_markers_back_never_touches_a_live_call_or_a_settled_one(
    conns: Connections, seed: Seeder
) -> None:
    await seed("acc_1", balance="10.00")
    clock = Clock(T0)
    _, auth = await make(conns, clock)
    d = await auth.authorize(AuthorizeRequest("acc_1", "live", "outbound", "+1415", UK))
    now = int(T0.timestamp())
    before = await conns.balances.reservations("acc_1")
    assert before == {"live": d.reserved}
    # a live reservation under the same call id is left as it is (and keeps its expiry)
    expiry = await conns.redis.zscore("meter:rsv:expiry", "acc_1\x00live")
    n = await conns.balances.restore_provisional(
        [Unsettled("acc_1", "live", GRANT, now - 10)], now_s=now
    )
    assert n == 0
    assert await conns.balances.reservations("acc_1") == before
    assert await conns.redis.zscore("meter:rsv:expiry", "acc_1\x00live") == expiry
    # a call with no entry gets the sweep's marker, which the sweep drops when its time is up
    n = await conns.balances.restore_provisional(
        [Unsettled("acc_1", "gone", GRANT, now - 10)], now_s=now
    )
    assert n == 1
    assert (await conns.balances.reservations("acc_1"))["gone"] == 0  # holds no money
    st = await conns.balances.get("acc_1")
    assert st is not None and (st.balance, st.reserved) == (START, d.reserved)
    await conns.balances.release("acc_1", "live", now_s=now)
    p, _ = await make(conns, clock)
    clock.now = now + PROVISIONAL_KEEP_S
    await p.sweep_reservations()
    assert await conns.balances.reservations("acc_1") == {}


async def test_a_call_charged_twice_is_found_by_reconcile_and_settled_once(
    conns: Connections, seed: Seeder
) -> None:
    clock = Clock(T0)
    p = await stuck(conns, seed, clock)
    # Redis loses only the marker (a failover to a replica behind by that write): the hangup,
    # an hour later, finds no marker and its call is recent, so it is charged in full.
    await conns.redis.hdel("{a:acc_1}:rsv", "lost")
    clock.now = T0.timestamp() + 3600
    cost = voice_cost(240, UK_RATE)[0]
    await feed(p, hangup("acc_1", "lost", T0, 240))
    assert await balance(conns) == START - GRANT - cost
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.drift_micros == 0 and not rec.ok  # both books agree on the wrong amount
    assert rec.double_charged == [Unsettled("acc_1", "lost", GRANT, int(T0.timestamp()) + 360)]
    assert metrics.RECONCILE_DOUBLE_CHARGED._value.get() == 1

    now = int(clock.now)
    assert await settle_double_charged(conns.pool, conns.balances, rec.double_charged, now_s=now)
    # a rerun (after a crash between Redis and the ledger, say) gives nothing back twice
    await settle_double_charged(conns.pool, conns.balances, rec.double_charged, now_s=now)
    assert await balance(conns) == START - cost
    ids = [r[2] for r in await rows(conns, "lost")]
    assert ids == ["lost:hangup", "charge:lost", "settle:lost"]
    rec = await reconcile(conns.pool, conns.balances)
    assert rec.ok and rec.drift_micros == 0 and rec.double_charged == []
