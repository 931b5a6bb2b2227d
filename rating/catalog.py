"""Price lists and plans by account, read from PostgreSQL for the hot path and the API.

The processor asks ``resolve`` for the accounts of each batch; accounts it has not seen are
fetched in one query, and unknown ones are remembered briefly so a flood of events for a
non-existent account does not become a flood of queries. The metering worker reads accounts
ahead at start (``preload``): at a million accounts a batch's accounts are mostly new to a
worker otherwise, and reading them a batch at a time cost about 22 us an account (measured,
docs/design/scale-out.md) where reading them ahead costs about 9. The cache holds at most
``max_accounts``; past it, the accounts read longest ago are dropped, never one of the batch
being resolved. Billing groups are read only for the accounts that have some (their set is
read with the version).

New price lists, plans and account changes are picked up without a restart: at most once per
``check_interval_s``, ``resolve`` reads one counter (``rating_version``, bumped by triggers,
see migrations 0003 and 0021). Never a query per event. When it moved, the catalog reads the
accounts that changed since its version (``rating_changes``: an account's price list, manager
or plan, its billing groups, numbers' and outbound profiles' groups, and the managed accounts
that inherit a manager's changed price list) and drops only those (and from the accounts
remembered absent): they are read again at their next batch. It reloads the price lists whose
own version moved and the plans, and re-binds the cached accounts on a reloaded list or a
changed plan to the new one (one pass over the cache, about 3 us an account re-bound here; the
others cost a comparison), and it reads the set of accounts with billing groups again. So a
change costs the accounts it changed, not the whole cache (issue 18: at a million accounts,
one plan change used to make a worker read them all again, about 22 us each).

Migration 0021 says why reading the changes with a version up to the one just read never
misses one committed later: versions are taken in commit order. The catalog reads the version,
the pruned version and the changes in one snapshot, and forgets every account instead (correct,
only slower) when the log cannot say what changed: its version is below the highest pruned
(the rows are kept an hour by PostgreSQL's clock; each catalog prunes at most every
``prune_interval_s``, any number of them at once), more than ``max_changes`` accounts changed
(a bulk update: the check never reads an unbounded list under its lock), the counter went back (a
restored database), or a re-binding was cancelled half way. Accounts created after a lookup
are not logged: one remembered absent is read again after ``negative_ttl_s``, as before.

``lookup`` is for a caller with a deadline (the authorize API): a cached account is answered
without waiting for PostgreSQL (a due version check runs in the background meanwhile), and an
account not cached is read by one query per account at a time, in a task of its own bounded by
``lookup_timeout_s``, so a caller that stops waiting neither cancels it for the others nor waits
for asyncpg to cancel the query on a stalled server.

A managed account without a price list of its own is rated with its manager's. Callers that
show prices (the HTTP API) must not show a managed account its manager's price list:
``AccountRating.inherited`` says when that is the case.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import asyncpg

from infra.singleflight import SingleFlight
from rating.groups import Groups
from rating.plans import Plan
from rating.pricelists import load_price_lists, price_list_versions
from rating.rating import PriceList


@dataclass(frozen=True, slots=True)
class AccountRating:
    account_id: str
    price_list: PriceList
    plan: Plan | None = None  # None: pay as you go
    inherited: bool = False  # the price list is the manager's: never show it to this account
    groups: Groups | None = None  # None: the account has no billing groups


@dataclass(frozen=True, slots=True)
class Changes:
    """What ``rating_changes`` says changed: the version read, and the accounts changed up to
    it (None: the log cannot say, forget every account)."""

    version: int
    accounts: frozenset[str] | None


async def prune_changes(pool: asyncpg.Pool, kept_s: float) -> int:
    """Delete the ``rating_changes`` rows older than ``kept_s`` (by PostgreSQL's clock) and
    record the highest version deleted, in one transaction; returns that version. Several
    processes may run it at once: the recorded version only rises, and the delete is of the
    versions up to it, which are all committed (migration 0021)."""
    async with pool.acquire() as conn, conn.transaction():
        pruned = await conn.fetchval(
            "UPDATE rating_changes_pruned SET version = greatest(version, coalesce("
            " (SELECT max(version) FROM rating_changes"
            "  WHERE changed_at < now() - make_interval(secs => $1)), 0))"
            " RETURNING version",
            kept_s,
        )
        await conn.execute("DELETE FROM rating_changes WHERE version <= $1", pruned)
    return int(pruned)


async def load_plans(pool: asyncpg.Pool) -> dict[str, Plan]:
    return {
        r["id"]: Plan(r["id"], r["included_s"]) for r in await pool.fetch("SELECT * FROM plans")
    }


async def grouped_accounts(pool: asyncpg.Pool) -> frozenset[str]:
    """The accounts that have billing groups (few: an account has none until it makes one)."""
    return frozenset(
        r[0] for r in await pool.fetch("SELECT DISTINCT account_id FROM billing_groups")
    )


async def _load_groups(pool: asyncpg.Pool, account_ids: list[str]) -> dict[str, Groups]:
    """The billing-group assignments of the accounts that have groups (three indexed reads)."""
    if not account_ids:
        return {}
    known: dict[str, set[str]] = {}
    for r in await pool.fetch(
        "SELECT account_id, id FROM billing_groups WHERE account_id = ANY($1::text[])",
        account_ids,
    ):
        known.setdefault(r["account_id"], set()).add(r["id"])
    if not known:
        return {}
    numbers: dict[str, dict[str, str]] = {a: {} for a in known}
    profiles: dict[str, dict[str, str]] = {a: {} for a in known}
    for r in await pool.fetch(
        "SELECT account_id, number, billing_group_id FROM number_groups"
        " WHERE account_id = ANY($1::text[])",
        list(known),
    ):
        numbers[r["account_id"]][r["number"]] = r["billing_group_id"]
    for r in await pool.fetch(
        "SELECT account_id, id, billing_group_id FROM outbound_profiles"
        " WHERE account_id = ANY($1::text[]) AND billing_group_id IS NOT NULL",
        list(known),
    ):
        profiles[r["account_id"]][r["id"]] = r["billing_group_id"]
    return {a: Groups(numbers[a], profiles[a], frozenset(g)) for a, g in known.items()}


#: Accounts re-bound between two turns of the event loop (``Catalog._rebind``).
_REBIND_CHUNK: Final = 20_000

#: An account's rating row: its price list (its manager's when it has none), whether that is
#: inherited, its plan.
_SELECT: Final = (
    "SELECT a.id, coalesce(a.price_list_id, m.price_list_id) AS price_list_id,"
    " a.price_list_id IS NULL AS inherited, a.plan_id"
    " FROM accounts a LEFT JOIN accounts m ON m.id = a.manager_id"
)


class Catalog:
    """Account -> price list, plan and billing groups, cached; what changed is re-read when the
    rating version moves."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        negative_ttl_s: float = 5.0,
        check_interval_s: float = 1.0,
        lookup_timeout_s: float = 2.0,
        max_accounts: int = 1_000_000,
        max_changes: int = 100_000,
        changes_kept_s: float = 3600.0,
        prune_interval_s: float = 300.0,
    ) -> None:
        if max_accounts < 1:
            raise ValueError("max_accounts must be >= 1")
        self._pool = pool
        self._max_accounts = max_accounts
        self._lists: dict[str, PriceList] = {}
        self._plans: dict[str, Plan] = {}
        #: the accounts with billing groups, read with the version: only theirs are fetched
        self._grouped: frozenset[str] = frozenset()
        self._accounts: dict[str, AccountRating] = {}
        self._unknown: dict[str, float] = {}
        self._negative_ttl_s = negative_ttl_s
        self._check_interval_s = check_interval_s
        self._next_check = 0.0
        #: more accounts changed than this since the last check: forget them all instead
        self._max_changes = max_changes
        self._changes_kept_s = changes_kept_s
        self._prune_interval_s = prune_interval_s
        # Not at the first check: a command that lives a few seconds never prunes.
        self._next_prune = time.monotonic() + prune_interval_s
        self._version = -1
        self._lock = asyncio.Lock()
        self._lookup_timeout_s = lookup_timeout_s
        self._lookups: SingleFlight[str, AccountRating | None] = SingleFlight("account lookup")
        self._checking: SingleFlight[None, None] = SingleFlight("catalog version check")

    @property
    def version(self) -> int:
        """The ``rating_version`` this catalog's contents reflect."""
        return self._version

    async def refresh(self) -> None:
        """Reload everything now."""
        async with self._lock:
            self._version = await self._read_version()
            self._lists = await load_price_lists(self._pool)
            self._plans = await load_plans(self._pool)
            self._grouped = await grouped_accounts(self._pool)
            self._forget()

    def get(self, account_id: str) -> AccountRating | None:
        return self._accounts.get(account_id)

    async def resolve(self, account_ids: Iterable[str]) -> None:
        """Fetch the accounts not cached yet (one query); unknown ones are cached as absent.

        Concurrent callers missing the same accounts wait for one query (the authorize API
        can get a thousand requests for a new account at once)."""
        if time.monotonic() >= self._next_check:
            await self._check()
        ids = set(account_ids)
        if not self._missing(ids):
            return
        async with self._lock:
            missing = self._missing(ids)
            if missing:
                await self._fetch(missing, ids)

    def cached(self, account_id: str) -> AccountRating | None:
        """The account's rating when it is cached and no version check is due, without
        waiting for anything; None: ask ``lookup``."""
        if time.monotonic() >= self._next_check:
            return None
        return self._accounts.get(account_id)

    async def lookup(self, account_id: str) -> AccountRating | None:
        """One account's rating (None: no such account), for a caller with a deadline: wrap
        the call in ``asyncio.timeout``; see the module docstring for what it waits for.

        Raises ``TimeoutError`` past ``lookup_timeout_s`` and asyncpg's errors when the
        account is not cached and PostgreSQL cannot be read."""
        if time.monotonic() >= self._next_check:
            self._checking.task(None, self._check_bounded)  # in the background, once at a time
        if not self._missing({account_id}):
            return self._accounts.get(account_id)
        # Shielded: a caller at its deadline stops waiting; the others still need the answer.
        task = self._lookups.task(account_id, lambda: self._lookup(account_id))
        return await asyncio.shield(task)

    async def _lookup(self, account_id: str) -> AccountRating | None:
        async with asyncio.timeout(self._lookup_timeout_s), self._lock:
            if self._missing({account_id}):
                await self._fetch([account_id], {account_id})
            # Read under the lock: a version check may forget the accounts once it is released.
            return self._accounts.get(account_id)

    async def _check_bounded(self) -> None:
        async with asyncio.timeout(self._lookup_timeout_s):
            await self._check()

    async def _check(self) -> None:
        async with self._lock:
            if time.monotonic() < self._next_check:
                return  # another caller checked while we waited
            self._next_check = time.monotonic() + self._check_interval_s
            # Read the version first: a change committed while we load is seen next time.
            if await self._read_version() != self._version:
                await self._catch_up()
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + self._prune_interval_s
                await prune_changes(self._pool, self._changes_kept_s)

    async def _catch_up(self) -> None:
        """Apply what changed since ``self._version``: drop the accounts logged as changed,
        re-bind the others to reloaded price lists and plans (or forget everything when the
        log no longer holds all the changes since our version)."""
        changed = await self._changed_since(self._version)
        version = changed.version
        known = {i: pl.version for i, pl in self._lists.items()}
        current = await price_list_versions(self._pool)
        stale = [i for i, v in current.items() if known.get(i) != v]
        lists = {i: pl for i, pl in self._lists.items() if i in current}
        if stale:
            lists.update(await load_price_lists(self._pool, stale))
        plans = await load_plans(self._pool)
        grouped = await grouped_accounts(self._pool)
        # Nothing is changed before every read is done: a failed read leaves it all as it was.
        moved_lists = {i for i in known if i not in lists or lists[i] is not self._lists[i]}
        moved_plans = {i for i, p in self._plans.items() if plans.get(i) != p}
        self._lists = lists
        self._plans = plans
        self._grouped = grouped
        self._version = version
        if changed.accounts is None:
            self._forget()
            return
        for a in changed.accounts:
            self._accounts.pop(a, None)
            self._unknown.pop(a, None)
        if moved_lists or moved_plans:
            try:
                await self._rebind(moved_lists, moved_plans)
            except BaseException:
                # Cancelled half way (a lookup's deadline): the accounts not re-bound yet hold
                # lists no longer ours, which no later check would find. Forget them all.
                self._forget()
                raise

    async def _rebind(self, moved_lists: set[str], moved_plans: set[str]) -> None:
        """Point the cached accounts on a reloaded price list or a changed plan at the new
        one, and drop those whose list or plan is gone: one pass over the cache, about 3 us an
        account re-bound (100,000 accounts on an edited list: 0.3 s here), giving the event loop a
        turn every ``_REBIND_CHUNK`` accounts. Under the lock: nothing else changes the cache
        meanwhile, and an account is never seen half re-bound (``get`` answers its old rating
        or its new one)."""
        lists, plans, accounts = self._lists, self._plans, self._accounts
        gone = []
        for n, (a, r) in enumerate(accounts.items(), 1):
            plist: PriceList | None = r.price_list
            plan = r.plan
            if r.price_list.id in moved_lists:
                plist = lists.get(r.price_list.id)
            if plan is not None and plan.id in moved_plans:
                plan = plans.get(plan.id)
                if plan is None:
                    plist = None  # deleted (an account naming it logs its own change)
            if plist is None:
                gone.append(a)
            elif plist is not r.price_list or plan is not r.plan:
                # The same key: its place in the order of eviction is kept, the size is too.
                accounts[a] = AccountRating(a, plist, plan, r.inherited, r.groups)
            if n % _REBIND_CHUNK == 0:
                await asyncio.sleep(0)
        for a in gone:
            del accounts[a]

    async def _changed_since(self, version: int) -> Changes:
        """The current version and the accounts changed after ``version`` up to it, from one
        snapshot (migration 0021: every change up to a version one reads is committed)."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(
                "SELECT v.version, p.version AS pruned"
                " FROM rating_version v, rating_changes_pruned p"
            )
            assert row is not None
            current = int(row["version"])
            if version < int(row["pruned"]) or current < version:
                # Some of the changes since ours are gone (or the counter went back: a
                # restored database), or this catalog never read the version.
                return Changes(current, None)
            rows = await conn.fetch(
                "SELECT DISTINCT account_id FROM rating_changes"
                " WHERE version > $1 AND version <= $2 LIMIT $3",
                version,
                current,
                self._max_changes + 1,
            )
        if len(rows) > self._max_changes:
            return Changes(current, None)
        return Changes(current, frozenset(r[0] for r in rows))

    def _forget(self) -> None:
        self._accounts = {}
        self._unknown.clear()

    async def _read_version(self) -> int:
        return int(await self._pool.fetchval("SELECT version FROM rating_version"))

    def _missing(self, ids: set[str]) -> list[str]:
        now = time.monotonic()
        return [a for a in ids if a not in self._accounts and self._unknown.get(a, 0.0) <= now]

    async def preload(self, *, page: int = 20_000) -> int:
        """Read the ratings of accounts now, up to the catalog's ``max_accounts`` (by id,
        ``page`` a query), so that a worker starts with them cached instead of reading each
        account at its first event (at a million accounts, most of a batch's accounts are new
        to it otherwise: measured in docs/design/scale-out.md). Returns how many it holds. A
        change of one of them drops it as it does any account (read again at its next event)."""
        async with self._lock:
            last = ""
            while len(self._accounts) < self._max_accounts:
                rows = await self._pool.fetch(
                    _SELECT + " WHERE a.id > $1 ORDER BY a.id LIMIT $2",
                    last,
                    min(page, self._max_accounts - len(self._accounts)),
                )
                if not rows:
                    break
                last = rows[-1]["id"]
                await self._store(rows)
            return len(self._accounts)

    def _make_room(self, n: int, keep: set[str]) -> None:
        """Drop the accounts read longest ago (a dict keeps its order of insertion) until ``n``
        more fit under ``max_accounts``, never one of ``keep`` (the caller's batch: it is rated
        with what ``resolve`` leaves cached)."""
        over = len(self._accounts) + n - self._max_accounts
        if over <= 0:
            return
        drop = []
        for a in self._accounts:
            if a not in keep:
                drop.append(a)
                if len(drop) == over:
                    break
        for a in drop:
            del self._accounts[a]

    async def _fetch(self, missing: list[str], keep: set[str]) -> None:
        now = time.monotonic()
        # In key order: the primary key's pages are then visited once each, in order (a batch
        # of a million accounts' events is thousands of accounts, each on a page of its own).
        missing.sort()
        rows = await self._pool.fetch(_SELECT + " WHERE a.id = ANY($1::text[])", missing)
        self._make_room(len(rows), keep)
        found = await self._store(rows)
        for a in missing:
            if a not in found:
                self._unknown[a] = now + self._negative_ttl_s

    async def _store(self, rows: list[asyncpg.Record]) -> set[str]:
        """Cache the ratings of ``rows`` (``_SELECT``'s); returns the ids cached."""
        # Groups are read only for the accounts that have some (the set comes with the
        # version: billing_groups' inserts and deletes move it), not for every new account.
        grouped = self._grouped
        groups = await _load_groups(self._pool, [r["id"] for r in rows if r["id"] in grouped])
        found = set()
        for r in rows:
            plist = self._lists.get(r["price_list_id"])
            if plist is None:  # a price list created after our last check
                self._lists.update(await load_price_lists(self._pool, [r["price_list_id"]]))
                plist = self._lists.get(r["price_list_id"])
                if plist is None:
                    continue
            plan = self._plans.get(r["plan_id"]) if r["plan_id"] else None
            if r["plan_id"] and plan is None:  # a plan created after our last check
                # Only the new plans: a known one is replaced by the version check, which
                # re-binds the accounts holding it when it changed.
                for i, p in (await load_plans(self._pool)).items():
                    self._plans.setdefault(i, p)
                plan = self._plans.get(r["plan_id"])
            self._accounts[r["id"]] = AccountRating(
                r["id"], plist, plan, r["inherited"], groups.get(r["id"])
            )
            found.add(r["id"])
        return found
