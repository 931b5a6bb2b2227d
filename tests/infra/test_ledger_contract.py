"""The contract of the ``Ledger`` Protocol, run against every implementation (today one: the
PostgreSQL book of record, on a fresh copy of the test template database).

What a caller relies on: every write is idempotent on its event key; a write that takes the
caller's connection commits or rolls back with the caller's transaction; the sums are what
the Redis balance must equal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from infra.db import create_pool
from infra.ledger import (
    Conn,
    Ledger,
    PostgresLedger,
    SignalRow,
    Unsettled,
    UsageRow,
    credit_key,
    event_key,
    provisional_row,
)

T0 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url)
    yield p
    await p.close()


@pytest.fixture(params=["postgres"])
def ledger(request: pytest.FixtureRequest, pool: asyncpg.Pool) -> Ledger:
    # A fake joins the params here, and so runs this same suite, the day a test needs one.
    assert request.param == "postgres"
    return PostgresLedger(pool)


def usage(account: str, call_id: str, amount: int, *, fingerprint: bytes = b"f") -> UsageRow:
    return (
        event_key("urn:test", call_id),
        account,
        "call",
        amount,
        60,
        call_id,
        "standard:44",
        T0,
        "urn:test",
        call_id,
        fingerprint,
        0,
        "",
        "outbound",
        "+14155550100",
        "+442071234567",
    )


async def rows(pool: asyncpg.Pool, account: str) -> list[tuple[str, int, str]]:
    """The account's rows as (kind, amount, ref), in the order they were written."""
    got = await pool.fetch(
        "SELECT kind, amount, ref FROM ledger WHERE account_id = $1 ORDER BY entry_id", account
    )
    return [(r["kind"], r["amount"], r["ref"]) for r in got]


# -- usage ---------------------------------------------------------------------------------------


