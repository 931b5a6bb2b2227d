"""The contract of ``balance.protocol.BalanceStore``, run over every implementation on the test
session's real Redis: ``RedisBalances``, and ``CoalescingBalances`` as the API runs it.

What every consumer may rely on, whatever is behind the seam: each write is idempotent on its
id (event key, credit id, grant id, call id, undo id), outcomes come one per request in the
order given, an unknown account is an answer (never an error), and a failure is one of
``balance.errors``: ``OutcomeUnknown`` when Redis may have run the call, ``NotApplied`` when
its own answer says it did not. The scripts' finer rules (the state machine, minute buckets,
concurrency) are tested in ``tests/balance/test_balance.py`` and the rooms that use them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from balance import keys
from balance.coalesce import CoalescingBalances
from balance.errors import OutcomeUnknown, Refused
from balance.protocol import BalanceStore
from balance.store import RedisBalances
from balance.values import (
    CallProgress,
    Credit,
    Debit,
    Draw,
    PendingSignal,
    Provisional,
    ReservationRequest,
    StatusChange,
    Tariff,
    Undraw,
)

DAY_S = 86_400
TARIFF = Tariff(rate_per_min=60_000, connect_fee=0, initial_s=1, subsequent_s=1)
GRANT = {"grant_s": 300, "grace_s": 60, "max_s": 14_400}
IMPLEMENTATIONS = ["redis", "coalescing"]


def make(kind: str, client: aioredis.Redis, *, timeout_s: float = 5.0) -> BalanceStore:
    if kind == "redis":
        return RedisBalances(client)
    return CoalescingBalances(client, timeout_s=timeout_s)


def key(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


FP = b"f" * 8


@pytest.fixture
def now() -> int:
    return int(time.time())


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture(params=IMPLEMENTATIONS)
def store(request: pytest.FixtureRequest, redis: aioredis.Redis) -> BalanceStore:
    return make(request.param, redis)


async def test_an_account_is_created_once_and_read_back(store: BalanceStore) -> None:
    assert await store.create_account("a", balance=5_000, credit_limit=1_000, low_threshold=100)
    # Present already: left alone, whatever the new numbers say.
    assert not await store.create_account("a", balance=9, credit_limit=0, low_threshold=0)
    st = await store.get("a")
    assert st is not None
    assert (st.balance, st.reserved, st.credit_limit, st.low_threshold, st.status) == (
        5_000,
        0,
        1_000,
        100,
        "active",
    )
    assert st.available == 6_000
    assert await store.get("nobody") is None
    assert await store.balances(["a", "nobody"]) == {"a": 5_000, "nobody": None}
    assert await store.bucket("a") is None


async def test_debits_apply_once_per_event_key_one_outcome_per_account_in_order(
    store: BalanceStore, now: int
) -> None:
    day = now // DAY_S
    await store.create_account("a", balance=10_000, credit_limit=0, low_threshold=0)
    await store.create_account("b", balance=10_000, credit_limit=0, low_threshold=0)
    batch = {
        "b": [Debit(key(1), FP, 300, day)],
        "nobody": [Debit(key(2), FP, 100, day)],
        "a": [Debit(key(3), FP, 200, day), Debit(key(4), FP, 50, day)],
    }
    first = await store.apply_debits(batch, now)
    assert [(o.account_id, o.found, o.codes, o.balance) for o in first] == [
        ("b", True, "n", 9_700),
        ("nobody", False, "", 0),
        ("a", True, "nn", 9_750),
    ]
    again = await store.apply_debits(batch, now)  # as after OutcomeUnknown: the same ids
    assert [(o.codes, o.balance) for o in again] == [("d", 9_700), ("", 0), ("dd", 9_750)]
    assert await store.balances(["a", "b"]) == {"a": 9_750, "b": 9_700}


async def test_a_credit_applies_once_per_credit_id(store: BalanceStore) -> None:
    await store.create_account("a", balance=0, credit_limit=0, low_threshold=0)
    first = await store.credit("a", "pay-1", 2_000)
    assert (first.applied, first.balance, first.found) == (True, 2_000, True)
    again = await store.credit("a", "pay-1", 2_000)
    assert (again.applied, again.balance) == (False, 2_000)
    missing = await store.credit("nobody", "pay-1", 2_000)
    assert (missing.found, missing.applied, missing.status) == (False, False, "")
    many = await store.credit_many(
        [Credit("a", "pay-2", 500), Credit("a", "pay-1", 2_000), Credit("x", "p", 1)]
    )
    assert [(c.applied, c.found) for c in many] == [(True, True), (False, True), (False, False)]
    assert await store.balances(["a"]) == {"a": 2_500}


async def test_a_grant_is_bought_once_and_whole_or_not_at_all(
    store: BalanceStore, now: int
) -> None:
    await store.create_account("a", balance=1_000, credit_limit=0, low_threshold=0)
    terms = {"seconds": 600, "valid_from": now - 10, "expires_at": now + DAY_S, "now_s": now}
    first = await store.grant_minutes("a", "g1", price=400, **terms)
    assert (first.result, first.balance) == ("applied", 600)
    assert (await store.grant_minutes("a", "g1", price=400, **terms)).result == "repeat"
    short = await store.grant_minutes("a", "g2", price=601, **terms)
    assert (short.result, short.balance) == ("insufficient_credit", 600)
    unknown = await store.grant_minutes("nobody", "g1", price=1, **terms)
    assert (unknown.result, unknown.status) == ("unknown_account", "")
    assert await store.bucket("a") is not None


async def test_seconds_drawn_are_given_back_once_per_event(store: BalanceStore, now: int) -> None:
    day = now // DAY_S
    await store.create_account("a", balance=1_000, credit_limit=0, low_threshold=0)
    await store.grant_minutes(
        "a", "g1", price=0, seconds=600, valid_from=now - 100, expires_at=now + DAY_S, now_s=now
    )
    (out,) = await store.apply_debits(
        {"a": [Debit(key(1), FP, 1_000, day, draw=Draw(60, 1_000, 0, now - 60))]}, now
    )
    assert out.draws == {0: (0, 60)}  # all of it from the bucket: no money
    undo = Undraw("a", key(1), day, 60, now - 60)
    assert await store.undraw_many([undo]) == [60]
    assert await store.undraw_many([undo]) == [0]
    assert await store.undraw_many([]) == []


async def test_a_reservation_is_idempotent_per_call_and_the_sweep_releases_it(
    store: BalanceStore, now: int
) -> None:
    await store.create_account("a", balance=60_000, credit_limit=0, low_threshold=0)
    r = await store.reserve("a", "c1", "inbound", TARIFF, now_s=now, **GRANT)
    assert (r.decision, r.reason, r.granted_s, r.reserved) == ("allow", "ok", 60, 60_000)
    assert await store.reserve("a", "c1", "inbound", TARIFF, now_s=now, **GRANT) == r
    denied = await store.reserve("nobody", "c1", "inbound", TARIFF, now_s=now, **GRANT)
    assert (denied.decision, denied.reason) == ("deny", "unknown_account")
    many = await store.reserve_many(
        [
            ReservationRequest("a", "c2", "outbound", TARIFF),
            ReservationRequest("nobody", "c3", "outbound", TARIFF),
        ],
        now_s=now,
        **GRANT,
    )
    assert [(m.decision, m.reason) for m in many] == [
        ("deny", "insufficient_credit"),
        ("deny", "unknown_account"),
    ]
    assert await store.sweep_expired(now_s=now + 10) == []
    # the hangup never came: what it held is charged, provisionally (a late hangup settles it)
    assert await store.sweep_expired(now_s=r.expires_at + 1) == [
        Provisional("a", "c1", 60_000, 0, r.expires_at + 1, True)
    ]
    st = await store.get("a")
    assert st is not None and st.reserved == 0 and st.balance == 0


async def test_progress_extends_a_reservation_and_ignores_an_unknown_call(
    store: BalanceStore, now: int
) -> None:
    await store.create_account("a", balance=600_000, credit_limit=0, low_threshold=0)
    await store.reserve("a", "c1", "inbound", TARIFF, now_s=now, **GRANT)
    done = await store.progress(
        [CallProgress("a", "c1", now, 290), CallProgress("a", "nope", now, 10)], now_s=now, **GRANT
    )
    assert [(p.outcome, p.until) for p in done] == [("extended", 590), ("none", 0)]


async def test_a_status_change_queues_its_signal_until_it_is_acked(store: BalanceStore) -> None:
    await store.create_account("a", balance=1_000, credit_limit=0, low_threshold=0)
    assert await store.set_status("a", "suspend", "operator") == StatusChange(True, "suspended")
    assert await store.set_status("a", "suspend", "operator") == StatusChange(False, "suspended")
    assert await store.set_status("nobody", "suspend", "operator") is None
    pending = await store.pending_outboxes()
    assert pending.get("nobody", []) == []  # marked (before the script), with nothing queued
    (signal,) = pending["a"]
    assert isinstance(signal, PendingSignal)
    assert (signal.type, signal.reason) == ("account.suspend", "operator")
    await store.ack_outbox({"a": signal.seq})
    await store.clear_outbox_pending(list(pending))
    assert await store.pending_outboxes() == {}


async def test_auto_recharge_fires_once_at_or_below_its_threshold(store: BalanceStore) -> None:
    await store.create_account("a", balance=1_000, credit_limit=0, low_threshold=0)
    assert await store.set_auto_recharge("nobody", 5_000) is None
    assert await store.set_auto_recharge("a", 500) == 0  # above it: nothing fired
    seq = await store.set_auto_recharge("a", 5_000)
    assert seq is not None and seq > 0
    assert not await store.close_recharge_trigger("a", seq + 1)  # not the open one
    assert await store.close_recharge_trigger("a", seq)
    assert not await store.close_recharge_trigger("a", seq)


# -- failures ------------------------------------------------------------------------------

#: One write of each kind; every one must fail with the store's errors only.
WRITES: dict[str, Callable[[BalanceStore, int], Awaitable[object]]] = {
    "debit": lambda s, now: s.apply_debits({"a": [Debit(key(1), FP, 1, now // DAY_S)]}, now),
    "credit": lambda s, now: s.credit("a", "c", 1),
    "credit_many": lambda s, now: s.credit_many([Credit("a", "c", 1)]),
    "grant": lambda s, now: s.grant_minutes(
        "a", "g", price=1, seconds=60, valid_from=now, expires_at=now + 60, now_s=now
    ),
    "reserve": lambda s, now: s.reserve("a", "c1", "inbound", TARIFF, now_s=now, **GRANT),
    "progress": lambda s, now: s.progress([CallProgress("a", "c1", now, 10)], now_s=now, **GRANT),
    "set_status": lambda s, now: s.set_status("a", "hold", "operator"),
    "create": lambda s, now: s.create_account("a", balance=1, credit_limit=0, low_threshold=0),
}


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
async def test_a_redis_that_never_answers_is_an_unknown_outcome_for_every_write(
    kind: str, now: int
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def swallow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, never answer: the request went out

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # No client-side retry, so each call is one attempt (the store adds none of its own).
    r = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{port}/0", socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        store = make(kind, r, timeout_s=0.2)
        for write in WRITES.values():
            with pytest.raises(OutcomeUnknown):
                await write(store, now)
    finally:
        await r.aclose()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_an_error_reply_is_refused_not_unknown(
    store: BalanceStore, redis: aioredis.Redis, now: int
) -> None:
    # Keys of the wrong type make every script touching them answer an error.
    await redis.set(keys.account("a"), "not a hash")
    await redis.set(keys.reservations("a"), "not a hash")
    for name, write in WRITES.items():
        if name == "create":
            continue  # it only looks whether the account's key exists: it does
        with pytest.raises(Refused):
            await write(store, now)
    with pytest.raises(Refused):
        await store.get("a")


async def test_scripts_redis_lost_are_loaded_again(
    store: BalanceStore, redis: aioredis.Redis, now: int
) -> None:
    await store.create_account("a", balance=1_000, credit_limit=0, low_threshold=0)
    await redis.script_flush()
    (out,) = await store.apply_debits({"a": [Debit(key(1), FP, 100, now // DAY_S)]}, now)
    assert out.balance == 900
    await redis.script_flush()
    assert (await store.credit("a", "c1", 50)).balance == 950
    await redis.script_flush()
    r = await store.reserve("a", "c1", "inbound", TARIFF, now_s=now, **GRANT)
    assert r.decision == "allow"
