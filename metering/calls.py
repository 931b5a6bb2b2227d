"""Live calls: ``call.answered`` and ``call.progress`` on reservations, and the sweep of calls
whose hangup never came.

A hangup is a charge like any other (``metering.rate``) and releases its call's reservation
with the debit. The updates before it are not charges: they act on the reservation the
authorization made (``balance.store.reserve_many`` / ``progress``), with the same rules as the
API's authorizations (``infra.settings.CallControl``), and may queue signals in the account's
outbox (``call.terminate`` where the credit runs out), which the batch publishes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from balance.protocol import BalanceStore
from balance.values import CallProgress, ReservationRequest, Tariff
from infra import metrics
from infra.settings import CallControl
from metering.apply import plan_periods
from metering.batch import AccountSignal, Record, Rejected
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


async def sweep_reservations(balances: BalanceStore, now_s: int) -> int:
    """Release reservations whose call was never closed. Nothing is charged for them (the
    switch's hangup is the only charge, and a late one is still charged once). Returns how
    many were released."""
    swept = await balances.sweep_expired(now_s=now_s)
    if swept:
        log.warning("released %d reservations whose hangup never came", len(swept))
        metrics.RESERVATIONS_SWEPT.inc(len(swept))
    return len(swept)
