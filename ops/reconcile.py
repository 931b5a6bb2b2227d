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

A call charged twice, provisionally by the sweep and in full by a hangup that did not settle it
(``double_charged``: only when Redis lost the sweep's marker while keeping its account, e.g. a
failover to a replica behind by that write; docs/design/call-credit.md), is not drift either:
Redis and the ledger agree on the wrong amount. It is counted apart
(``meter_reconcile_provisional_double_charged_calls``) and makes the reconciliation not ok;
``settle_double_charged`` gives each provisional charge back, once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from balance.protocol import BalanceStore
from balance.values import Credit
from infra import metrics
from infra.ledger import Ledger, PostgresLedger, Unsettled, provisional_row


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
    #: calls charged provisionally and in full (see the module docstring)
    double_charged: list[Unsettled] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No drift and no call charged twice. Missing accounts alone leave it true: nothing
        is wrong with their money."""
        return not self.mismatched and not self.double_charged


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
    result.double_charged = await double_charged(pool)
    metrics.RECONCILE_DOUBLE_CHARGED.set(len(result.double_charged))
    result.drift_micros = sum(abs(got - want) for got, want in result.mismatched.values())
    metrics.RECONCILE_DRIFT.set(result.drift_micros)
    metrics.RECONCILE_DRIFT_ACCOUNTS.set(len(result.mismatched))
    metrics.RECONCILE_UNSETTLED.set(result.unsettled)
    metrics.RECONCILE_MISSING.set(result.missing)
    return result


def _diff(pair: Pair) -> int:
    got, want = pair
    return got - want


async def double_charged(pool: asyncpg.Pool) -> list[Unsettled]:
    """Calls with a provisional charge no settlement gave back and a ``call`` row of their
    own (their hangup was charged in full): each paid for twice."""
    rows = await pool.fetch(
        "SELECT p.account_id, p.ref, -p.amount AS charged, p.event_time FROM ledger p"
        " WHERE p.kind = 'provisional' AND p.amount < 0"
        " AND NOT EXISTS (SELECT 1 FROM ledger s WHERE s.account_id = p.account_id"
        "  AND s.kind = 'provisional' AND s.ref = p.ref AND s.amount > 0)"
        " AND EXISTS (SELECT 1 FROM ledger c WHERE c.account_id = p.account_id"
        "  AND c.kind = 'call' AND c.ref = p.ref)"
        " ORDER BY p.account_id, p.ref"
    )
    return [
        Unsettled(r["account_id"], r["ref"], r["charged"], int(r["event_time"].timestamp()))
        for r in rows
    ]


async def settle_double_charged(
    pool: asyncpg.Pool, balances: BalanceStore, calls: list[Unsettled], *, now_s: int
) -> int:
    """Give back the provisional charge of each call charged twice (``double_charged``):
    Redis first, once per call (credit id ``provisional:settle:<call_id>``), then the ledger's
    settlement row, the same one a settling hangup writes (idempotent), so a rerun after a
    crash in between credits nothing twice and writes the missing row. Returns how many."""
    if not calls:
        return 0
    await balances.credit_many(
        [Credit(c.account_id, "provisional:settle:" + c.call_id, c.charged) for c in calls],
        now_s=now_s,
    )
    at = datetime.fromtimestamp(now_s, UTC)
    rows = [
        provisional_row(c.account_id, c.call_id, charged=c.charged, held_s=0, at=at, settle=True)
        for c in calls
    ]
    await PostgresLedger(pool).write_usage([], rows)
    return len(calls)
