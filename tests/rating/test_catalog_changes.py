"""The log of rating changes (issue 18, migration 0021): which accounts each change of rating
data touched, with the version it bumped to."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from balance.accounts import put_price_list
from infra.db import create_pool
from meter.traffic import demo_price_list

BG = "bg_0123456789abcdef"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url, max_size=6)
    try:
        await put_price_list(p, demo_price_list("standard"))
        await put_price_list(p, demo_price_list("other"))
        await p.execute(
            "INSERT INTO plans (id, included_s) VALUES ('basic', 0), ('p300', 18000),"
            " ('p600', 36000)"
        )
        yield p
    finally:
        await p.close()


async def accounts(pool: asyncpg.Pool, *rows: tuple[str, str | None, str | None]) -> None:
    """``(id, price_list_id, manager_id)`` accounts, plain rows (the catalog reads only these)."""
    await pool.executemany(
        "INSERT INTO accounts (id, price_list_id, manager_id) VALUES ($1, $2, $3)", rows
    )


async def version(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT version FROM rating_version"))


async def test_a_write_that_changes_nothing_rated_moves_nothing(pool: asyncpg.Pool) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None))
    await pool.execute(
        "INSERT INTO billing_groups (account_id, id, name) VALUES ('a', $1, 'Sales')", BG
    )
    await pool.execute(
        "INSERT INTO outbound_profiles (account_id, id, name, billing_group_id)"
        " VALUES ('a', 'p1', 'one', $1), ('a', 'p2', 'two', NULL)",
        BG,
    )
    v = await version(pool)
    # 0003's statement trigger bumped the version on this one
    await pool.execute("UPDATE accounts SET plan_id = plan_id, name = 'renamed'")
    await pool.execute("UPDATE accounts SET suspended = true WHERE id = 'b'")
    await pool.execute("UPDATE billing_groups SET name = 'Sales EU'")
    await pool.execute("UPDATE outbound_profiles SET name = 'renamed'")
    await pool.execute(
        "INSERT INTO outbound_profiles (account_id, id) VALUES ('a', 'p3')"
    )  # no group: not rated
    await pool.execute("DELETE FROM outbound_profiles WHERE id = 'p2'")
    assert await version(pool) == v
    assert await pool.fetchval("SELECT count(*) FROM rating_changes WHERE version > $1", v) == 0


async def test_one_statement_logs_once_and_each_transaction_takes_its_own_version(
    pool: asyncpg.Pool,
) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None), ("c", "other", None))
    v = await version(pool)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET plan_id = 'p300' WHERE id IN ('a', 'b')")
        async with conn.transaction():
            await conn.execute("UPDATE accounts SET plan_id = 'p600' WHERE id = 'a'")
            await conn.execute("UPDATE accounts SET plan_id = 'basic' WHERE id = 'c'")
        # the same session again: its version is never the last transaction's
        await conn.execute("UPDATE accounts SET plan_id = NULL WHERE id = 'b'")
        # a change rolled back to a savepoint takes its version back with it
        async with conn.transaction():
            with pytest.raises(asyncpg.CheckViolationError):
                async with conn.transaction():
                    await conn.execute("UPDATE accounts SET plan_id = 'basic' WHERE id = 'a'")
                    await conn.execute("UPDATE accounts SET credit_limit = -1 WHERE id = 'a'")
            await conn.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'c'")
    rows = await pool.fetch(
        "SELECT version - $1 AS v, account_id FROM rating_changes WHERE version > $1"
        " ORDER BY version, account_id",
        v,
    )
    assert [(r["v"], r["account_id"]) for r in rows] == [
        (1, "a"),
        (1, "b"),
        (2, "a"),
        (2, "c"),
        (3, "b"),
        (4, "c"),
    ]
    assert await version(pool) == v + 4
