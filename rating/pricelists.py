"""Price lists in PostgreSQL: their versions written and loaded for rating.

A price list is a head row (``price_lists``: currency and a ``version`` counter every write
bumps, which running catalogs poll) with two kinds of versioned prices under it:

- the prefix rates (``price_list_rates``), one row per version of a prefix's rate, added by
  ``import_rates`` from the CSV (``rating.pricelist_csv``, which says what a row means);
- the other prices (inbound, SMS, number and one-time fees), which are not prefixes and have no
  CSV: ``add_price_version`` adds a version of them.

The rule is the same for both: a write adds versions (the same ``effective_from`` replaces that
version), it never deletes, so calls are always re-ratable with what was in force at their
``answered_at``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg

from contracts.money import format_money
from rating.pricelist_csv import MAX_INCREMENT_S
from rating.rating import MAX_RATE_PER_MIN, PriceList, PriceVersion, VoiceRate

_FEE_CODE: Final = re.compile(r"^[a-z0-9_]{1,32}$")


@dataclass(frozen=True, slots=True)
class ImportResult:
    price_list_id: str
    rows: int
    version: int


async def import_rates(
    pool: asyncpg.Pool, price_list_id: str, rates: list[VoiceRate]
) -> ImportResult:
    """Add these rate versions to an existing price list, in one transaction, and bump its
    version (running catalogs pick it up within their check interval, no restart).

    Raises ``LookupError`` if the price list does not exist.
    """
    async with pool.acquire() as conn, conn.transaction():
        version = await conn.fetchval(
            "UPDATE price_lists SET version = version + 1 WHERE id = $1 RETURNING version",
            price_list_id,
        )
        if version is None:
            raise LookupError(f"no price list {price_list_id!r}")
        await conn.execute(
            "CREATE TEMP TABLE import_rates (LIKE price_list_rates INCLUDING DEFAULTS)"
            " ON COMMIT DROP"
        )
        await conn.copy_records_to_table(
            "import_rates",
            records=[
                (
                    price_list_id,
                    r.prefix,
                    r.description,
                    r.rate_per_min,
                    r.connect_fee,
                    r.initial_s,
                    r.subsequent_s,
                    datetime.fromtimestamp(r.effective_from, UTC),
                )
                for r in rates
            ],
            columns=[*RATE_COLUMNS],
        )
        await conn.execute(
            f"INSERT INTO price_list_rates ({', '.join(RATE_COLUMNS)})"
            f" SELECT {', '.join(RATE_COLUMNS)} FROM import_rates"
            " ON CONFLICT (price_list_id, prefix, effective_from) DO UPDATE SET"
            " description = EXCLUDED.description, rate_per_min = EXCLUDED.rate_per_min,"
            " connect_fee = EXCLUDED.connect_fee, initial_s = EXCLUDED.initial_s,"
            " subsequent_s = EXCLUDED.subsequent_s"
        )
    return ImportResult(price_list_id, len(rates), int(version))


RATE_COLUMNS: Final = (
    "price_list_id",
    "prefix",
    "description",
    "rate_per_min",
    "connect_fee",
    "initial_s",
    "subsequent_s",
    "effective_from",
)


async def price_list_versions(pool: asyncpg.Pool) -> dict[str, int]:
    """``price list id -> version`` of every price list."""
    return {r["id"]: r["version"] for r in await pool.fetch("SELECT id, version FROM price_lists")}


async def load_price_lists(
    pool: asyncpg.Pool, ids: Iterable[str] | None = None
) -> dict[str, PriceList]:
    """Price lists with every rate version and price version (all of them, or only ``ids``)."""
    only = None if ids is None else list(ids)
    where = "" if only is None else " WHERE {} = ANY($1::text[])"
    args = () if only is None else (only,)
    # One snapshot: a list written between these reads would otherwise load half old, half new
    # (or its rows arrive before its head row and have no list to go to).
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        heads = await conn.fetch(
            "SELECT id, currency, version FROM price_lists" + where.format("id"), *args
        )
        prices = await _price_versions(conn, only)
        # Tuples and a local constructor: this loop builds every prefix of every list (100k+).
        rate_rows = await conn.fetch(
            "SELECT price_list_id, prefix, rate_per_min, connect_fee, initial_s, subsequent_s,"
            " extract(epoch FROM effective_from)::bigint, description FROM price_list_rates"
            + where.format("price_list_id"),
            *args,
        )
    lists: dict[str, PriceList] = {}
    for h in heads:
        versions = prices.get(h["id"])
        # A list without a price version (rows deleted by hand: every write path creates one)
        # is left out: its accounts are refused as unknown rather than rated with no prices.
        if versions:
            lists[h["id"]] = _price_list(h["id"], h["currency"], h["version"], versions)
    for r in rate_rows:
        pl = lists.get(r[0])
        if pl is not None:
            pl.add_outbound(VoiceRate(r[1], r[2], r[3], r[4], r[5], r[6], r[7]))
    return lists


async def _price_versions(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, only: list[str] | None
) -> dict[str, list[PriceVersion]]:
    """``price list id -> its PriceVersions, oldest first`` (all lists, or only ``only``)."""
    where = "" if only is None else " WHERE price_list_id = ANY($1::text[])"
    args = () if only is None else (only,)
    fees: dict[tuple[str, int], dict[str, int]] = {}
    for r in await conn.fetch(
        "SELECT price_list_id, floor(extract(epoch FROM effective_from))::bigint, code, amount"
        " FROM price_list_fees" + where,
        *args,
    ):
        fees.setdefault((r[0], r[1]), {})[r[2]] = r[3]
    out: dict[str, list[PriceVersion]] = {}
    for r in await conn.fetch(
        "SELECT price_list_id, floor(extract(epoch FROM effective_from))::bigint,"
        " inbound_per_min, inbound_initial_s, inbound_subsequent_s, sms_per_part,"
        " number_monthly_fee FROM price_list_prices" + where + " ORDER BY effective_from",
        *args,
    ):
        since = r[1]
        out.setdefault(r[0], []).append(
            PriceVersion(
                since,
                VoiceRate("", r[2], 0, r[3], r[4], since),
                r[5],
                r[6],
                fees.get((r[0], since), {}),
            )
        )
    return out


def _price_list(id_: str, currency: str, version: int, prices: list[PriceVersion]) -> PriceList:
    first = prices[0]
    pl = PriceList(
        id_,
        currency,
        first.inbound,
        first.sms_per_part,
        number_monthly_fee=first.number_monthly_fee,
        one_time_fees=first.one_time_fees,
        version=version,
    )
    for p in prices[1:]:
        pl.add_prices(p)
    return pl


PRICE_COLUMNS: Final = (
    "price_list_id",
    "effective_from",
    "inbound_per_min",
    "inbound_initial_s",
    "inbound_subsequent_s",
    "sms_per_part",
    "number_monthly_fee",
)


async def write_prices(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    price_list_id: str,
    prices: PriceVersion,
) -> None:
    """Insert or replace the version starting at ``prices.effective_from``, fees included
    (inside the caller's transaction)."""
    since = datetime.fromtimestamp(prices.effective_from, UTC)
    inbound = prices.inbound
    await conn.execute(
        f"INSERT INTO price_list_prices ({', '.join(PRICE_COLUMNS)})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (price_list_id, effective_from)"
        " DO UPDATE SET inbound_per_min = $3, inbound_initial_s = $4,"
        " inbound_subsequent_s = $5, sms_per_part = $6, number_monthly_fee = $7",
        price_list_id,
        since,
        inbound.rate_per_min,
        inbound.initial_s,
        inbound.subsequent_s,
        prices.sms_per_part,
        prices.number_monthly_fee,
    )
    await conn.execute(
        "DELETE FROM price_list_fees WHERE price_list_id = $1 AND effective_from = $2",
        price_list_id,
        since,
    )
    await conn.executemany(
        "INSERT INTO price_list_fees (price_list_id, effective_from, code, amount)"
        " VALUES ($1, $2, $3, $4)",
        [(price_list_id, since, code, amount) for code, amount in prices.one_time_fees.items()],
    )


def _micros(value: object, name: str, limit: int | None = None) -> int:
    # bool is an int, and a float would be a rounding error waiting to be charged
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be a non-negative int of micro-units, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} above {format_money(limit)}")
    return value


