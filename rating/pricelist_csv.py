"""The price-list CSV: one rate version of a prefix per row, read and written.

CSV (UTF-8, a header row, comma separated)::

    prefix,description,rate_per_min,connect_fee,initial_s,subsequent_s,effective_from
    44,United Kingdom,0.015,0,6,6,2026-01-01T00:00:00Z

``prefix`` and ``rate_per_min`` are required columns; the others default to ``""``, ``0``,
``6``, ``6`` and the import's time. Money is a decimal string (at most 6 decimals, never an
exponent); ``effective_from`` is RFC 3339 with an offset. A row is one *version* of a prefix's
rate: importing adds versions (a row with the same prefix and effective_from replaces that
version), it never deletes, so calls are always re-ratable with what was in force at their
``answered_at``. A file with any bad row is refused whole, every bad row named by line.

Only the format lives here (pure, no database): ``rating.pricelists`` stores what
``parse_csv`` returns (``import_rates``) and loads what ``export_csv`` writes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

from contracts.money import MoneyFormatError, format_money, parse_money
from rating.rating import MAX_PREFIX_LEN, MAX_RATE_PER_MIN, VoiceRate

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
MAX_INCREMENT_S: Final = 3600
"""The longest billing increment (``initial_s``, ``subsequent_s``) a price list may have."""


class PriceListCsvError(ValueError):
    """The CSV was refused whole. ``errors``: ``(line number, message)``, line 1 the header."""

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        shown = "; ".join(f"line {n}: {m}" for n, m in errors[:20])
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__(f"{len(errors)} bad rows: {shown}{more}")


def _increment(text: str, name: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_INCREMENT_S:
        raise ValueError(f"{name} must be a whole number of seconds 1-{MAX_INCREMENT_S}")
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
