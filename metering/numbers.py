"""Number fees: the charges of ``number.activated`` events, by the same debit path as calls
and messages.

``number.activated``: the price list's ``number_setup`` one-time fee if it has one, plus the
monthly fee of the event's month (UTC), whole whatever the day: a number is paid a month at a
time, in advance. Fees are those in force at the event's time. A price list without these fees
charges 0: the ledger row still records that the event was accounted for, as for a call that
billed nothing. ``number.renewal_due`` is validated here (its ``period`` too: ``bad_period``)
and acknowledged: the renewal itself is the numbers worker's (``enforcement.numbers``), which
knows the number's auto-pay and status and takes the fee only when the credit covers it.
``number.deactivated``: nothing (the month was paid in advance, nothing is refunded),
acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from balance.keys import DAY_S
from contracts.events import MIN_EVENT_TIME, period_problem
from infra import metrics
from infra.ledger import event_key
from metering.batch import BatchOutcome, Charge, Record, Rejected
from metering.rate import fingerprint
from metering.validate import future, too_early, unknown_account
from rating.catalog import AccountRating
from rating.rating import NUMBER_SETUP_FEE, NoRate


def rate_numbers(
    events: list[tuple[Record, Any]],
    *,
    get: Callable[[str], AccountRating | None],
    latest: float,
    rejected: list[Rejected],
    out: BatchOutcome,
) -> list[Charge]:
    """One charge per activation in ``events`` (see the module docstring); each event that is
    not valid is appended to ``rejected``, each renewal and deactivation counted in
    ``out.acknowledged``. ``get`` and ``latest`` as for ``metering.rate.rate``."""
    charges: list[Charge] = []
    for rec, ev in events:
        epoch = int(ev.time.timestamp())
        if epoch > latest:
            rejected.append(future(rec, ev))
            continue
        if epoch < MIN_EVENT_TIME:
            rejected.append(too_early(rec, ev, "time", ev.time))
            continue
        acct = get(ev.subject)
        if acct is None:
            rejected.append(unknown_account(rec, ev))
            continue
        utc = datetime.fromtimestamp(epoch, UTC)
        if ev.type == "number.renewal_due":
            problem = period_problem(ev.data.period, utc.year, utc.month)
            if problem:
                rejected.append(
                    Rejected(record=rec, reason="bad_period", detail=problem, type=ev.type)
                )
                continue
        if ev.type != "number.activated":
            out.acknowledged += 1
            metrics.EVENTS_ACKNOWLEDGED.labels(ev.type).inc()
            continue
        plist = acct.price_list
        fees, amount = ["monthly"], plist.rate_numbers(1, at=epoch)
        try:
            amount += plist.one_time_fee(NUMBER_SETUP_FEE, at=epoch)
            fees.insert(0, NUMBER_SETUP_FEE)
        except NoRate:
            pass  # the price list charges no setup
        period = f"{utc.year:04d}-{utc.month:02d}"
        charges.append(
            Charge(
                record=rec,
                type=ev.type,
                account_id=ev.subject,
                event_key=event_key(ev.source, ev.id),
                fingerprint=fingerprint(rec.value),  # type: ignore[arg-type]  # checked in validation
                amount=amount,
                kind="fee",
                quantity=1,
                ref=ev.data.number,
                rate_ref=f"{plist.id}:{'+'.join(fees)}:{period}",
                time=ev.time,
                epoch=epoch,
                day=epoch // DAY_S,
                call_id="",
                answered_at=0,
                billing_group=(
                    ""
                    if acct.groups is None
                    else acct.groups.of_number(ev.data.number, ev.data.billing_group_id)
                ),
                direction="",
                from_party="",
                to_party=ev.data.number,
                source=ev.source,
                event_id=ev.id,
            )
        )
    return charges
