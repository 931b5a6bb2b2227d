"""``meter bench ledger`` on a small book: it fills, it measures, and what it measures is right
(the month reports it times add up to the ledger's own sums)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from enforcement import groups, usage
from infra.db import create_pool
from meter.bench_ledger import fill, measure


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url)
    yield p
    await p.close()


async def test_the_ledger_bench_fills_a_book_whose_reports_add_up(pool: asyncpg.Pool) -> None:
    await fill(pool, 20_000, 40)
    assert await pool.fetchval("SELECT count(*) FROM ledger WHERE source = 'urn:bench'") == 20_000
    for account, month in (("acc_0000007", "2026-02"), ("acc_0000039", "2026-12")):
        report = await groups.month_report(pool, account, month)
        lo, hi = groups.month_bounds(month)
        want = await pool.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1"
            " AND event_time >= $2 AND event_time < $3",
            account,
            lo,
            hi,
        )
        assert report.lines and report.total == want
    # every month of the year has rows: the times are spread, not packed into January
    months = await pool.fetchval(
        "SELECT count(DISTINCT date_trunc('month', event_time)) FROM ledger"
        " WHERE source = 'urn:bench'"
    )
    assert months == 12
    page = await usage.usage(
        pool,
        "acc_0000007",
        since=None,
        until=None,
        kinds=usage.USAGE_KINDS,
        groups=None,
        number=None,
        before=None,
        limit=100,
    )
    assert len(page) == 100 and page == sorted(
        page, key=lambda r: (r.time, r.entry_id), reverse=True
    )
    figures = await measure(pool, 40, 3)
    assert set(figures) == {
        "month_report",
        "usage_first_page",
        "usage_deep_page",
        "usage_by_number",
    }
    assert all(f["n"] == 3 and 0 < f["p50"] <= f["max"] for f in figures.values())
