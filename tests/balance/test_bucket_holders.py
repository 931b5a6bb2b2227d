"""``bucket_free`` (``balance/lua/lib/free_seconds.lua``) reads the holders index, not the day's
closed markers: the same free seconds as summing every reservation of the account, at a cost
that follows the live calls."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from balance import keys, scripts
from balance.store import RedisBalances
from balance.values import CallProgress, PlanPeriod, ReservationRequest, Tariff
from infra.ledger import Unsettled

NOW = 1_795_300_000
UK = Tariff(15_000)
# bucket_free itself, called the way reserve.lua and progress.lua call it.
PROBE = """--#include lib/free_seconds.lua
local free, kept = bucket_free(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return {free, kept and 1 or 0}
"""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
def probe_text(tmp_path: Path) -> str:
    (tmp_path / "probe.lua").write_text(PROBE)
    (tmp_path / "lib").symlink_to(Path(scripts.__file__).parent / "lua" / "lib")
    return scripts.assemble("probe.lua", cast(Any, tmp_path))


def _held(v: bytes) -> int:
    f = v.split(b"|")
    return int(f[9]) if len(f) > 9 and f[9].isdigit() else 0


def _usable(bucket: str, plan: str, at: int) -> int:
    """What bucket_free adds up before the holds (its first half, in Python)."""
    usable, pid = 0, None
    if plan:
        p_s, p_from, p_to = (int(x) for x in plan.split(","))
        pid = f"p{p_from}"
    for g in filter(None, bucket.split(";")):
        gid, rem, frm, to = g.split(",")
        if gid == pid:
            pid = None
        if int(frm) <= at < int(to):
            usable += int(rem)
    if pid and p_s > 0 and p_from <= at < p_to:
        usable += p_s
    return usable


async def test_free_seconds_equal_the_sum_over_every_reservation_through_any_history(
    client: aioredis.Redis, probe_text: str
) -> None:
    """Random authorizations, progress, hangups, sweeps, restored markers and bucket changes:
    after each, bucket_free answers what summing the whole reservations hash answers."""
    b = RedisBalances(client)
    probe = client.register_script(probe_text)
    rng = random.Random(17)
    await b.create_account("a", balance=2_000_000, credit_limit=0, low_threshold=0)
    rsv = keys.reservations("a")
    plan = PlanPeriod(1_800, NOW - 86_400, NOW + 86_400)
    plan_line = f"{plan.included_s},{plan.period_start},{plan.period_end}"
    bucket = ""
    now = NOW
    calls: list[str] = []
    checked_kept = checked_dropped = 0
    for step in range(400):
        now += rng.randint(0, 40)
        op = rng.random()
        if op < 0.35 or not calls:
            cid = f"c{step}"
            calls.append(cid)
            await b.reserve_many(
                [ReservationRequest("a", cid, "outbound", UK)],
                now_s=now,
                grant_s=rng.choice([60, 300]),
                grace_s=60,
                max_s=14_400,
                force=rng.random() < 0.1,
                plans={"a": plan} if rng.random() < 0.7 else None,
            )
        elif op < 0.55:
            cid = rng.choice(calls)
            await b.progress(
                [CallProgress("a", cid, now - rng.randint(0, 600), rng.randint(0, 900))],
                now_s=now,
                grant_s=300,
                grace_s=60,
                max_s=14_400,
                plans={"a": plan} if rng.random() < 0.7 else None,
            )
        elif op < 0.7:
            # A hangup: debit.lua's closed marker, and the live count it keeps.
            cid = rng.choice(calls)
            if await client.hget(rsv, cid) is not None:
                await client.hset(rsv, cid, f"0|0|{now + 86_400}|0|0|1|1|0|-1")
        elif op < 0.8:
            await b.sweep_expired(now_s=now + rng.randint(0, 2_000), keep_s=rng.choice([0, 600]))
        elif op < 0.85:
            cid = rng.choice(calls)
            await b.restore_provisional([Unsettled("a", cid, 1_000, now - 100)], now_s=now)
        elif op < 0.95:
            # The bucket changes: a bundle's grant, the plan's own grant spent, or nothing.
            bucket = rng.choice(
                [
                    "",
                    f"b1,{rng.randint(0, 900)},{NOW - 10},{NOW + 5_000}",
                    f"p{plan.period_start},0,{plan.period_start},{plan.period_end}",
                    f"p{plan.period_start},{rng.randint(1, 1_800)},{plan.period_start},"
                    f"{plan.period_end};b2,120,{NOW},{NOW + 50_000}",
                ]
            )
            if bucket:
                await client.hset(keys.account("a"), "min", bucket)
            else:
                await client.hdel(keys.account("a"), "min")
        for at, use_plan in ((now, True), (now - rng.randint(0, 3_000), rng.random() < 0.5)):
            pl = plan_line if use_plan else ""
            own = rng.choice([0, 0, 30])
            free, kept = await probe(keys=[rsv], args=[bucket, pl, at, own])
            held = sum(_held(v) for v in cast(list[bytes], await client.hvals(rsv)))
            usable = _usable(bucket, pl, at)
            assert free == (max(usable - held + own, 0) if usable else 0), (step, at)
            assert kept == (1 if usable else 0)
            if usable:
                checked_kept += 1
                assert await client.hexists(keys.holders("a"), "")
            else:
                checked_dropped += 1
                assert not await client.exists(keys.holders("a"))
    assert checked_kept > 100 and checked_dropped > 50  # both ways were exercised


async def test_an_authorization_reads_the_live_calls_not_the_days_markers(
    client: aioredis.Redis,
) -> None:
    """2,000 hangups' markers and five live calls: after the index is built (one scan, the
    first time), no authorization reads the reservations hash whole. Prints the Redis time
    per authorization (INFO commandstats)."""
    b = RedisBalances(client)
    await b.create_account("a", balance=100_000_000, credit_limit=0, low_threshold=0)
    rsv = keys.reservations("a")
    marker = f"0|0|{NOW + 86_400}|0|0|1|1|0|-1"
    await client.hset(rsv, mapping={f"old{i}": marker for i in range(2_000)})
    await client.hset(keys.account("a"), "lc", 0)
    plan = PlanPeriod(100_000, NOW - 1_000, NOW + 1_000_000)
    await client.config_resetstat()
    n = 200
    for i in range(n):
        r = await b.reserve(
            "a", f"c{i}", "outbound", UK, now_s=NOW, grant_s=300, grace_s=60, max_s=14_400,
            plan=plan,
        )  # fmt: skip
        assert (r.decision, r.held_s) == ("allow", 300)
        if i >= 5:  # five calls up at a time: the oldest hangs up
            await client.hset(rsv, f"c{i - 5}", marker)
    stats = await client.info("commandstats")
    whole = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hvals", "hgetall"))
    assert whole <= 1  # the index's one build
    assert await client.hlen(keys.holders("a")) <= 1 + 6  # "", the live calls, one closed
    us = stats["cmdstat_evalsha"]["usec_per_call"]
    print(f"reserve.lua with 2,000 closed markers and 5 live calls: {us} us of Redis per call")
