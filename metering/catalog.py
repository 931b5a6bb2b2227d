"""Price lists and the account -> price list map, read from PostgreSQL for the hot path.

The processor asks ``resolve`` for the accounts of each batch; accounts it has not seen are
fetched in one query, and unknown ones are remembered briefly so a flood of events for a
non-existent account does not become a flood of queries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from metering.rating import PriceList, VoiceRate


@dataclass(frozen=True, slots=True)
class AccountRating:
    account_id: str
    price_list: PriceList


async def load_price_lists(pool: asyncpg.Pool) -> dict[str, PriceList]:
    lists: dict[str, PriceList] = {}
    for r in await pool.fetch("SELECT * FROM price_lists"):
        lists[r["id"]] = PriceList(
            id=r["id"],
            currency=r["currency"],
            inbound=VoiceRate(
                "", r["inbound_per_min"], 0, r["inbound_initial_s"], r["inbound_subsequent_s"]
            ),
            sms_per_part=r["sms_per_part"],
        )
    for r in await pool.fetch("SELECT * FROM price_list_rates"):
        lists[r["price_list_id"]].add_outbound(
            VoiceRate(
                r["prefix"], r["rate_per_min"], r["connect_fee"], r["initial_s"], r["subsequent_s"]
            )
        )
    return lists


class Catalog:
    """Account -> price list, cached. Price lists are loaded at start and on ``refresh``."""

    def __init__(self, pool: asyncpg.Pool, *, negative_ttl_s: float = 5.0) -> None:
        self._pool = pool
        self._lists: dict[str, PriceList] = {}
        self._accounts: dict[str, AccountRating] = {}
        self._unknown: dict[str, float] = {}
        self._negative_ttl_s = negative_ttl_s
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        self._lists = await load_price_lists(self._pool)
        self._accounts.clear()
        self._unknown.clear()

    def get(self, account_id: str) -> AccountRating | None:
        return self._accounts.get(account_id)

    async def resolve(self, account_ids: Iterable[str]) -> None:
        """Fetch the accounts not cached yet (one query); unknown ones are cached as absent.

        Concurrent callers missing the same accounts wait for one query (the authorize API
        can get a thousand requests for a new account at once)."""
        ids = set(account_ids)
        if not self._missing(ids):
            return
        async with self._lock:
            missing = self._missing(ids)
            if missing:
                await self._fetch(missing)

    def _missing(self, ids: set[str]) -> list[str]:
        now = time.monotonic()
        return [a for a in ids if a not in self._accounts and self._unknown.get(a, 0.0) <= now]

    async def _fetch(self, missing: list[str]) -> None:
        now = time.monotonic()
        rows = await self._pool.fetch(
            "SELECT id, price_list_id FROM accounts WHERE id = ANY($1::text[])", missing
        )
        found = set()
        for r in rows:
            plist = self._lists.get(r["price_list_id"])
            if plist is None:  # a price list created after our last refresh
                self._lists = await load_price_lists(self._pool)
                plist = self._lists[r["price_list_id"]]
            self._accounts[r["id"]] = AccountRating(r["id"], plist)
            found.add(r["id"])
        for a in missing:
            if a not in found:
                self._unknown[a] = now + self._negative_ttl_s
