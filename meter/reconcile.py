"""Reconciliation: every account's Redis balance against the sum of its ledger rows.

Once the pipeline is drained the two must be equal (invariant 2). The drift is exported as
``meter_reconcile_drift_micros`` so an alert fires on anything but zero.

On a live pipeline an account can look off for a moment: Redis applied a batch whose ledger
write is still in flight. ``recheck_after_s`` makes a live reconciliation tell that apart from
drift: every mismatched account is read again after that delay, a few times, and it counts as
drift only when the same difference is read twice in a row (an in-flight batch lands, or the
next one changes the difference). An account that changed at every read is reported as
``unsettled``, not as drift; it is checked again at the next reconciliation.
"""

from __future__ import annotations

import asyncio
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
    #: accounts whose difference changed at every re-read (busy, not proven drifting)
    unsettled: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatched


Pair = tuple[int | None, int]


async def _read(ledger: Ledger, balances: RedisBalances, ids: list[str]) -> dict[str, Pair]:
    """``(redis, ledger)`` of every account whose two balances differ."""
    # Ledger first: debits reach Redis before the ledger, so a batch in flight can then only make
    # Redis look lower than the ledger, never higher.
    expected = await ledger.balances(ids)
    actual = await balances.balances(ids)
    return {
        a: (actual.get(a), expected.get(a, 0))
        for a in ids
        if actual.get(a) != expected.get(a, 0)
    }


async def reconcile(
    pool: asyncpg.Pool,
    balances: RedisBalances,
    chunk: int = 5000,
    *,
    recheck_after_s: float = 0.0,
    rechecks: int = 3,
) -> Reconciliation:
    """Compare every account; with ``recheck_after_s > 0``, confirm mismatches (see above)."""
    result = Reconciliation()
    ledger = Ledger(pool)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM accounts ORDER BY id")]
    suspects: dict[str, Pair] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        result.accounts += len(part)
        suspects.update(await _read(ledger, balances, part))
    if recheck_after_s <= 0:
        result.mismatched = suspects
    else:
        for _ in range(rechecks):
            if not suspects:
                break
            await asyncio.sleep(recheck_after_s)
            again = await _read(ledger, balances, list(suspects))
            moving: dict[str, Pair] = {}
            for a, pair in again.items():
                if _diff(pair) == _diff(suspects[a]):
                    result.mismatched[a] = pair
                else:
                    moving[a] = pair
            suspects = moving
        result.unsettled = len(suspects)
    result.drift_micros = sum(abs((got or 0) - want) for got, want in result.mismatched.values())
    metrics.RECONCILE_DRIFT.set(result.drift_micros)
    metrics.RECONCILE_DRIFT_ACCOUNTS.set(len(result.mismatched))
    metrics.RECONCILE_UNSETTLED.set(result.unsettled)
    return result


def _diff(pair: Pair) -> tuple[bool, int]:
    got, want = pair
    return (got is None, (got or 0) - want)
