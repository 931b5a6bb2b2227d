"""Reconciliation: every account's Redis balance against the sum of its ledger rows.

Once the pipeline is drained the two must be equal (invariant 2). The drift is exported as
``meter_reconcile_drift_micros`` so an alert fires on anything but zero.

On a live pipeline an account can look off for a moment: Redis applied a batch whose ledger
write is still in flight. ``recheck_after_s`` makes a live reconciliation tell that apart from
drift: every mismatched account is read again after that delay, a few times, and it counts as
drift only when the same difference is read twice in a row (an in-flight batch lands, or the
next one changes the difference). An account that changed at every read is reported as
``unsettled``, not as drift; it is checked again at the next reconciliation.

An account the ledger has and Redis does not (Redis lost it: a flush, a failover to an empty
replica, a restore) is ``missing``, counted apart and exported as
``meter_reconcile_missing_accounts``, never as drift: it holds no balance that could be wrong,
and its next event or authorization rebuilds it from the ledger (``balance.accounts``). Counting
its whole ledger balance as drift would page, after every Redis loss, for money that is right.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg

from balance.protocol import BalanceStore
from infra import metrics
from infra.ledger import Ledger, PostgresLedger


@dataclass(slots=True)
class Reconciliation:
    accounts: int = 0
    drift_micros: int = 0
    #: account -> (redis balance, ledger balance), confirmed different
    mismatched: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: accounts whose difference changed at every re-read (busy, not proven drifting)
    unsettled: int = 0
    #: accounts Redis has no balance for (not rebuilt yet); not drift, see the module docstring
    missing: int = 0

    @property
    def ok(self) -> bool:
        """No drift. Missing accounts alone leave it true: nothing is wrong with their money."""
        return not self.mismatched


Pair = tuple[int, int]


@dataclass(slots=True)
class _Read:
    #: account -> (redis, ledger) of the accounts Redis has, where the two differ
    differ: dict[str, Pair]
    #: accounts Redis has no balance for
    missing: set[str]


async def _read(ledger: Ledger, balances: BalanceStore, ids: list[str]) -> _Read:
    """The accounts of ``ids`` whose two balances differ, and those Redis does not have."""
    # Ledger first: debits reach Redis before the ledger, so a batch in flight can then only make
    # Redis look lower than the ledger, never higher.
    expected = await ledger.balances(ids)
    actual = await balances.balances(ids)
    read = _Read({}, set())
    for a in ids:
        got, want = actual.get(a), expected.get(a, 0)
        if got is None:
            read.missing.add(a)
        elif got != want:
            read.differ[a] = (got, want)
    return read


async def reconcile(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    chunk: int = 5000,
    *,
    recheck_after_s: float = 0.0,
    rechecks: int = 3,
) -> Reconciliation:
    """Compare every account; with ``recheck_after_s > 0``, confirm mismatches (see above)."""
    result = Reconciliation()
    ledger = PostgresLedger(pool)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM accounts ORDER BY id")]
    suspects: dict[str, Pair] = {}
    missing: set[str] = set()
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        result.accounts += len(part)
        read = await _read(ledger, balances, part)
        suspects.update(read.differ)
        missing |= read.missing
    if recheck_after_s <= 0:
        result.mismatched = suspects
    else:
        for _ in range(rechecks):
            if not suspects:
                break
            await asyncio.sleep(recheck_after_s)
            again = await _read(ledger, balances, list(suspects))
            # A suspect deleted from Redis meanwhile (the runbook's fix) is missing, not drift.
            missing |= again.missing
            moving: dict[str, Pair] = {}
            for a, pair in again.differ.items():
                if _diff(pair) == _diff(suspects[a]):
                    result.mismatched[a] = pair
                else:
                    moving[a] = pair
            suspects = moving
        result.unsettled = len(suspects)
    result.missing = len(missing)
    result.drift_micros = sum(abs(got - want) for got, want in result.mismatched.values())
    metrics.RECONCILE_DRIFT.set(result.drift_micros)
    metrics.RECONCILE_DRIFT_ACCOUNTS.set(len(result.mismatched))
    metrics.RECONCILE_UNSETTLED.set(result.unsettled)
    metrics.RECONCILE_MISSING.set(result.missing)
    return result


def _diff(pair: Pair) -> int:
    got, want = pair
    return got - want
