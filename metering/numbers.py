"""Number fees: the charges of ``number.*`` events, by the same debit path as calls and messages.

``number.activated``: the price list's ``number_setup`` one-time fee if it has one, plus the
monthly fee of the event's month (UTC), whole whatever the day: a number is paid a month at a
time, in advance. ``number.renewal_due``: the monthly fee of its ``period``.
``number.deactivated``: nothing (the month was paid in advance, nothing is refunded),
acknowledged. Fees are those in force at the event's time. A price list without these fees
charges 0: the ledger row still records that the event was accounted for, as for a call that
billed nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from balance.keys import DAY_S
from infra import metrics
from infra.ledger import event_key
from metering.batch import BatchOutcome, Charge, Record, Rejected
from metering.rate import fingerprint
from metering.validate import MIN_EVENT_TIME, future, too_early, unknown_account
from rating.catalog import AccountRating
from rating.rating import NoRate

#: The one-time fee an activation charges when the account's price list defines it.
NUMBER_SETUP_FEE: Final = "number_setup"
#: How far a renewal's ``period`` may be from the month of the event's own time. Inventory
#: announces a renewal at most a month ahead, and may catch up on a year's backlog after an
#: outage; anything further is a producer bug (a swapped year, "0000-01"), not a month to bill.
RENEWAL_MONTHS_AHEAD: Final = 1
RENEWAL_MONTHS_BEHIND: Final = 12


def period_problem(period: str, year: int, month: int) -> str:
    """Why a renewal's ``period`` ("YYYY-MM", its form checked by the contract) cannot be
    billed for an event of ``year``-``month``; "" when it can."""
    ahead = int(period[:4]) * 12 + int(period[5:7]) - (year * 12 + month)
    if ahead > RENEWAL_MONTHS_AHEAD:
        return (
            f"period {period} is {ahead} months after the event's month {year:04d}-{month:02d};"
            f" a renewal may be due at most {RENEWAL_MONTHS_AHEAD} month ahead"
        )
    if -ahead > RENEWAL_MONTHS_BEHIND:
        return (
            f"period {period} is {-ahead} months before the event's month"
            f" {year:04d}-{month:02d}; a renewal may be at most {RENEWAL_MONTHS_BEHIND}"
            " months late"
        )
    return ""


def rate_numbers(
    events: list[tuple[Record, Any]],
    *,
    get: Callable[[str], AccountRating | None],
    latest: float,
    rejected: list[Rejected],
    out: BatchOutcome,
) -> list[Charge]:
    """One charge per activation or renewal in ``events`` (see the module docstring); each
    one that cannot be charged is appended to ``rejected``, each deactivation counted in
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
        if ev.type == "number.deactivated":
            out.acknowledged += 1
            metrics.EVENTS_ACKNOWLEDGED.labels(ev.type).inc()
            continue
        plist = acct.price_list
        utc = datetime.fromtimestamp(epoch, UTC)
        if ev.type == "number.activated":
            fees, amount = ["monthly"], plist.rate_numbers(1, at=epoch)
            try:
                amount += plist.one_time_fee(NUMBER_SETUP_FEE, at=epoch)
                fees.insert(0, NUMBER_SETUP_FEE)
            except NoRate:
                pass  # the price list charges no setup
            period = f"{utc.year:04d}-{utc.month:02d}"
        else:
            period = ev.data.period  # a NumberRenewalDueData
            problem = period_problem(period, utc.year, utc.month)
            if problem:
                rejected.append(
                    Rejected(record=rec, reason="bad_period", detail=problem, type=ev.type)
                )
                continue
            fees, amount = ["monthly"], plist.rate_numbers(1, at=epoch)
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
