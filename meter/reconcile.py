"""Reconciliation: every account's Redis balance against the sum of its ledger rows.

Once the pipeline is drained the two must be equal (invariant 2). The drift is exported as
``meter_reconcile_drift_micros`` so an alert fires on anything but zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from enforcement.balance import RedisBalances
from meter import metrics
from meter.ledger import Ledger


@dataclass(slots=True)
class Reconciliation:
    accounts: int = 0
    drift_micros: int = 0
    #: account -> (redis balance or None when Redis has no state, ledger balance)
    mismatched: dict[str, tuple[int | None, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatched


async def reconcile(
    pool: asyncpg.Pool, balances: RedisBalances, chunk: int = 5000
) -> Reconciliation:
    result = Reconciliation()
    ledger = Ledger(pool)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM accounts ORDER BY id")]
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        expected = await ledger.balances(part)
        actual = await balances.balances(part)
        for a in part:
            want, got = expected.get(a, 0), actual.get(a)
            result.accounts += 1
            if got != want:
                result.mismatched[a] = (got, want)
                result.drift_micros += abs((got or 0) - want)
    metrics.RECONCILE_DRIFT.set(result.drift_micros)
    metrics.RECONCILE_DRIFT_ACCOUNTS.set(len(result.mismatched))
    return result
