"""Plans with included minutes, add-on minute bundles, and the account's bucket of seconds.

An account's bucket holds *grants* of voice seconds, each usable from ``valid_from`` until
``expires_at`` (unix seconds):

- its plan's allowance for the billing period (a calendar month, UTC): created by
  ``balance/lua/debit.lua`` at the period's first call, gone at the period's end;
- bundles bought from the balance (``balance.bundles.buy_bundle``), each valid
  ``validity_days`` from purchase.

A call draws *billed* seconds (after increments) from the grants valid at its ``answered_at``,
the soonest to expire first; what the bucket cannot cover is charged in money at the call's
rate (``ceil(rate_per_min * overage_s / 60)``, the connect fee always). The draw happens in the
same Lua script as the debit, idempotently with the event: a duplicate draws nothing again.
The bucket lives in the account hash's ``min`` field (see ``balance/keys.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    included_s: int  # voice seconds included per calendar month; 0 = pay as you go


def month_period(epoch_s: int) -> tuple[int, int]:
    """``(start, end)`` unix seconds of the calendar month (UTC) holding ``epoch_s``."""
    t = datetime.fromtimestamp(epoch_s, UTC)
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    end = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp()), int(end.timestamp())


@dataclass(frozen=True, slots=True)
class Grant:
    """Seconds in an account's bucket: ``p<period start>`` for a plan period, ``b<purchase id>``
    for a bundle."""

    id: str
    remaining_s: int
    valid_from: int
    expires_at: int


def parse_bucket(raw: bytes | str | None) -> list[Grant]:
    """The grants of a ``min`` field (``id,remaining,from,to`` joined by ``;``)."""
    if not raw:
        return []
    text = raw.decode() if isinstance(raw, bytes) else raw
    out = []
    for part in text.split(";"):
        gid, rem, frm, to = part.split(",")
        out.append(Grant(gid, int(rem), int(frm), int(to)))
    return out


def preview_draw(grants: list[Grant], billed_s: int, at: int) -> int:
    """Seconds a call of ``billed_s`` answered at ``at`` would draw now (nothing is drawn)."""
    usable = sum(g.remaining_s for g in grants if g.valid_from <= at < g.expires_at)
    return min(usable, billed_s)


# -- rebuilding a bucket from the book of record ---------------------------------------------

#: debit.lua and grant.lua keep a grant this long past its end (late calls of the period).
GRANT_KEEP_S: Final = 86_400


@dataclass(frozen=True, slots=True)
class Draw:
    """A call that drew included seconds, as the ledger has it."""

    entry_id: int  # ledger order: the order debit.lua drew in
    ended: int  # the hangup event's time, unix s
    billed_s: int
    drawn_s: int
    recorded: int = 0  # when the ledger recorded it (its batch's time), unix s


@dataclass(slots=True)
class _Replayed:
    id: str
    remaining_s: int
    valid_from: int
    expires_at: int
    since_entry: int  # in the bucket for draws from this ledger entry on


def format_bucket(grants: list[Grant]) -> str:
    """A ``min`` field (``parse_bucket`` reads it back)."""
    return ";".join(f"{g.id},{g.remaining_s},{g.valid_from},{g.expires_at}" for g in grants)


def _live(bundles: list[Grant], plan_s: int, now: int) -> list[int]:
    """``valid_from`` of the grants a bucket rebuilt at ``now`` may still hold."""
    starts = [g.valid_from for g in bundles if g.expires_at + GRANT_KEEP_S > now]
    if plan_s:
        start, _ = month_period(now)
        starts.append(start)
        prev, _ = month_period(start - 1)
        if start + GRANT_KEEP_S > now:  # last period's grant lives a day into this one
            starts.append(prev)
    return starts


def replay_since(bundles: list[Grant], plan_s: int, now: int) -> int | None:
    """From when draws must be replayed to rebuild the grants still alive at ``now``; None when
    none can be.

    A call answered at t drew from the grants valid at t, soonest to expire first: to know what
    the live grants gave, every grant valid at some time after the earliest live ``valid_from``
    must be replayed too, and so on back until no earlier grant overlaps (a fixed point; plan
    periods do not overlap, so only bundles reach back)."""
    starts = _live(bundles, plan_s, now)
    if not starts:
        return None
    since = min(starts)
    while True:
        earlier = [g.valid_from for g in bundles if g.expires_at > since]
        if plan_s:
            earlier.append(month_period(since)[0])
        first = min([since, *earlier])
        if first == since:
            return since
        since = first


def replay_bucket(
    bundles: list[Grant],
    plan_s: int,
    periods: dict[int, int],
    draws: list[Draw],
    now: int,
) -> list[Grant]:
    """The grants a bucket holds at ``now``, replaying the ledger's draws as debit.lua made them.

    The ledger records how many seconds a call drew (``included_s``), not from which grant, nor
    when the call was answered, so the draws are replayed in ledger order (``entry_id``, the
    order debit.lua applied them in), each from the grants valid at the call's answer, soonest
    to expire first (equal ends by id; debit.lua's own order among them is arbitrary). The
    answer is taken as the hangup's time less the billed seconds, which is at most one billing
    increment early; should that miss the grants the call drew from, those valid at the hangup
    are used. ``periods``: period start -> the ``entry_id`` of the first usage recorded in that
    period, when debit.lua created the plan's grant (at its first charge). Bundles: as bought
    (``bundle_purchases``).

    Not recorded, hence assumed: the plan had its current allowance ``plan_s`` in every period
    replayed (plan history is not kept). A draw no replayed grant can explain (say, from an
    allowance the plan no longer has) is left out rather than taken from another grant.
    """
    grants = [_Replayed(g.id, g.remaining_s, g.valid_from, g.expires_at, 0) for g in bundles]
    if plan_s:
        for start, first in periods.items():
            grants.append(_Replayed(f"p{start}", plan_s, start, month_period(start)[1], first))
    grants.sort(key=lambda g: (g.expires_at, g.id))
    for d in sorted(draws, key=lambda d: d.entry_id):
        need = d.drawn_s
        for at in (d.ended - d.billed_s, d.ended):
            for g in grants:
                if need == 0:
                    break
                if (
                    g.remaining_s > 0
                    and g.since_entry <= d.entry_id
                    and g.valid_from <= at < g.expires_at
                ):
                    take = min(g.remaining_s, need)
                    g.remaining_s -= take
                    need -= take
    return [
        Grant(g.id, g.remaining_s, g.valid_from, g.expires_at)
        for g in grants
        if g.expires_at + GRANT_KEEP_S > now and (g.remaining_s > 0 or g.id.startswith("p"))
    ]


def _previous_periods(periods: dict[int, int], draws: list[Draw]) -> None:
    """Add to ``periods`` the grants debit.lua created for calls of the month before: a call
    answered in a month and drawing in the next one's first day draws on the month it was
    answered in, whose grant debit.lua creates then if no charge of that month had
    (``PlanPeriod.previous_start``). Its answer is taken as ``replay_bucket`` takes it."""
    for d in draws:
        start = month_period(d.recorded)[0]
        if not start <= d.recorded < start + GRANT_KEEP_S:
            continue
        answered = d.ended - d.billed_s
        if answered < start:
            prev = month_period(answered)[0]
            if prev == month_period(start - 1)[0]:
                periods[prev] = min(periods.get(prev, d.entry_id), d.entry_id)


async def rebuild_buckets(
    conn: asyncpg.Pool | asyncpg.Connection, plans: Mapping[str, int], *, now: int
) -> dict[str, str]:
    """The ``min`` field of each account (``plans``: account -> included seconds of its plan,
    0 for none) as the book of record says it stands at ``now``; accounts with nothing left to
    hold are absent. Three queries whatever the number of accounts; accounts without a plan or
    a bundle cost nothing past the first. See ``replay_bucket`` for what is exact."""
    ids = list(plans)
    if not ids:
        return {}
    bundles: dict[str, list[Grant]] = {}
    for r in await conn.fetch(
        "SELECT account_id, purchase_id, seconds, valid_from, expires_at FROM bundle_purchases"
        " WHERE account_id = ANY($1::text[])",
        ids,
    ):
        bundles.setdefault(r["account_id"], []).append(
            Grant(
                "b" + r["purchase_id"],
                r["seconds"],
                int(r["valid_from"].timestamp()),
                int(r["expires_at"].timestamp()),
            )
        )
    since: dict[str, int] = {}
    for a in ids:
        s = replay_since(bundles.get(a, []), plans[a], now)
        if s is not None:
            since[a] = s
    if not since:
        return {}
    window = (
        list(since),
        [datetime.fromtimestamp(s, UTC) for s in since.values()],
    )
    draws: dict[str, list[Draw]] = {}
    for r in await conn.fetch(
        "SELECT l.account_id, l.entry_id, l.event_time, l.quantity, l.included_s, l.recorded_at"
        " FROM unnest($1::text[], $2::timestamptz[]) AS w(account_id, since)"
        " JOIN ledger l ON l.account_id = w.account_id AND l.event_time >= w.since"
        " WHERE l.kind = 'call' AND l.included_s > 0",
        *window,
    ):
        draws.setdefault(r["account_id"], []).append(
            Draw(
                r["entry_id"],
                int(r["event_time"].timestamp()),
                r["quantity"],
                r["included_s"],
                int(r["recorded_at"].timestamp()),
            )
        )
    periods: dict[str, dict[int, int]] = {}
    with_plan = [a for a in since if plans[a]]
    if with_plan:
        # debit.lua creates a period's grant at the first charge it applies in that period:
        # the ledger's recorded_at is when that batch was written, moments later.
        for r in await conn.fetch(
            "SELECT l.account_id, date_trunc('month', l.recorded_at AT TIME ZONE 'UTC') AS month,"
            " min(l.entry_id) AS first"
            " FROM unnest($1::text[], $2::timestamptz[]) AS w(account_id, since)"
            " JOIN ledger l ON l.account_id = w.account_id AND l.recorded_at >= w.since"
            " WHERE l.kind IN ('call', 'sms', 'fee') GROUP BY 1, 2",
            with_plan,
            [datetime.fromtimestamp(since[a], UTC) for a in with_plan],
        ):
            start = int(r["month"].replace(tzinfo=UTC).timestamp())
            periods.setdefault(r["account_id"], {})[start] = r["first"]
        for a in with_plan:
            _previous_periods(periods.setdefault(a, {}), draws.get(a, []))
    out = {}
    for a in since:
        grants = replay_bucket(
            bundles.get(a, []), plans[a], periods.get(a, {}), draws.get(a, []), now
        )
        if grants:
            out[a] = format_bucket(grants)
    return out
