"""Fine-grained invalidation of the rating catalog (issue 18): a change drops the accounts it
changed (logged in ``rating_changes`` by migration 0021's triggers), re-binds the accounts on a
reloaded price list or a changed plan, and forgets everything only when the log cannot say
what changed. An account the catalog keeps is the very object it held (``is``), so a test
tells "kept" from "re-read with the same values"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from balance.accounts import put_price_list
from infra.db import create_pool
from meter.traffic import demo_price_list
from rating import catalog as catalog_module
from rating.catalog import AccountRating, Catalog, prune_changes
from rating.pricelists import add_price_version

BG = "bg_0123456789abcdef"
BG2 = "bg_fedcba9876543210"


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


async def cached(catalog: Catalog, *ids: str) -> dict[str, AccountRating]:
    """Resolve ``ids`` (a version check first: the catalogs here check at every resolve) and
    return what the catalog holds for each."""
    await catalog.resolve(ids)
    out = {}
    for a in ids:
        r = catalog.get(a)
        assert r is not None, a
        out[a] = r
    return out


def plan_of(r: AccountRating) -> str | None:
    return r.plan.id if r.plan else None


async def new_catalog(pool: asyncpg.Pool, **kw: Any) -> Catalog:
    catalog = Catalog(pool, check_interval_s=0, **kw)
    await catalog.refresh()
    return catalog


async def version(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT version FROM rating_version"))


async def test_another_accounts_plan_change_keeps_the_cached_accounts(
    pool: asyncpg.Pool,
) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None), ("c", "other", None))
    catalog = await new_catalog(pool)
    before = await cached(catalog, "a", "b", "c")
    assert before["a"].plan is None
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'a'")
    after = await cached(catalog, "a", "b", "c")
    assert catalog.version == await version(pool) > 1
    assert after["b"] is before["b"] and after["c"] is before["c"]  # not re-read
    plan = after["a"].plan
    assert after["a"] is not before["a"] and plan is not None and plan.included_s == 18000
    # and its price list, read again, is the catalog's one object, not a copy
    assert after["a"].price_list is before["b"].price_list
    await pool.execute("UPDATE accounts SET price_list_id = 'other' WHERE id = 'a'")
    again = await cached(catalog, "a", "b", "c")
    assert again["a"].price_list.id == "other" and again["a"].price_list is again["c"].price_list
    assert again["b"] is before["b"] and again["c"] is before["c"]


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


async def test_a_group_change_of_another_account_keeps_the_cached_accounts(
    pool: asyncpg.Pool,
) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None))
    catalog = await new_catalog(pool)
    before = await cached(catalog, "a", "b")
    assert before["a"].groups is None
    await pool.execute(
        "INSERT INTO billing_groups (account_id, id, name) VALUES ('a', $1, 'Sales'),"
        " ('a', $2, 'Support')",
        BG,
        BG2,
    )
    after = await cached(catalog, "a", "b")
    assert after["b"] is before["b"]
    groups = after["a"].groups
    assert groups is not None and groups.known == {BG, BG2} and not groups.numbers
    # a number assigned to a group: a's numbers read again, b kept
    await pool.execute(
        "INSERT INTO number_groups (account_id, number, billing_group_id)"
        " VALUES ('a', '+14155550100', $1)",
        BG,
    )
    numbered = await cached(catalog, "a", "b")
    assert numbered["b"] is before["b"]
    groups = numbered["a"].groups
    assert groups is not None and groups.of_message("+14155550100") == BG
    # moved to another group
    await pool.execute("UPDATE number_groups SET billing_group_id = $1", BG2)
    moved = await cached(catalog, "a", "b")
    groups = moved["a"].groups
    assert groups is not None and groups.of_message("+14155550100") == BG2
    # an outbound profile with a group, then its group taken away
    await pool.execute(
        "INSERT INTO outbound_profiles (account_id, id, billing_group_id) VALUES ('a', 'p1', $1)",
        BG,
    )
    profiled = await cached(catalog, "a", "b")
    groups = profiled["a"].groups
    assert groups is not None and groups.of_call("outbound", "+1", "+2", "p1") == BG
    await pool.execute("UPDATE outbound_profiles SET billing_group_id = NULL")
    unprofiled = await cached(catalog, "a", "b")
    groups = unprofiled["a"].groups
    assert groups is not None and groups.of_call("outbound", "+1", "+2", "p1") == ""
    # every group gone: no groups at all
    await pool.execute("DELETE FROM outbound_profiles")
    await pool.execute("DELETE FROM number_groups")
    await pool.execute("DELETE FROM billing_groups")
    gone = await cached(catalog, "a", "b")
    assert gone["a"].groups is None and gone["b"] is before["b"]


async def test_a_managers_new_price_list_reaches_the_accounts_that_inherit_it(
    pool: asyncpg.Pool,
) -> None:
    await accounts(
        pool,
        ("boss", "standard", None),
        ("boss2", "standard", None),
        ("unrelated", "standard", None),
    )
    await accounts(
        pool,
        ("sub_1", None, "boss"),  # inherits boss's
        ("sub_2", "standard", "boss"),  # has its own
        ("sub_3", None, "boss2"),  # another manager's
    )
    ids = ("boss", "boss2", "unrelated", "sub_1", "sub_2", "sub_3")
    catalog = await new_catalog(pool)
    before = await cached(catalog, *ids)
    assert (before["sub_1"].price_list.id, before["sub_1"].inherited) == ("standard", True)
    await pool.execute("UPDATE accounts SET price_list_id = 'other' WHERE id = 'boss'")
    after = await cached(catalog, *ids)
    assert (after["boss"].price_list.id, after["boss"].inherited) == ("other", False)
    assert (after["sub_1"].price_list.id, after["sub_1"].inherited) == ("other", True)
    for kept in ("boss2", "unrelated", "sub_2", "sub_3"):
        assert after[kept] is before[kept], kept
    # a managed account moved to another manager, and one given a list of its own
    await pool.execute("UPDATE accounts SET manager_id = 'boss2' WHERE id = 'sub_1'")
    await pool.execute("UPDATE accounts SET price_list_id = 'other' WHERE id = 'sub_3'")
    moved = await cached(catalog, *ids)
    assert (moved["sub_1"].price_list.id, moved["sub_1"].inherited) == ("standard", True)
    assert (moved["sub_3"].price_list.id, moved["sub_3"].inherited) == ("other", False)
    assert moved["sub_2"] is before["sub_2"] and moved["unrelated"] is before["unrelated"]


async def test_a_price_list_edit_rebinds_exactly_the_accounts_on_it(pool: asyncpg.Pool) -> None:
    await accounts(pool, ("s1", "standard", None), ("s2", "standard", None))
    await accounts(pool, ("o1", "other", None), ("m1", None, "s1"))
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 's2'")
    ids = ("s1", "s2", "o1", "m1")
    catalog = await new_catalog(pool)
    before = await cached(catalog, *ids)
    old = before["s1"].price_list
    await add_price_version(
        pool, "standard", datetime.now(UTC) - timedelta(hours=1), sms_per_part=9_000
    )
    after = await cached(catalog, *ids)
    assert after["o1"] is before["o1"]  # on the other list: untouched
    new = after["s1"].price_list
    assert new is not old and new.version == old.version + 1
    for a in ("s1", "s2", "m1"):
        r, was = after[a], before[a]
        assert r is not was and r.price_list is new, a
        assert (r.plan, r.inherited, r.groups) == (was.plan, was.inherited, was.groups), a
    assert after["m1"].inherited and after["s2"].plan is before["s2"].plan
    # a plan's allowance changed: its accounts re-bound to it, the others kept
    await pool.execute("UPDATE plans SET included_s = 600 WHERE id = 'p300'")
    replanned = await cached(catalog, *ids)
    plan = replanned["s2"].plan
    assert plan is not None and plan.included_s == 600
    assert replanned["s2"].price_list is new
    for a in ("s1", "o1", "m1"):
        assert replanned[a] is after[a], a
    # a change of a plan's other columns (not rated) re-binds nobody
    await pool.execute("UPDATE plans SET name = 'Three hundred' WHERE id = 'p300'")
    renamed = await cached(catalog, *ids)
    assert all(renamed[a] is replanned[a] for a in ids)


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


async def test_concurrent_changes_are_versioned_in_commit_order_and_never_missed(
    pool: asyncpg.Pool,
) -> None:
    """Two transactions change rating data at once, the second trying to commit first; a
    catalog checks between each step. Each change is seen, by its version, once committed."""
    await accounts(pool, ("a", "standard", None), ("b", "standard", None), ("c", "other", None))
    catalog = await new_catalog(pool)
    before = await cached(catalog, "a", "b", "c")
    first = await pool.acquire()
    second = await pool.acquire()
    try:
        t1 = first.transaction()
        await t1.start()
        await first.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'a'")

        async def change_b() -> None:
            async with second.transaction():
                await second.execute("UPDATE accounts SET plan_id = 'p600' WHERE id = 'b'")

        t2 = asyncio.create_task(change_b())
        # Give the second every chance to commit first: it cannot, it waits for the first.
        await asyncio.wait({t2}, timeout=0.5)
        blocked = not t2.done()
        mid = await cached(catalog, "a", "b", "c")
        assert mid["a"] is before["a"] and mid["c"] is before["c"]  # nothing committed yet
        await t1.commit()
        await asyncio.wait_for(t2, 10)
        after = await cached(catalog, "a", "b", "c")
    finally:
        await pool.release(first)
        await pool.release(second)
    plans = {a: plan_of(r) for a, r in after.items()}
    assert plans == {"a": "p300", "b": "p600", "c": None}  # neither change missed
    assert after["c"] is before["c"]
    assert blocked  # the second waited for the first: it could not commit first
    logged = await pool.fetch("SELECT account_id FROM rating_changes ORDER BY version")
    assert [r[0] for r in logged] == ["a", "b"]  # versions in commit order


async def test_pruning_deletes_old_changes_and_records_how_far(pool: asyncpg.Pool) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None))
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'a'")
    old = await version(pool)
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'b'")
    # a's change made two hours ago by PostgreSQL's clock
    await pool.execute(
        "UPDATE rating_changes SET changed_at = now() - interval '2 hours' WHERE version = $1", old
    )
    pruned = await asyncio.gather(*(prune_changes(pool, 3600) for _ in range(3)))
    assert pruned == [old, old, old]  # idempotent, concurrent or not
    assert await pool.fetchval("SELECT version FROM rating_changes_pruned") == old
    assert [r[0] for r in await pool.fetch("SELECT account_id FROM rating_changes")] == ["b"]
    # nothing old enough: the recorded version never goes back
    assert await prune_changes(pool, 3600) == old
    assert await pool.fetchval("SELECT count(*) FROM rating_changes") == 1


async def test_a_catalog_prunes_from_its_check(pool: asyncpg.Pool) -> None:
    await accounts(pool, ("a", "standard", None))
    catalog = await new_catalog(pool, prune_interval_s=0, changes_kept_s=3600)
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'a'")
    await pool.execute("UPDATE rating_changes SET changed_at = now() - interval '2 hours'")
    await pool.execute("UPDATE accounts SET plan_id = 'p600' WHERE id = 'a'")
    await cached(catalog, "a")
    assert await pool.fetchval("SELECT count(*) FROM rating_changes") == 1
    assert await pool.fetchval("SELECT version FROM rating_changes_pruned") == (
        await version(pool) - 1
    )


async def test_a_catalog_behind_the_pruned_changes_forgets_everything(
    pool: asyncpg.Pool,
) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None))
    catalog = await new_catalog(pool)
    before = await cached(catalog, "a", "b")
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'a'")
    await prune_changes(pool, 0)  # a's change is gone from the log before the catalog read it
    assert await pool.fetchval("SELECT count(*) FROM rating_changes") == 0
    after = await cached(catalog, "a", "b")
    assert plan_of(after["a"]) == "p300"
    assert after["b"] is not before["b"]  # forgotten with the rest, read again
    # level with the log again: fine-grained from here
    await pool.execute("UPDATE accounts SET plan_id = 'p600' WHERE id = 'a'")
    again = await cached(catalog, "a", "b")
    assert again["b"] is after["b"] and plan_of(again["a"]) == "p600"


async def test_more_changes_than_max_changes_forget_everything(pool: asyncpg.Pool) -> None:
    await accounts(pool, ("a", "standard", None), ("b", "standard", None), ("c", "other", None))
    catalog = await new_catalog(pool, max_changes=1)
    before = await cached(catalog, "a", "b", "c")
    await pool.execute("UPDATE accounts SET plan_id = 'p300' WHERE id = 'a'")
    one = await cached(catalog, "a", "b", "c")
    assert one["b"] is before["b"]  # one change: within the bound
    await pool.execute("UPDATE accounts SET plan_id = 'p600' WHERE id IN ('a', 'b')")
    two = await cached(catalog, "a", "b", "c")
    assert two["c"] is not before["c"]  # two: everything read again
    assert [plan_of(two[a]) for a in ("a", "b", "c")] == ["p600", "p600", None]


async def test_a_rebinding_cancelled_half_way_leaves_no_account_on_the_old_list(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-binding gives the event loop a turn (here after every account): a caller's
    deadline can cancel it there. What it did not re-bind yet is forgotten, never left on a
    price list that no later check would find stale."""
    ids = [f"s{i}" for i in range(5)]
    await accounts(pool, *((a, "standard", None) for a in ids))
    monkeypatch.setattr(catalog_module, "_REBIND_CHUNK", 1)
    rebinding = asyncio.Event()
    rebind = Catalog._rebind

    async def announced(self: Catalog, lists: set[str], plans: set[str]) -> None:
        rebinding.set()  # its waiter runs at the first turn the re-binding gives
        await rebind(self, lists, plans)

    monkeypatch.setattr(Catalog, "_rebind", announced)
    catalog = await new_catalog(pool)
    before = await cached(catalog, *ids)
    old = before["s0"].price_list
    await add_price_version(
        pool, "standard", datetime.now(UTC) - timedelta(hours=1), sms_per_part=9_000
    )
    task = asyncio.create_task(catalog.resolve(ids))
    await asyncio.wait_for(rebinding.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [a for a in ids if (r := catalog.get(a)) is not None and r.price_list is old]
    after = await cached(catalog, *ids)
    assert {r.price_list.version for r in after.values()} == {old.version + 1}
