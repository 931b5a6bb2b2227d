"""``CoalescingBalances`` against a real Redis: the answers of ``reserve``, fewer round trips."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
import redis.asyncio as aioredis

from balance import keys
from balance.coalesce import CoalescingBalances
from balance.errors import OutcomeUnknown, Refused
from balance.values import PlanPeriod, Reservation, ReservationRequest, Tariff
from tests.conftest import eventually

NOW = 1_795_300_000
UK = Tariff(15_000)  # 0.015/min, 6/6: 300 s cost 75,000


class Counting(CoalescingBalances):
    round_trips = 0

    async def reserve_many(
        self,
        calls: Sequence[ReservationRequest],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        force: bool = False,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Reservation]:
        self.round_trips += 1
        return await super().reserve_many(
            calls,
            now_s=now_s,
            grant_s=grant_s,
            grace_s=grace_s,
            max_s=max_s,
            force=force,
            plans=plans,
        )


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def reserve(b: CoalescingBalances, account: str, call_id: str) -> Reservation:
    return await b.reserve(
        account, call_id, "outbound", UK, now_s=NOW, grant_s=300, grace_s=60, max_s=14_400
    )


async def test_concurrent_reservations_share_round_trips_and_keep_their_answers(
    client: aioredis.Redis,
) -> None:
    b = Counting(client)
    await b.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    await b.create_account("b", balance=10_000_000, credit_limit=0, low_threshold=0)
    out = await asyncio.gather(
        *(reserve(b, "a" if i % 2 else "b", f"c{i}") for i in range(400)),
        reserve(b, "ghost", "x"),
    )
    assert b.round_trips < 50  # one at a time, the rest in batches behind it
    on_a = [r for i, r in enumerate(out[:400]) if i % 2]
    assert [r.granted_s for r in on_a if r.decision == "allow"] == [300] * 13 + [96]
    assert {r.reason for r in on_a if r.decision == "deny"} == {"insufficient_credit"}
    assert sum((await b.reservations("a")).values()) == 13 * 75_000 + 24_000
    on_b = [r.granted_s for r in out[:400:2] if r.decision == "allow"]
    assert on_b == [300] * 133 + [96]  # 10.00 = 133 x 0.075 + 0.025
    assert out[-1].reason == "unknown_account"
    # A retry of the same call finds its reservation, not a second one (its max_duration_s
    # is what the credit buys now, others' reservations since included).
    again = await reserve(b, "a", "c1")
    first = out[1]
    assert (again.decision, again.reserved, again.granted_s, again.expires_at) == (
        first.decision,
        first.reserved,
        first.granted_s,
        first.expires_at,
    )


async def test_a_caller_that_gives_up_does_not_spoil_the_batch(client: aioredis.Redis) -> None:
    b = CoalescingBalances(client)
    await b.create_account("a", balance=10_000_000, credit_limit=0, low_threshold=0)
    tasks = [asyncio.create_task(reserve(b, "a", f"c{i}")) for i in range(50)]
    await asyncio.sleep(0)
    tasks[10].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[10], asyncio.CancelledError)
    assert all(
        isinstance(r, Reservation) and r.decision == "allow" for i, r in enumerate(done) if i != 10
    )
    # The cancelled caller's reservation may still have been made: a retry resolves it.
    assert (await reserve(b, "a", "c10")).decision == "allow"


async def test_a_failed_round_trip_fails_every_call_in_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        b = CoalescingBalances(r)
        out = await asyncio.gather(
            *(reserve(b, "a", f"c{i}") for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(e, OutcomeUnknown) for e in out)
        assert b._inflight == 0 and not b._queue  # nothing left behind
    finally:
        await r.aclose()


async def test_a_hung_redis_never_blocks_later_calls_for_good() -> None:
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, never answer

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        b = CoalescingBalances(r, timeout_s=0.2)
        for _ in range(2):
            t = time.monotonic()
            out = await asyncio.gather(
                *(reserve(b, "a", f"c{i}") for i in range(20)), return_exceptions=True
            )
            # The first call's own round trip, then the batch behind it: each bounded.
            assert time.monotonic() - t < 1.5
            assert all(isinstance(e, OutcomeUnknown) for e in out)
            assert b._inflight == 0 and not b._queue
    finally:
        await r.aclose()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_callers_that_give_up_never_cut_a_round_trip_short(client: aioredis.Redis) -> None:
    b = CoalescingBalances(client)
    await b.create_account("a", balance=100_000_000, credit_limit=0, low_threshold=0)
    before = (await client.info("clients"))["connected_clients"]

    async def impatient(i: int) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.0002 * (i % 5)):
                await reserve(b, "a", f"c{i}")

    await asyncio.gather(*(impatient(i) for i in range(300)))

    async def landed() -> bool:
        return b._inflight == 0  # the last round trip is back

    await eventually(landed, within=5)
    # Every call went through (the given-up ones too: a retry would find them) ...
    assert len(await b.reservations("a")) == 300
    # ... on a handful of connections: none was left checked out by a cancelled pipeline.
    assert (await client.info("clients"))["connected_clients"] <= before + 2
    assert (await reserve(b, "a", "after")).decision == "allow"


async def test_reservations_survive_redis_losing_its_scripts(client: aioredis.Redis) -> None:
    """The reservations' own connection calls reserve.lua by its SHA: after SCRIPT FLUSH (a
    restart, a failover) it loads it on NOSCRIPT and sends the batch again, once."""
    b = Counting(client)
    await b.create_account("a", balance=10_000_000, credit_limit=0, low_threshold=0)
    assert (await reserve(b, "a", "c1")).decision == "allow"
    await client.script_flush()
    out = await asyncio.gather(*(reserve(b, "a", f"c{i}") for i in range(2, 40)))
    assert {r.decision for r in out} == {"allow"}
    assert len(await b.reservations("a")) == 39
    again = await reserve(b, "a", "c1")  # the first answer, not a second reservation
    assert (again.decision, again.granted_s) == ("allow", 300)
    assert len(await b.reservations("a")) == 39
    await b.aclose()


async def test_an_error_reply_fails_its_batch_as_refused(client: aioredis.Redis) -> None:
    b = CoalescingBalances(client)
    await b.create_account("a", balance=10_000_000, credit_limit=0, low_threshold=0)
    await client.delete(keys.RESERVATION_EXPIRY)
    await client.set(keys.RESERVATION_EXPIRY, "not a sorted set")  # ZADD answers WRONGTYPE
    try:
        with pytest.raises(Refused):
            await reserve(b, "a", "c1")
    finally:
        await client.delete(keys.RESERVATION_EXPIRY)
    assert (await reserve(b, "a", "c1")).decision == "allow"  # the connection is still good
    await b.aclose()


async def test_each_callers_deadline_ends_its_wait_whatever_the_order() -> None:
    """A hung Redis: each caller's own deadline ends its wait (TimeoutError), the early ones
    first even when they came last; the one timer is re-armed for the next deadline."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        b = CoalescingBalances(r, timeout_s=30)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ended: dict[str, float] = {}

        async def one(name: str, after_s: float) -> None:
            with pytest.raises(TimeoutError):
                await b.reserve(
                    "a", name, "outbound", UK, now_s=NOW, grant_s=300, grace_s=60,
                    max_s=14_400, deadline=t0 + after_s,
                )  # fmt: skip
            ended[name] = loop.time() - t0

        await asyncio.gather(one("late", 0.6), one("early", 0.2), one("mid", 0.4))
        assert ended["early"] < ended["mid"] < ended["late"] < 1.5
        assert abs(ended["early"] - 0.2) < 0.15
        assert not b._deadlines and b._watchdog is None
        while b._tasks:  # the round trips themselves still wait (their own 30 s bound)
            for t in list(b._tasks):
                t.cancel()
            await asyncio.gather(*b._tasks, return_exceptions=True)
            await asyncio.sleep(0)
    finally:
        await r.aclose()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