def _seconds(value: object, name: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_INCREMENT_S:
        raise ValueError(f"{name} must be a whole number of seconds 1-{MAX_INCREMENT_S}")
    return value


async def add_price_version(
    pool: asyncpg.Pool,
    price_list_id: str,
    effective_from: datetime,
    *,
    inbound_per_min: int | None = None,
    inbound_initial_s: int | None = None,
    inbound_subsequent_s: int | None = None,
    sms_per_part: int | None = None,
    number_monthly_fee: int | None = None,
    fees: Mapping[str, int | None] | None = None,
) -> PriceVersion:
    """Add a version of a price list's non-prefix prices, in force from ``effective_from`` (an
    aware datetime; whole seconds) until the list's next version, and bump the list's version
    (running catalogs pick it up within their check interval, no restart). Money in
    micro-units.

    A version is whole, so what is not given is copied from the version in force just before
    ``effective_from`` (the first one if it starts earlier than all): ``fees`` changes only the
    codes it names, ``None`` removing one. A version with the same start is replaced; nothing
    is ever deleted, so late events are still rated with what was in force at their time.
    Events already charged are never re-rated. Returns the version written.

    Raises ``LookupError`` if the price list does not exist, ``ValueError`` for a bad price.
    """
    if effective_from.tzinfo is None:
        raise ValueError("effective_from needs a time zone")
    since = int(effective_from.timestamp())
    for code in fees or {}:
        if not _FEE_CODE.match(code):
            raise ValueError(f"fee code must match {_FEE_CODE.pattern}, got {code[:40]!r}")
    async with pool.acquire() as conn, conn.transaction():
        # Locks the list's row: two concurrent additions cannot both copy the same base.
        version = await conn.fetchval(
            "UPDATE price_lists SET version = version + 1 WHERE id = $1 RETURNING version",
            price_list_id,
        )
        if version is None:
            raise LookupError(f"no price list {price_list_id!r}")
        versions = (await _price_versions(conn, [price_list_id])).get(price_list_id)
        if not versions:
            raise LookupError(f"price list {price_list_id!r} has no prices: put it again")
        base = _price_list(price_list_id, "", 0, versions).prices_at(since)
        merged = dict(base.one_time_fees)
        for code, amount in (fees or {}).items():
            if amount is None:
                merged.pop(code, None)
            else:
                merged[code] = _micros(amount, f"fee {code}")
        old = base.inbound
        prices = PriceVersion(
            since,
            VoiceRate(
                "",
                old.rate_per_min
                if inbound_per_min is None
                else _micros(inbound_per_min, "inbound_per_min", MAX_RATE_PER_MIN),
                0,
                old.initial_s
                if inbound_initial_s is None
                else _seconds(inbound_initial_s, "inbound_initial_s"),
                old.subsequent_s
                if inbound_subsequent_s is None
                else _seconds(inbound_subsequent_s, "inbound_subsequent_s"),
                since,
            ),
            base.sms_per_part if sms_per_part is None else _micros(sms_per_part, "sms_per_part"),
            base.number_monthly_fee
            if number_monthly_fee is None
            else _micros(number_monthly_fee, "number_monthly_fee"),
            merged,
        )
        await write_prices(conn, price_list_id, prices)
    return prices
