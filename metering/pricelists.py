"""Price lists in PostgreSQL: CSV import and export, and loading them for rating.

CSV (UTF-8, a header row, comma separated)::

    prefix,description,rate_per_min,connect_fee,initial_s,subsequent_s,effective_from
    44,United Kingdom,0.015,0,6,6,2026-01-01T00:00:00Z

``prefix`` and ``rate_per_min`` are required columns; the others default to ``""``, ``0``,
``6``, ``6`` and the import's time. Money is a decimal string (at most 6 decimals, never an
exponent); ``effective_from`` is RFC 3339 with an offset. A row is one *version* of a prefix's
rate: importing adds versions (a row with the same prefix and effective_from replaces that
version), it never deletes, so calls are always re-ratable with what was in force at their
``answered_at``. A file with any bad row is refused whole, every bad row named by line.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg

from contracts.money import MoneyFormatError, format_money, parse_money
from metering.rating import MAX_PREFIX_LEN, MAX_RATE_PER_MIN, PriceList, VoiceRate

CSV_COLUMNS: Final = (
    "prefix",
    "description",
    "rate_per_min",
    "connect_fee",
    "initial_s",
    "subsequent_s",
    "effective_from",
)
_REQUIRED: Final = ("prefix", "rate_per_min")
_MAX_INCREMENT_S: Final = 3600


class PriceListCsvError(ValueError):
    """The CSV was refused whole. ``errors``: ``(line number, message)``, line 1 the header."""

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        shown = "; ".join(f"line {n}: {m}" for n, m in errors[:20])
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} bad rows: {shown}{more}")


def _increment(text: str, name: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= _MAX_INCREMENT_S:
        raise ValueError(f"{name} must be a whole number of seconds 1-{_MAX_INCREMENT_S}")
    return int(text)


def _timestamp(text: str) -> int:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"effective_from {text[:40]!r} is not RFC 3339") from None
    if t.tzinfo is None:
        raise ValueError("effective_from needs an offset (e.g. Z or +00:00)")
    return int(t.timestamp())


def _row(rec: dict[str, str], default_from: int) -> VoiceRate:
    prefix = rec["prefix"].strip().removeprefix("+")
    if not prefix.isdigit() or len(prefix) > MAX_PREFIX_LEN:
        raise ValueError(f"prefix must be 1-{MAX_PREFIX_LEN} digits, got {prefix[:20]!r}")
    try:
        rate = parse_money(rec["rate_per_min"].strip())
        fee = parse_money((rec.get("connect_fee") or "0").strip())
    except MoneyFormatError as exc:
        raise ValueError(str(exc)) from None
    if rate < 0 or fee < 0:
        raise ValueError("rates cannot be negative")
    if rate > MAX_RATE_PER_MIN:
        raise ValueError(f"rate_per_min above {format_money(MAX_RATE_PER_MIN)}")
    since = (rec.get("effective_from") or "").strip()
    return VoiceRate(
        prefix,
        rate,
        fee,
        _increment((rec.get("initial_s") or "6").strip(), "initial_s"),
        _increment((rec.get("subsequent_s") or "6").strip(), "subsequent_s"),
        _timestamp(since) if since else default_from,
        (rec.get("description") or "").strip(),
    )


def parse_csv(text: str, *, default_from: int) -> list[VoiceRate]:
    """Every row of a price-list CSV, or ``PriceListCsvError`` naming each bad one.

    ``default_from``: unix seconds used where ``effective_from`` is empty (the import time).
    """
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")), strict=True)
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    errors: list[tuple[int, str]] = []
    missing = [c for c in _REQUIRED if c not in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        detail = []
        if missing:
            detail.append(f"missing columns {missing}")
        if unknown:
            detail.append(f"unknown columns {unknown}")
        raise PriceListCsvError([(1, ", ".join(detail) + f"; expected {list(CSV_COLUMNS)}")])
    rates: list[VoiceRate] = []
    seen: dict[tuple[str, int], int] = {}
    try:
        for rec in reader:
            line = reader.line_num
            if None in rec or any(v is None for v in rec.values()):
                errors.append((line, f"expected {len(header)} fields"))
                continue
            try:
                r = _row(rec, default_from)
            except ValueError as exc:
                errors.append((line, str(exc)))
                continue
            first = seen.setdefault((r.prefix, r.effective_from), line)
            if first != line:
                errors.append(
                    (line, f"prefix {r.prefix} at this effective_from is on line {first}")
                )
                continue
            rates.append(r)
    except csv.Error as exc:
        errors.append((reader.line_num, f"not valid CSV: {exc}"))
    if errors:
        raise PriceListCsvError(errors)
    return rates


def export_csv(rates: Iterable[VoiceRate]) -> str:
    """The CSV of these rate versions (what ``parse_csv`` reads back to the same rates)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rates:
        w.writerow(
            (
                r.prefix,
                r.description,
                format_money(r.rate_per_min),
                format_money(r.connect_fee),
                r.initial_s,
                r.subsequent_s,
                datetime.fromtimestamp(r.effective_from, UTC).isoformat().replace("+00:00", "Z"),
            )
        )
    return out.getvalue()


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
    """Price lists with every rate version and fee (all of them, or only ``ids``)."""
    only = None if ids is None else list(ids)
    where = "" if only is None else " WHERE {} = ANY($1::text[])"
    args = () if only is None else (only,)
    lists: dict[str, PriceList] = {}
    for r in await pool.fetch("SELECT * FROM price_lists" + where.format("id"), *args):
        lists[r["id"]] = PriceList(
            id=r["id"],
            currency=r["currency"],
            inbound=VoiceRate(
                "", r["inbound_per_min"], 0, r["inbound_initial_s"], r["inbound_subsequent_s"]
            ),
            sms_per_part=r["sms_per_part"],
            number_monthly_fee=r["number_monthly_fee"],
            version=r["version"],
        )
    for r in await pool.fetch(
        "SELECT price_list_id, code, amount FROM price_list_fees" + where.format("price_list_id"),
        *args,
    ):
        lists[r["price_list_id"]].one_time_fees[r["code"]] = r["amount"]
    # Tuples and a local constructor: this loop builds every prefix of every list (100k+).
    rows = await pool.fetch(
        "SELECT price_list_id, prefix, rate_per_min, connect_fee, initial_s, subsequent_s,"
        " extract(epoch FROM effective_from)::bigint, description FROM price_list_rates"
        + where.format("price_list_id"),
        *args,
    )
    for r in rows:
        lists[r[0]].add_outbound(VoiceRate(r[1], r[2], r[3], r[4], r[5], r[6], r[7]))
    return lists
