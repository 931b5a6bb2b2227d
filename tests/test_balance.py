"""The balance store's Lua scripts against a real Redis: idempotency, conflicts, the state
machine and its outbox, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import re
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from enforcement import keys
from enforcement.balance import Debit, RedisBalances

NOW = 1_795_300_000
DAY = NOW // 86_400


def key(i: int | str) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def fp(s: str = "") -> bytes:
    return hashlib.blake2b(s.encode(), digest_size=8).digest()


@pytest.fixture
async def balances(redis_url: str) -> AsyncIterator[RedisBalances]:
    r = aioredis.Redis.from_url(redis_url)
    yield RedisBalances(r, max_accounts_per_call=3)
    await r.aclose()


async def test_debit_is_idempotent_per_event_key(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    first = await balances.apply_debits(
        [("a", [Debit(key(1), fp(), 300, DAY), Debit(key(2), fp(), 200, DAY)])], NOW
    )
    assert first[0].codes == "nn" and first[0].balance == 1_000_000 - 500
    st = await balances.get("a")
    assert st is not None and st.balance == 1_000_000 - 500
    again = await balances.apply_debits(
        [("a", [Debit(key(1), fp(), 300, DAY), Debit(key(2), fp(), 200, DAY)])], NOW
    )
    assert again[0].codes == "dd"
    assert again[0].dup_amounts == [300, 200]
    st = await balances.get("a")
    assert st is not None and st.balance == 1_000_000 - 500


async def test_duplicate_within_one_batch_and_conflict(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    out = await balances.apply_debits(
        [
            (
                "a",
                [
                    Debit(key(1), fp("x"), 300, DAY),
                    Debit(key(1), fp("x"), 300, DAY),
                    Debit(key(1), fp("y"), 900, DAY),
                ],
            )
        ],
        NOW,
    )
    assert out[0].codes == "ndc"
    assert (await balances.get("a")).balance == 1_000_000 - 300  # type: ignore[union-attr]


async def test_memory_lives_in_the_bucket_of_the_event_day(
    balances: RedisBalances, redis_url: str
) -> None:
    await balances.create_account("a", balance=1_000_000, credit_limit=0, low_threshold=0)
    await balances.apply_debits([("a", [Debit(key(1), fp(), 300, DAY)])], NOW)
    two_days_later = NOW + 2 * 86_400
    out = await balances.apply_debits([("a", [Debit(key(1), fp(), 300, DAY)])], two_days_later)
    assert out[0].codes == "d"
    r = aioredis.Redis.from_url(redis_url)
    try:
        # kept until the end of the event's day plus the window, never shortened
        assert await r.expiretime(keys.applied("a", DAY)) == (DAY + 1) * 86_400 + keys.DEDUP_KEEP_S
        # a late event (a week old) is remembered for at least a day from now
        late = DAY - 7
        await balances.apply_debits([("a", [Debit(key(2), fp(), 1, late)])], NOW)
        assert await r.expiretime(keys.applied("a", late)) == NOW + 86_400
    finally:
        await r.aclose()


async def test_unknown_account_is_reported_and_untouched(balances: RedisBalances) -> None:
    out = await balances.apply_debits([("ghost", [Debit(key(1), fp(), 300, DAY)])], NOW)
    assert not out[0].found
    assert await balances.get("ghost") is None


async def test_many_accounts_across_script_chunks(balances: RedisBalances) -> None:
    ids = [f"a{i}" for i in range(10)]  # 3 accounts per script -> 4 scripts in one pipeline
    for a in ids:
        await balances.create_account(a, balance=1_000, credit_limit=0, low_threshold=0)
    out = await balances.apply_debits(
        [(a, [Debit(key(a), fp(), i, DAY)]) for i, a in enumerate(ids)], NOW
    )
    assert [o.account_id for o in out] == ids
    assert [o.balance for o in out] == [1_000 - i for i in range(10)]


async def test_hold_is_queued_once_under_concurrent_debits(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=10_000, credit_limit=0, low_threshold=2_000)
    # 100 concurrent batches of one 1,000 debit each: credit runs out after 10.
    outs = await asyncio.gather(
        *(
            balances.apply_debits([("a", [Debit(key(i), fp(), 1_000, DAY)])], NOW)
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


async def test_outbox_ack_keeps_newer_entries(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=1_000, credit_limit=0, low_threshold=500)
    await balances.apply_debits([("a", [Debit(key(1), fp(), 600, DAY)])], NOW)  # -> low, seq 1
    await balances.apply_debits([("a", [Debit(key(2), fp(), 600, DAY)])], NOW)  # -> hold, seq 2
    await balances.ack_outbox({"a": 1})
    assert [s.seq for s in await balances.pending_outbox("a")] == [2]


async def test_credit_resumes_a_held_account_once(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=100, credit_limit=0, low_threshold=0)
    await balances.apply_debits([("a", [Debit(key(1), fp(), 500, DAY)])], NOW)
    assert (await balances.get("a")).status == "hold"  # type: ignore[union-attr]
    c1 = await balances.credit("a", "pay-1", 1_000)
    c2 = await balances.credit("a", "pay-1", 1_000)
    assert (c1.applied, c1.balance, c1.status) == (True, 600, "active")
    assert (c2.applied, c2.balance) == (False, 600)
    types = [s.type for s in await balances.pending_outbox("a")]
    assert types == ["account.hold", "account.resume"]
    assert not (await balances.credit("ghost", "pay-1", 1)).found


async def test_credit_limit_counts_as_available(balances: RedisBalances) -> None:
    await balances.create_account("a", balance=0, credit_limit=5_000, low_threshold=0)
    out = await balances.apply_debits([("a", [Debit(key(1), fp(), 4_000, DAY)])], NOW)
    assert out[0].status == "active" and out[0].balance == -4_000
    out = await balances.apply_debits([("a", [Debit(key(2), fp(), 1_000, DAY)])], NOW)
    assert out[0].status == "hold"  # available = -5,000 + 5,000 = 0


async def test_suspended_accounts_are_charged_but_stay_suspended(balances: RedisBalances) -> None:
    await balances.create_account(
        "a", balance=100, credit_limit=0, low_threshold=0, status="suspended"
    )
    out = await balances.apply_debits([("a", [Debit(key(1), fp(), 500, DAY)])], NOW)
    assert out[0].status == "suspended" and out[0].balance == -400 and out[0].outbox == []


def test_state_machine_copies_are_identical() -> None:
    def transition(name: str) -> str:
        text = importlib.resources.files("enforcement").joinpath("lua", name).read_text()
        m = re.search(r"local function transition.*?\nend\n", text, re.S)
        assert m, name
        return m.group(0)

    copies = {transition(n) for n in ("debit.lua", "credit.lua", "set_status.lua", "grant.lua")}
    assert len(copies) == 1


def test_usable_seconds_copies_are_identical() -> None:
    def fn(name: str) -> str:
        text = importlib.resources.files("enforcement").joinpath("lua", name).read_text()
        m = re.search(r"local function usable_seconds.*?\nend\n", text, re.S)
        assert m, name
        return m.group(0)

    assert len({fn(n) for n in ("debit.lua", "credit.lua", "set_status.lua", "grant.lua")}) == 1


def test_recharge_trigger_copies_are_identical() -> None:
    def trigger(name: str) -> str:
        text = importlib.resources.files("enforcement").joinpath("lua", name).read_text()
        m = re.search(r"local function recharge_trigger.*?\nend\n", text, re.S)
        assert m, name
        return m.group(0)

    names = ("debit.lua", "credit.lua", "grant.lua", "recharge_settings.lua")
    assert len({trigger(n) for n in names}) == 1


def test_billing_copies_are_identical() -> None:
    def billing(name: str) -> str:
        text = importlib.resources.files("enforcement").joinpath("lua", name).read_text()
        start = text.index("-- Billing as metering/rating.py does it")
        return text[start : text.index("\nlocal call_id", start)]

    assert billing("reserve.lua") == billing("progress.lua")


def test_outbox_entries_decode_call_ids_holding_separators() -> None:
    from enforcement.balance import _decode_outbox

    (s,) = _decode_outbox([b"7|call.terminate|credit_exhausted|a|b|c|1795300000"])
    assert (s.seq, s.type, s.reason, s.call_id, s.terminate_at) == (
        7,
        "call.terminate",
        "credit_exhausted",
        "a|b|c",
        1795300000,
    )
    (h,) = _decode_outbox([b"3|account.hold|credit_exhausted"])
    assert (h.seq, h.type, h.reason, h.call_id) == (3, "account.hold", "credit_exhausted", None)
