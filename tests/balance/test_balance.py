"""The balance store's Lua scripts against a real Redis: idempotency, conflicts, the state
machine and its outbox, concurrency.

Every test that depends on the date runs at each of ``tests.calendar.CALENDAR_EDGES``
(the ends of months and years, 29 February, the past, the future, and the real clock): the
scripts take ``now`` as an argument and set expiry relative to it, so whatever Redis's own
clock says, a script given 2030-06-30 behaves as it will on that day."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from balance import keys
from balance.store import RedisBalances
from balance.values import Credit, Debit, Tariff
from balance.values import StatusChange as Changed
from infra.clock import SettableClock
from tests.calendar import CALENDAR_EDGES, at, ttl

DAY_S = 86_400


def key(i: int | str) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def fp(s: str = "") -> bytes:
    return hashlib.blake2b(s.encode(), digest_size=8).digest()


@pytest.fixture(params=CALENDAR_EDGES)
def now(request: pytest.FixtureRequest) -> int:
    """The time the test runs at (unix s): one calendar edge per run."""
    return at(request.param)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture
def balances(redis: aioredis.Redis, now: int) -> RedisBalances:
    """The store with its clock at ``now`` (for the calls that take no ``now_s``)."""
    return RedisBalances(redis, max_accounts_per_call=3, clock=SettableClock(now))


async def test_debit_is_idempotent_per_event_key(balances: RedisBalances, now: int) -> None:
    day = now // DAY_S
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    both = [Debit(key(1), fp(), 300, day), Debit(key(2), fp(), 200, day)]
    first = await balances.apply_debits({"a": both}, now)
    assert first[0].codes == "nn" and first[0].balance == 1_000_000 - 500
    st = await balances.get("a")
    assert st is not None and st.balance == 1_000_000 - 500
    again = await balances.apply_debits({"a": both}, now)
    assert again[0].codes == "dd"
    assert again[0].dup_amounts == [300, 200]
    st = await balances.get("a")
    assert st is not None and st.balance == 1_000_000 - 500


async def test_duplicate_within_one_batch_and_conflict(balances: RedisBalances, now: int) -> None:
    day = now // DAY_S
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    out = await balances.apply_debits(
        {
            "a": [
                Debit(key(1), fp("x"), 300, day),
                Debit(key(1), fp("x"), 300, day),
                Debit(key(1), fp("y"), 900, day),
            ]
        },
        now,
    )
    assert out[0].codes == "ndc"
    assert (await balances.get("a")).balance == 1_000_000 - 300  # type: ignore[union-attr]


async def test_memory_lives_in_the_bucket_of_the_event_day(
    balances: RedisBalances, redis: aioredis.Redis, now: int
) -> None:
    day = now // DAY_S
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    await balances.apply_debits({"a": [Debit(key(1), fp(), 300, day)]}, now)
    # kept until the end of the event's day plus the window, counted from the ``now`` the
    # script was given (Redis's TTL, whatever Redis's own clock says)
    kept = (day + 1) * DAY_S + keys.DEDUP_KEEP_S - now
    assert await ttl(redis, keys.applied("a", day)) == pytest.approx(kept, abs=1)
    two_days_later = now + 2 * DAY_S
    out = await balances.apply_debits({"a": [Debit(key(1), fp(), 300, day)]}, two_days_later)
    assert out[0].codes == "d"
    assert await ttl(redis, keys.applied("a", day)) == pytest.approx(kept, abs=1)  # not shortened
    # a late event (a week old) is remembered for at least a day from now
    late = day - 7
    await balances.apply_debits({"a": [Debit(key(2), fp(), 1, late)]}, now)
    assert await ttl(redis, keys.applied("a", late)) == pytest.approx(DAY_S, abs=1)


async def test_a_replay_a_day_later_is_a_duplicate_and_after_the_window_is_new(
    balances: RedisBalances, redis: aioredis.Redis, now: int
) -> None:
    """The memory's life is Redis's real TTL, set relative to the ``now`` passed: a day later
    (by that clock) it is still there; a day past the window it is gone. No sleeping: the key
    is aged by what the caller's clock advanced (EXPIRE to TTL - elapsed, which Redis turns
    into a deletion once nothing is left)."""
    day = now // DAY_S
    ev = Debit(key(1), fp(), 300, day)
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    assert (await balances.apply_debits({"a": [ev]}, now))[0].codes == "n"
    memory = keys.applied("a", day)
    life = await ttl(redis, memory)
    assert DAY_S < life <= DAY_S + keys.DEDUP_KEEP_S  # between a day and the window past today
    assert await age(redis, memory, DAY_S)
    later = await balances.apply_debits({"a": [ev]}, now + DAY_S)
    assert (later[0].codes, later[0].dup_amounts) == ("d", [300])
    # keep window + 1 day after ``now``: past the end of the event's day plus the window
    assert not await age(redis, memory, keys.DEDUP_KEEP_S)
    assert await redis.exists(memory) == 0
    gone = await balances.apply_debits({"a": [ev]}, now + DAY_S + keys.DEDUP_KEEP_S)
    assert gone[0].codes == "n"  # forgotten, as designed: the processor asks the ledger first


async def age(r: aioredis.Redis, name: str, seconds: int) -> bool:
    """Advance a key's life by ``seconds`` of the caller's clock; False when that ends it."""
    left = await ttl(r, name)
    assert left > 0, f"{name} has no expiry"
    await r.expire(name, left - seconds)  # <= 0: Redis deletes the key at once
    return bool(await r.exists(name))


async def test_unknown_account_is_reported_and_untouched(balances: RedisBalances, now: int) -> None:
    out = await balances.apply_debits({"ghost": [Debit(key(1), fp(), 300, now // DAY_S)]}, now)
    assert not out[0].found
    assert await balances.get("ghost") is None


async def test_many_accounts_across_script_chunks(balances: RedisBalances, now: int) -> None:
    ids = [f"a{i}" for i in range(10)]  # 3 accounts per script -> 4 scripts in one pipeline
    for a in ids:
        await balances.create_account(a, balance=1_000, credit_limit=0, low_threshold=0)
    out = await balances.apply_debits(
        {a: [Debit(key(a), fp(), i, now // DAY_S)] for i, a in enumerate(ids)}, now
    )
    assert [o.account_id for o in out] == ids
    assert [o.balance for o in out] == [1_000 - i for i in range(10)]


async def test_a_balance_past_2_to_the_53_is_debited_exactly(
    balances: RedisBalances, redis: aioredis.Redis, now: int
) -> None:
    # debit.lua writes the new balance with the account's other fields (Lua numbers are
    # doubles): past 2^53 it must move it by HINCRBY, exact on Redis's 64-bit integers.
    big = 2**53 + 10
    await balances.create_account("a", balance=big, credit_limit=0, low_threshold=0)
    await balances.create_account("b", balance=1_000_000, credit_limit=0, low_threshold=0)
    out = await balances.apply_debits(
        {"a": [Debit(key(1), fp(), 3, now // DAY_S)], "b": [Debit(key(2), fp(), 3, now // DAY_S)]},
        now,
    )
    assert [o.codes for o in out] == ["n", "n"]
    assert int(await redis.hget(keys.account("a"), "bal")) == big - 3  # odd: no double holds it
    assert int(await redis.hget(keys.account("b"), "bal")) == 1_000_000 - 3


async def test_several_hangups_of_an_account_release_their_reservations(
    balances: RedisBalances, now: int
) -> None:
    # debit.lua asks once whether an account with several hangups has reservations at all:
    # with some, each hangup still releases its own; without, nothing is looked up.
    tariff = Tariff(rate_per_min=60_000, connect_fee=0, initial_s=1, subsequent_s=1)
    grant = {"grant_s": 300, "grace_s": 60, "max_s": 14_400}
    day = now // DAY_S
    for a in ("a", "b"):
        await balances.create_account(a, balance=10_000_000, credit_limit=0, low_threshold=0)
    for c in ("c1", "c2"):
        r = await balances.reserve("a", c, "outbound", tariff, now_s=now, **grant)
        assert r.decision == "allow" and r.reserved > 0
    held = await balances.get("a")
    assert held is not None and held.reserved > 0
    hangups = {
        a: [Debit(key(a + c), fp(), 1_000, day, call_id=c) for c in ("c1", "c2", "c3")]
        for a in ("a", "b")
    }
    out = await balances.apply_debits(hangups, now)
    assert [o.codes for o in out] == ["nnn", "nnn"]
    after = {a: await balances.get(a) for a in ("a", "b")}
    assert after["a"] is not None and after["a"].reserved == 0
    assert after["a"].balance == 10_000_000 - 3_000
    assert after["b"] is not None and (after["b"].reserved, after["b"].balance) == (0, 9_997_000)
    again = await balances.apply_debits(hangups, now)  # a replay releases nothing twice
    assert [o.codes for o in again] == ["ddd", "ddd"]
    assert [o.dup_amounts for o in again] == [[1_000] * 3] * 2


async def test_hold_is_queued_once_under_concurrent_debits(
    balances: RedisBalances, now: int
) -> None:
    await balances.create_account("a", balance=10_000, credit_limit=0, low_threshold=2_000)
    # 100 concurrent batches of one 1,000 debit each: credit runs out after 10.
    outs = await asyncio.gather(
        *(
            balances.apply_debits({"a": [Debit(key(i), fp(), 1_000, now // DAY_S)]}, now)
            for i in range(100)
        )
    )
    st = await balances.get("a")
    assert st is not None and st.balance == 10_000 - 100_000 and st.status == "hold"
    pending = await balances.pending_outbox("a")
    assert [(s.seq, s.type) for s in pending] == [(1, "account.low_balance"), (2, "account.hold")]
    assert sum(1 for o in outs for s in o[0].outbox if s.type == "account.hold") >= 1
    await balances.ack_outbox({"a": 2})
    assert await balances.pending_outbox("a") == []


async def test_outbox_ack_keeps_newer_entries(balances: RedisBalances, now: int) -> None:
    day = now // DAY_S
    await balances.create_account("a", balance=1_000, credit_limit=0, low_threshold=500)
    await balances.apply_debits({"a": [Debit(key(1), fp(), 600, day)]}, now)  # -> low, seq 1
    await balances.apply_debits({"a": [Debit(key(2), fp(), 600, day)]}, now)  # -> hold, seq 2
    await balances.ack_outbox({"a": 1})
    assert [s.seq for s in await balances.pending_outbox("a")] == [2]


async def test_credit_resumes_a_held_account_once(balances: RedisBalances, now: int) -> None:
    await balances.create_account("a", balance=100, credit_limit=0, low_threshold=0)
    await balances.apply_debits({"a": [Debit(key(1), fp(), 500, now // DAY_S)]}, now)
    assert (await balances.get("a")).status == "hold"  # type: ignore[union-attr]
    c1 = await balances.credit("a", "pay-1", 1_000, now_s=now)
    c2 = await balances.credit("a", "pay-1", 1_000, now_s=now)
    assert (c1.applied, c1.balance, c1.status) == (True, 600, "active")
    assert (c2.applied, c2.balance) == (False, 600)
    types = [s.type for s in await balances.pending_outbox("a")]
    assert types == ["account.hold", "account.resume"]
    assert not (await balances.credit("ghost", "pay-1", 1, now_s=now)).found


async def _with_minutes_only_now(balances: RedisBalances, now: int) -> None:
    """Account "a" with 100 micro-units and a bundle of 120 s usable for ten minutes around
    ``now`` only: whether it counts tells which clock a script read."""
    await balances.create_account("a", balance=100, credit_limit=0, low_threshold=0)
    g = await balances.grant_minutes(
        "a", "b1", price=0, seconds=120, valid_from=now - 300, expires_at=now + 300, now_s=now
    )
    assert g.result == "applied"


async def test_credit_judges_the_bucket_by_the_clock_it_is_given(
    balances: RedisBalances, redis: aioredis.Redis, now: int
) -> None:
    await _with_minutes_only_now(balances, now)
    # money gone, minutes usable at ``now``: low, not hold (with Redis's clock, the bundle of
    # a date in 2030 or 2025 would not count, and the account would be held)
    out = await balances.credit("a", "fix-1", -100, now_s=now)
    assert (out.balance, out.status) == (0, "low")
    # the same a day later, by the store's own clock: the bundle has ended, so hold
    later = RedisBalances(redis, clock=SettableClock(now + DAY_S))
    out = await later.credit("a", "fix-2", -1)
    assert (out.balance, out.status) == (-1, "hold")
    # without ``now_s`` the store's clock decides: at ``now`` the minutes count again
    out = await balances.credit_many([Credit("a", "fix-3", 1)])
    assert [(o.balance, o.status) for o in out] == [(0, "low")]


async def test_resume_judges_the_bucket_by_the_clock_it_is_given(
    balances: RedisBalances, now: int
) -> None:
    await _with_minutes_only_now(balances, now)
    await balances.credit("a", "fix-1", -100, now_s=now)
    set_status = balances.set_status
    assert await set_status("a", "suspend", "operator", now_s=now) == Changed(True, "suspended")
    assert await set_status("a", "resume", "operator", now_s=now) == Changed(True, "low")
    assert await set_status("a", "suspend", "operator") == Changed(True, "suspended")
    assert await set_status("a", "resume", "operator", now_s=now + DAY_S) == Changed(True, "hold")


async def test_credit_limit_counts_as_available(balances: RedisBalances, now: int) -> None:
    day = now // DAY_S
    await balances.create_account("a", balance=0, credit_limit=5_000, low_threshold=0)
    out = await balances.apply_debits({"a": [Debit(key(1), fp(), 4_000, day)]}, now)
    assert out[0].status == "active" and out[0].balance == -4_000
    out = await balances.apply_debits({"a": [Debit(key(2), fp(), 1_000, day)]}, now)
    assert out[0].status == "hold"  # available = -5,000 + 5,000 = 0


async def test_suspended_accounts_are_charged_but_stay_suspended(
    balances: RedisBalances, now: int
) -> None:
    await balances.create_account(
        "a", balance=100, credit_limit=0, low_threshold=0, status="suspended"
    )
    out = await balances.apply_debits({"a": [Debit(key(1), fp(), 500, now // DAY_S)]}, now)
    assert out[0].status == "suspended" and out[0].balance == -400 and out[0].outbox == []


def test_outbox_entries_decode_call_ids_holding_separators() -> None:
    from balance.replies import decode_outbox

    (s,) = decode_outbox([b"7|call.terminate|credit_exhausted|a|b|c|1795300000"])
    assert (s.seq, s.type, s.reason, s.call_id, s.terminate_at) == (
        7,
        "call.terminate",
        "credit_exhausted",
        "a|b|c",
        1795300000,
    )
    (h,) = decode_outbox([b"3|account.hold|credit_exhausted"])
    assert (h.seq, h.type, h.reason, h.call_id) == (3, "account.hold", "credit_exhausted", None)


class Sends:
    """A round trip that fails with ``errors`` in turn, then answers "ok"; counts its sends."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.sent = 0

    async def __call__(self) -> str:
        self.sent += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_a_lost_script_is_sent_again_once_and_nothing_else_ever_is() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from balance.errors import OutcomeUnknown, Refused, StoreBusy, call

    once = Sends(NoScriptError("NOSCRIPT No matching script"))
    assert await call("debit", once) == "ok" and once.sent == 2
    twice = Sends(NoScriptError("NOSCRIPT"), NoScriptError("NOSCRIPT"))
    with pytest.raises(StoreBusy):
        await call("debit", twice)
    assert twice.sent == 2
    cases: list[tuple[Exception, type[Exception]]] = [
        (RedisTimeoutError("Timeout reading from socket"), OutcomeUnknown),
        (RedisConnectionError("Connection closed by server."), OutcomeUnknown),
        (RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
         OutcomeUnknown),
        (ResponseError("BUSY Redis is busy running a script"), StoreBusy),
        (ResponseError("Command # 3 (EVALSHA ab 1 k) of pipeline caused error: LOADING x"),
         StoreBusy),
        (ResponseError("OOM command not allowed when used memory > 'maxmemory'"), StoreBusy),
        (ResponseError("ERR debit: negative amount"), Refused),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
         Refused),
    ]
    for error, mapped in cases:
        sends = Sends(error)
        with pytest.raises(mapped) as raised:
            await call("debit", sends)
        assert sends.sent == 1, error  # never again: a timed-out debit may have been applied
        assert raised.value.__cause__ is error
