"""``meter bench ledger``: reading the book back on a big one.

Fills the ledger of an embedded (or the configured) PostgreSQL with ``rows`` rows over
``accounts`` accounts and the twelve months of 2026, through the ledger's writer (calls 70 %,
messages 25 %, number fees 5 %, in four billing groups and none, with from and to), then
times, for random accounts, what the billing pages ask (issue 13): the month's ledger records
(``enforcement.groups.month_report``), the first page of the usage history, a page deep in it
(by its cursor), and the history filtered by a number. Reports p50/p99 in milliseconds under
stable JSON field names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from balance.accounts import put_price_list
from enforcement import groups, usage
from infra.db import create_pool
from infra.ledger import PostgresLedger, UsageRow
from infra.settings import Settings
from infra.stack import running_stack
from meter.traffic import demo_price_list

#: Rows are written in batches of this many (one COPY and transaction each).
CHUNK = 100_000


def _say(line: str) -> None:
    print(line, flush=True)


def _pcts(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50": round(s[len(s) // 2] * 1000, 3),
        "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 3),
        "max": round(s[-1] * 1000, 3),
        "n": len(s),
    }


async def fill(pool: asyncpg.Pool, rows: int, accounts: int) -> float:
    """Accounts and ledger rows, written through the ledger's own writer (``write_usage``, the
    COPY the hot path uses: the ledger has one writer); returns the seconds it took."""
    await put_price_list(pool, demo_price_list())
    await pool.execute(
        "INSERT INTO accounts (id, price_list_id) SELECT 'acc_' || lpad(i::text, 7, '0'),"
        " 'standard' FROM generate_series(0, $1 - 1) i ON CONFLICT DO NOTHING",
        accounts,
    )
    ledger = PostgresLedger(pool)
    year = datetime(2026, 1, 1, tzinfo=UTC)
    t = time.perf_counter()
    for start in range(0, rows, CHUNK):
        chunk: list[UsageRow] = []
        for i in range(start, min(rows, start + CHUNK)):
            kind = "call" if i % 20 < 14 else "sms" if i % 20 < 19 else "fee"
            direction = "outbound" if i % 20 < 10 else "inbound" if i % 20 < 14 else ""
            chunk.append(
                (
                    hashlib.blake2b(b"bench%d" % i, digest_size=16).digest(),
                    f"acc_{i % accounts:07d}",
                    kind,
                    -(i % 997) * 100,
                    i % 600,
                    f"r{i}",
                    "standard",
                    year + timedelta(seconds=(i * 7919) % 31_536_000),  # spread over the year
                    "urn:bench",
                    f"e{i}",
                    None,
                    0,
                    "" if i % 5 == 0 else f"bg_000000000000000{i % 5}",
                    direction,
                    f"+1415555{i % 1000:04d}",
                    f"+4420712{i % 9999:05d}",
                )
            )
        await ledger.write_usage(chunk)
        _say(f"  {start + len(chunk):>12,} rows")
    await pool.execute("ANALYZE ledger", timeout=900)
    return time.perf_counter() - t


async def measure(pool: asyncpg.Pool, accounts: int, queries: int) -> dict[str, dict[str, float]]:
    rng = random.Random(13)
    times: dict[str, list[float]] = {
        "month_report": [],
        "usage_first_page": [],
        "usage_deep_page": [],
        "usage_by_number": [],
    }
    for _ in range(queries):
        account = f"acc_{rng.randrange(accounts):07d}"
        month = f"2026-{rng.randint(1, 12):02d}"
        t = time.perf_counter()
        await groups.month_report(pool, account, month)
        times["month_report"].append(time.perf_counter() - t)

        async def page(
            before: tuple[datetime, int] | None = None,
            number: str | None = None,
            account: str = account,
        ) -> list[usage.UsageRow]:
            return await usage.usage(
                pool,
                account,
                since=None,
                until=None,
                kinds=usage.USAGE_KINDS,
                groups=None,
                number=number,
                before=before,
                limit=100,
            )

        t = time.perf_counter()
        first = await page()
        times["usage_first_page"].append(time.perf_counter() - t)
        deep = first
        for _ in range(4):  # walk to the fifth page, timing the last
            if not deep:
                break
            last = deep[-1]
            t = time.perf_counter()
            deep = await page((last.time, last.entry_id))
        times["usage_deep_page"].append(time.perf_counter() - t)
        t = time.perf_counter()
        await page(number=f"+1415555{rng.randrange(1000):04d}")
        times["usage_by_number"].append(time.perf_counter() - t)
    return {k: _pcts(v) for k, v in times.items()}


async def run_bench_ledger(
    settings: Settings, rows: int, accounts: int, queries: int, out: Path | None
) -> int:
    root = Path(settings.data_dir) / f"bench-ledger-{int(time.time())}"
    async with running_stack(settings, root, kafka_needed=False) as s:
        pool = await create_pool(s.database_url)
        try:
            _say(f"bench ledger: {rows:,} rows over {accounts:,} accounts, spread over 2026")
            fill_s = await fill(pool, rows, accounts)
            size = await pool.fetchval("SELECT pg_total_relation_size('ledger')")
            _say(f"  filled in {fill_s:.1f} s; ledger with its indexes: {size / 2**30:.2f} GiB")
            await measure(pool, accounts, 20)  # warm the caches the way a running API has them
            figures = await measure(pool, accounts, queries)
        finally:
            await pool.close()
    for name, f in figures.items():
        _say(f"  {name:<18} p50 {f['p50']:8.3f} ms   p99 {f['p99']:8.3f} ms   (n={f['n']})")
    result = {
        "rows": rows,
        "accounts": accounts,
        "fill_s": round(fill_s, 1),
        "ledger_bytes": size,
        **{f"{name}_ms": f for name, f in figures.items()},
    }
    if out is not None:
        await asyncio.to_thread(out.write_text, json.dumps(result, indent=2) + "\n")
    return 0
