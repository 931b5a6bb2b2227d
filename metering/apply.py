"""Applying a batch's charges to the balance store, then to the ledger, and compensating.

Redis first: one pipelined round trip applying every debit idempotently (``debit.lua``),
grouped by account. Then one ledger statement, idempotent on the event key. A duplicate that
Redis already applied still gets its ledger row if it is missing (Redis's memory of an event
is never proof that the ledger has it), written with the amount Redis applied the first time.
The other way round, Redis may have forgotten an event the ledger has (flushed, or older than
its memory): events older than that memory are looked up in the ledger before Redis sees them
(``skip_known_old``), and a debit Redis applied again for an event the ledger already had is
undone (``compensate``). A hangup that settled its call's provisional charge (the sweep's,
``metering.calls``) gets two more rows, idempotent on (account, call_id): the charge (in case
the sweep crashed before writing it) and its give-back; its own row has the rated amount.

Charge codes, set here: ``n`` new, ``d`` duplicate (Redis had it), ``c`` conflict (the same
event key with another fingerprint), ``k`` the ledger already has it, ``x`` the account has no
balance state and none could be rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime

from balance import keys
from balance.protocol import BalanceStore
from balance.values import AccountOutcome, Credit, PlanPeriod, Undraw
from infra import metrics
from infra.ledger import Ledger, SignalRow, UsageRow, provisional_row
from metering.batch import BatchOutcome, Charge, Rejected
from rating.catalog import AccountRating
from rating.plans import GRANT_KEEP_S, month_period

log = logging.getLogger(__name__)

#: Loads accounts Redis does not know from the ledger; returns the ids it loaded.
Rebuild = Callable[[Sequence[str]], Awaitable[list[str]]]


def plan_periods(
    get: Callable[[str], AccountRating | None], account_ids: Iterable[str], now_s: int
) -> dict[str, PlanPeriod]:
    """Plan allowances once per account per batch: the period is that of processing time
    (debit.lua creates the period's grant from it; reservations count it until then), and the
    period before it, for calls answered then and extended or ended now (they draw on the
    allowance of the period they were answered in)."""
    period: tuple[int, int, int] | None = None
    plans: dict[str, PlanPeriod] = {}
    for a in account_ids:
        acct = get(a)
        if acct is not None and acct.plan is not None and acct.plan.included_s:
            if period is None:
                start, end = month_period(now_s)
                # only while its grant is kept past its end: debit.lua creates it no later
                previous = month_period(start - 1)[0] if now_s < start + GRANT_KEEP_S else 0
                period = (start, end, previous)
            plans[a] = PlanPeriod(acct.plan.included_s, *period)
    return plans


async def skip_known_old(ledger: Ledger, charges: list[Charge], now: float) -> None:
    """Events older than Redis's dedup memory are checked against the ledger first."""
    horizon = now - keys.DEDUP_TRUST_S
    old = [c for c in charges if c.epoch < horizon]
    if not old:
        return
    known = await ledger.existing(c.event_key for c in old)
    for c in old:
        if c.event_key in known:
            fp = known[c.event_key]
            c.code = "k" if fp is None or fp == c.fingerprint else "c"


async def apply_debits(
    balances: BalanceStore,
    charges: list[Charge],
    *,
    get: Callable[[str], AccountRating | None],
    rebuild: Rebuild,
    now_s: int,
    rejected: list[Rejected],
) -> list[AccountOutcome]:
    """Apply in Redis every charge not settled yet (no ``code``), and set each one's code and
    what Redis applied. Accounts Redis does not know are rebuilt from the ledger and applied
    again; the charges of one that still has no state are rejected ``unknown_account``."""
    by_account: dict[str, list[Charge]] = {}
    for c in charges:
        if not c.code:
            by_account.setdefault(c.account_id, []).append(c)
    if not by_account:
        return []
    outcomes = await _apply_groups(balances, by_account, get, now_s)
    missing = [o.account_id for o in outcomes if not o.found]
    if missing:
        # Redis does not know these accounts (flushed, lost, or created elsewhere):
        # rebuild them from the ledger, then apply their debits.
        loaded = await rebuild(missing)
        metrics.ACCOUNTS_REBUILT.inc(len(loaded))
        retry = {a: by_account[a] for a in missing}
        again = await _apply_groups(balances, retry, get, now_s)
        outcomes = [o for o in outcomes if o.found] + again
        for o in again:
            if not o.found:
                for c in retry[o.account_id]:
                    c.code = "x"
                    detail = (
                        f"account {c.account_id!r} has no balance state and none could be rebuilt"
                    )
                    rejected.append(
                        Rejected(
                            record=c.record, reason="unknown_account", detail=detail, type=c.type
                        )
                    )
    return outcomes


async def _apply_groups(
    balances: BalanceStore,
    by_account: dict[str, list[Charge]],
    get: Callable[[str], AccountRating | None],
    now_s: int,
) -> list[AccountOutcome]:
    # a Charge has what a debit needs: event_key, fingerprint, amount, day, draw
    outcomes = await balances.apply_debits(by_account, now_s, plan_periods(get, by_account, now_s))
    for o in outcomes:
        if not o.found:
            continue
        dups = iter(o.dup_amounts)
        cs = by_account[o.account_id]
        for c, code in zip(cs, o.codes, strict=True):
            c.code = code
            if code == "n":
                c.applied_amount = c.amount
            elif code == "d":
                c.applied_amount = next(dups)
        for i, drawn in o.draws.items():
            cs[i].applied_amount = drawn.amount
            cs[i].included_s = drawn.drawn_s
        for i, settled in o.settled.items():
            cs[i].settled = settled
    return outcomes


def ledger_rows(
    charges: list[Charge], rejected: list[Rejected]
) -> tuple[list[UsageRow], list[UsageRow]]:
    """The batch's usage rows: ``fresh`` (Redis applied them now) and ``replayed`` (Redis had
    them: written only if the ledger lacks them, with the amount Redis applied the first
    time). A conflict is appended to ``rejected`` as ``duplicate_id_different_payload``."""
    fresh: list[UsageRow] = []
    replayed: dict[bytes, UsageRow] = {}
    for c in charges:
        code = c.code
        if code == "n" or code == "d":
            row = (
                c.event_key,
                c.account_id,
                c.kind,
                -c.applied_amount,
                c.quantity,
                c.ref,
                c.rate_ref,
                c.time,
                c.source,
                c.event_id,
                c.fingerprint,
                c.included_s,
                c.billing_group,
                c.direction,
                c.from_party,
                c.to_party,
            )
            if code == "n":  # Redis marks a second copy in the batch "d": keys are unique
                fresh.append(row)
            else:
                replayed[c.event_key] = row
            if c.settled is not None:
                # The hangup settled the sweep's provisional charge: its give-back, and the
                # charge itself in case the sweep crashed before writing it (both idempotent).
                charged_at = datetime.fromtimestamp(c.settled.charged_at, UTC)
                for at, settle in ((charged_at, False), (c.time, True)):
                    p = provisional_row(
                        c.account_id,
                        c.call_id,
                        charged=c.settled.charged,
                        held_s=0,
                        at=at,
                        settle=settle,
                    )
                    replayed[p[0]] = p
        elif code == "c":
            detail = f"event ({c.source}, {c.event_id}) was charged before with another payload"
            rejected.append(
                Rejected(
                    record=c.record,
                    reason="duplicate_id_different_payload",
                    detail=detail,
                    type=c.type,
                )
            )
    for r in fresh:
        replayed.pop(r[0], None)
    return fresh, list(replayed.values())


async def write_ledger(
    ledger: Ledger,
    charges: list[Charge],
    rejected: list[Rejected],
    signals: list[SignalRow],
) -> set[bytes]:
    """The batch's one ledger statement (``ledger_rows`` and the signals it publishes);
    returns the event keys of fresh rows the ledger already had (to ``compensate``)."""
    fresh, replayed = ledger_rows(charges, rejected)
    return await ledger.write_usage(fresh, replayed, signals)


async def compensate(
    balances: BalanceStore, charges: list[Charge], already: set[bytes], out: BatchOutcome
) -> None:
    """Undo debits Redis applied for events the ledger already had (Redis forgot them):
    the money, and the included seconds the call drew again (back to their grants)."""
    undo = [c for c in charges if c.code == "n" and c.event_key in already]
    # A settled hangup was debited its amount less the provisional charge it settled.
    await balances.credit_many(
        [
            Credit(
                c.account_id,
                "undo:" + c.event_key.hex(),
                c.applied_amount - (c.settled.charged if c.settled else 0),
            )
            for c in undo
        ]
    )
    drew = [c for c in undo if c.included_s and c.draw is not None]
    if drew:
        back = await balances.undraw_many(
            [
                Undraw(c.account_id, c.event_key, c.day, c.included_s, c.draw.answered_at)
                for c in drew
                if c.draw is not None  # all of them (see drew): this narrows the type
            ]
        )
        for c, n in zip(drew, back, strict=True):
            if n < 0:
                log.error(
                    "%d included seconds drawn again could not be given back: no grant valid"
                    " at the call's answer is left",
                    c.included_s,
                    extra={"account_id": c.account_id, "event_id": c.event_id},
                )
    for c in undo:
        c.code = "k"
    if undo:
        log.warning(
            "redis re-applied %d events the ledger had (its memory was lost); compensated",
            len(undo),
            extra={"account_id": undo[0].account_id, "event_id": undo[0].event_id},
        )
    metrics.REDIS_DEDUP_MISSES.inc(len(undo))
    out.compensated += len(undo)


def count_charges(charges: list[Charge], out: BatchOutcome) -> None:
    """Add the batch's charged and duplicate events to ``out`` and to the metrics."""
    charged: dict[str, int] = {}
    dups: dict[str, int] = {}
    for c in charges:
        if c.code == "n":
            out.charged += 1
            out.charged_micros += c.applied_amount
            charged[c.type] = charged.get(c.type, 0) + 1
        elif c.code == "d" or c.code == "k":
            out.duplicates += 1
            dups[c.type] = dups.get(c.type, 0) + 1
    for t, n in charged.items():
        metrics.EVENTS_CHARGED.labels(t).inc(n)
    for t, n in dups.items():
        metrics.EVENTS_DUPLICATE.labels(t).inc(n)
    metrics.CHARGED_MICROS.inc(out.charged_micros)
