"""Live calls: ``call.answered`` and ``call.progress`` on reservations, and the sweep of calls
whose hangup never came.

A hangup is a charge like any other (``metering.rate``) and releases its call's reservation
with the debit. The updates before it are not charges: they act on the reservation the
authorization made (``balance.store.reserve_many`` / ``progress``), with the same rules as the
API's authorizations (``infra.settings.CallControl``), and may queue signals in the account's
outbox (``call.terminate`` where the credit runs out), which the batch publishes. The sweep
charges a call whose hangup never came, provisionally; a late hangup settles it
(``metering.apply``), even when Redis no longer has the sweep's marker
(``restore_late_markers``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from balance import keys
from balance.protocol import BalanceStore
from balance.values import CallProgress, Provisional, Released, ReservationRequest, Tariff
from infra import metrics
from infra.ledger import Ledger, provisional_row
from infra.settings import CallControl
from metering.apply import plan_periods
from metering.batch import AccountSignal, Charge, Record, Rejected
from metering.validate import unknown_account
from rating.catalog import AccountRating
from rating.rating import NoRate

log = logging.getLogger(__name__)


async def update_live_calls(
    balances: BalanceStore,
    events: list[tuple[Record, Any]],
    *,
    get: Callable[[str], AccountRating | None],
    call_control: CallControl,
    now: float,
    rejected: list[Rejected],
) -> list[AccountSignal]:
    """call.answered opens billing on the call's reservation (creating one for a call that
    was never authorized, e.g. inbound); call.progress extends it or orders the call
    ended where the credit runs out. Both are idempotent: a replay changes nothing.
    Returns the signals now pending in the outboxes of the accounts updated."""
    cc = call_control
    now_s = int(now)
    for type_, n in Counter(ev.type for _, ev in events).items():
        metrics.CALL_UPDATES.labels(type_).inc(n)
    opens: list[ReservationRequest] = []
    updates: list[CallProgress] = []
    for rec, ev in events:
        acct = get(ev.subject)
        if acct is None:
            rejected.append(unknown_account(rec, ev))
            continue
        d = ev.data
        if ev.type == "call.answered":
            try:
                rate = acct.price_list.voice_rate(d.direction, d.to, int(d.answered_at.timestamp()))
            except NoRate as exc:
                rejected.append(
                    Rejected(
                        record=rec, reason="no_rate_for_destination", detail=str(exc), type=ev.type
                    )
                )
                continue
            tariff = Tariff(rate.rate_per_min, rate.connect_fee, rate.initial_s, rate.subsequent_s)
            opens.append(ReservationRequest(ev.subject, d.call_id, d.direction, tariff))
            updates.append(CallProgress(ev.subject, d.call_id, int(d.answered_at.timestamp()), 0))
        else:
            started = int(ev.time.timestamp()) - d.elapsed_s
            updates.append(CallProgress(ev.subject, d.call_id, started, d.elapsed_s))
    kw = {"now_s": now_s, "grant_s": cc.grant_s, "grace_s": cc.grace_s, "max_s": cc.max_s}
    plans = plan_periods(get, {u.account_id for u in updates}, now_s)
    await balances.reserve_many(opens, force=True, plans=plans, **kw)
    results = await balances.progress(updates, plans=plans, **kw)
    return [(u.account_id, s) for u, r in zip(updates, results, strict=True) for s in r.outbox]


async def restore_late_markers(
    balances: BalanceStore, ledger: Ledger, charges: list[Charge], now: float
) -> int:
    """Before the debit: hangups of calls answered so long ago that the sweep's provisional
    marker may have been dropped (``keys.PROVISIONAL_LOOKUP_S``) are looked up in the ledger,
    and the marker of each provisional charge not settled yet is put back, so ``debit.lua``
    settles the charge instead of charging the call a second time in full. Markers Redis lost
    with an account are put back by its rebuild (``balance.accounts.load_into_redis``).
    Returns how many were put back."""
    horizon = now - keys.PROVISIONAL_LOOKUP_S
    late = [
        (c.account_id, c.call_id)
        for c in charges
        if c.call_id and not c.code and c.answered_at < horizon
    ]
    if not late:
        return 0
    open_charges = await ledger.unsettled(late)
    if not open_charges:
        return 0
    restored = await balances.restore_provisional(open_charges, now_s=int(now))
    if restored:
        log.warning("put back %d provisional markers for late hangups", restored)
    return restored


async def sweep_reservations(balances: BalanceStore, ledger: Ledger, now_s: int) -> int:
    """Close reservations whose call was never closed: charge what each held, provisionally,
    or release one that held nothing (docs/design/call-credit.md "The life of a
    reservation"). Redis first (the script that closes a reservation debits its charge and
    leaves a marker a late hangup settles against), then the ledger row, idempotent on
    (account, call_id); the expiry index keeps the call due until that row is written, so a
    crash in between is repaired by the next sweep, which finds the same charge and writes the
    row again. Returns how many were closed."""

    async def record(charged: list[Provisional]) -> None:
        await ledger.write_usage(
            [],
            [
                provisional_row(
                    p.account_id,
                    p.call_id,
                    charged=p.charged,
                    held_s=p.held_s,
                    at=datetime.fromtimestamp(p.charged_at, UTC),
                    settle=False,
                )
                for p in charged
            ],
        )

    swept = await balances.sweep_expired(now_s=now_s, keep_s=keys.PROVISIONAL_KEEP_S, record=record)
    provisional = sum(1 for s in swept if isinstance(s, Provisional) and s.new)
    released = sum(1 for s in swept if isinstance(s, Released))
    if provisional:
        log.warning("charged %d reservations whose hangup never came, provisionally", provisional)
        metrics.RESERVATIONS_SWEPT.labels("provisional").inc(provisional)
    if released:
        log.warning("released %d reservations whose hangup never came", released)
        metrics.RESERVATIONS_SWEPT.labels("released").inc(released)
    return provisional + released