async def test_fresh_usage_is_written_once_and_a_second_write_reports_the_rows_it_had(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    batch = [usage("a", "c1", -100), usage("a", "c2", -200)]
    assert await ledger.write_usage(batch) == set()
    # Redis lost its memory and applied c2 again, next to a new c3: only c2 is reported back.
    again = [usage("a", "c2", -200), usage("a", "c3", -300)]
    assert await ledger.write_usage(again) == {event_key("urn:test", "c2")}
    assert await rows(pool, "a") == [
        ("call", -100, "c1"),
        ("call", -200, "c2"),
        ("call", -300, "c3"),
    ]


async def test_replayed_usage_is_written_if_missing_and_never_twice(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    await ledger.write_usage([usage("a", "c1", -100)])
    assert await ledger.write_usage([], [usage("a", "c1", -100), usage("a", "c2", -50)]) == set()
    assert await ledger.write_usage([], [usage("a", "c2", -50)]) == set()
    assert await ledger.balances(["a"]) == {"a": -150}


async def test_signals_are_recorded_once_and_the_last_seq_is_the_highest(
    ledger: Ledger,
) -> None:
    s1, s2 = SignalRow("a", 1, "account.low", "low"), SignalRow("a", 2, "account.hold", "x")
    await ledger.write_usage([usage("a", "c1", -1)], signals=[s1, s2])
    await ledger.write_usage([], signals=[s1])  # a replay of the same batch
    assert await ledger.last_seq(["a", "b"]) == {"a": 2}


async def test_existing_answers_the_keys_held_with_their_fingerprints(ledger: Ledger) -> None:
    await ledger.write_usage([usage("a", "c1", -1, fingerprint=b"\x01\x02")])
    known = await ledger.existing([event_key("urn:test", "c1"), event_key("urn:test", "c9")])
    assert known == {event_key("urn:test", "c1"): b"\x01\x02"}
    assert await ledger.existing([]) == {}


async def test_unsettled_lists_provisional_charges_without_their_settlement(
    ledger: Ledger,
) -> None:
    charged_at = T0 + timedelta(minutes=6)

    def prov(account: str, call: str, *, settle: bool, at: datetime = charged_at) -> UsageRow:
        return provisional_row(account, call, charged=900, held_s=0, at=at, settle=settle)

    await ledger.write_usage(
        [],
        [
            prov("a", "open", settle=False),
            prov("a", "done", settle=False),
            prov("a", "done", settle=True, at=T0),  # settled by a hangup stamped earlier
            prov("a", "old", settle=False, at=T0 - timedelta(days=3)),
            prov("b", "open", settle=False),
        ],
    )
    at = int(charged_at.timestamp())
    got = await ledger.unsettled([("a", "open"), ("a", "done"), ("a", "none"), ("a", "open")])
    assert got == [Unsettled("a", "open", 900, at)]
    assert await ledger.unsettled([]) == []
    since = await ledger.unsettled_since(["a", "c"], T0 - timedelta(days=1))
    assert since == [Unsettled("a", "open", 900, at)]
    assert await ledger.unsettled_since([], T0) == []


# -- rows that are not usage ---------------------------------------------------------------------


async def test_an_opening_balance_is_written_once_per_account(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        assert await ledger.record_openings(conn, {"a": 5_000_000, "b": 0}, T0) == 2
    async with pool.acquire() as conn, conn.transaction():
        assert await ledger.record_openings(conn, {"a": 9_000_000, "c": 1}, T0) == 1
        assert await ledger.record_openings(conn, {}, T0) == 0
    assert await rows(pool, "a") == [("opening", 5_000_000, "opening")]
    assert await ledger.balances() == {"a": 5_000_000, "b": 0, "c": 1}


async def test_a_bundle_is_a_debit_of_its_price_once_per_purchase(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    async def buy(conn: Conn, account_id: str) -> bool:
        return await ledger.record_bundle(
            conn,
            account_id=account_id,
            purchase_id="p1",
            bundle_id="eu100",
            price=2_500_000,
            seconds=6000,
            valid_from=T0,
        )

    async with pool.acquire() as conn, conn.transaction():
        assert await buy(conn, "a")
        assert not await buy(conn, "a")
        assert await buy(conn, "b")  # purchase ids are the caller's, unique per account
    got = await pool.fetchrow("SELECT * FROM ledger WHERE account_id = 'a'")
    assert got is not None
    assert (got["kind"], got["amount"], got["quantity"], got["rate_ref"]) == (
        "bundle",
        -2_500_000,
        6000,
        "eu100",
    )
    assert got["event_key"] == credit_key("a", "bundle:p1")
    assert await ledger.balances(["a", "b"]) == {"a": -2_500_000, "b": -2_500_000}


async def test_a_payment_is_a_credit_of_what_was_captured_once_per_payment(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        first = await ledger.record_payment(
            conn, account_id="a", payment_id="p1", captured=19_990_000, gateway_ref="s:ch_1", at=T0
        )
        # a second settlement of the same payment (another process, a retry) adds nothing
        again = await ledger.record_payment(
            conn, account_id="a", payment_id="p1", captured=20_000_000, gateway_ref="s:ch_1", at=T0
        )
    assert (first, again) == (True, False)
    assert await rows(pool, "a") == [("credit", 19_990_000, "p1")]
    got = await pool.fetchrow("SELECT event_key, rate_ref FROM ledger WHERE account_id = 'a'")
    assert got is not None and tuple(got) == (credit_key("a", "payment:p1"), "s:ch_1")


async def test_a_payment_and_a_bundle_with_one_id_are_two_rows(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await ledger.record_payment(
            conn, account_id="a", payment_id="x1", captured=10, gateway_ref="s:1", at=T0
        )
        await ledger.record_bundle(
            conn,
            account_id="a",
            purchase_id="x1",
            bundle_id="b",
            price=4,
            seconds=60,
            valid_from=T0,
        )
    assert await ledger.balances(["a"]) == {"a": 6}


async def test_writes_in_the_callers_transaction_roll_back_with_it(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await ledger.record_openings(conn, {"a": 1}, T0)
            await ledger.record_bundle(
                conn,
                account_id="a",
                purchase_id="p",
                bundle_id="b",
                price=1,
                seconds=60,
                valid_from=T0,
            )
            await ledger.record_payment(
                conn, account_id="a", payment_id="p", captured=1, gateway_ref="s:1", at=T0
            )
            raise RuntimeError("the caller's own write failed")
    assert await rows(pool, "a") == []
    # nothing was left behind to make the caller's retry a no-op
    async with pool.acquire() as conn, conn.transaction():
        assert await ledger.record_openings(conn, {"a": 1}, T0) == 1


# -- sums ----------------------------------------------------------------------------------------


async def test_balances_sum_every_kind_of_row_per_account(
    ledger: Ledger, pool: asyncpg.Pool
) -> None:
    await ledger.write_usage([usage("a", "c1", -300), usage("b", "c2", -7)])
    async with pool.acquire() as conn, conn.transaction():
        await ledger.record_openings(conn, {"a": 1_000, "b": 10}, T0)
        await ledger.record_payment(
            conn, account_id="a", payment_id="p", captured=500, gateway_ref="s:1", at=T0
        )
    assert await ledger.balances(["a"]) == {"a": 1_200}
    assert await ledger.balances(["a", "b", "nobody"]) == {"a": 1_200, "b": 3}
    assert await ledger.balances() == {"a": 1_200, "b": 3}
    assert await ledger.balances([]) == {}
