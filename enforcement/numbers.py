"""The numbers inventory and each number's life: Active, On Hold, Released
(docs/design/numbers.md). The only writer of ``numbers``.

The inventory is kept from ``telephony.number-events`` (``NumberLifecycle.on_event``): an
activation adds the number (paid through the month of activation, which the metering workers
charge with its setup fee), a deactivation by inventory releases it. Renewals are this
module's: the monthly fee of each month is charged once per number, lease and month, when
inventory announces it (``number.renewal_due``) or when the month starts, whichever comes
first (``NumberLifecycle.tick``, run by ``meter run billing``):

- auto-pay on and the available credit covers the fee: charged (``number.lua``), Active;
- not covered: auto-recharge gets its chance first (an open trigger is waited for up to
  ``NumberRules.recharge_wait_s``), then the number goes **On Hold** (``number.hold``);
- auto-pay off: On Hold at the month's start, nothing charged;
- On Hold: each tick tries the renewal again (auto-pay on): a payment or recharge in the grace
  period renews it, the month charged once, ``number.resume``; at the end of the grace period
  it is **Released** (``number.release``) and never charged again.

A customer's release is at once: ``number.release``, no further charges, the month already
paid not refunded. Every step runs under the number's row lock, Redis first (it decides
whether the credit covers the fee, atomically, and queues the signal in the account's ``seq``
order), then the ledger row and the inventory row in one transaction; a step is once-only by
its token in Redis and by its event key in the ledger, so a retry after any crash is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import asyncpg

from balance.errors import BalanceStoreError
from balance.keys import DAY_S
from balance.protocol import BalanceStore
from contracts.events import NumberActivated, NumberDeactivated, NumberRenewalDue
from enforcement.groups import assign_number
from infra.clock import Clock, system_clock
from infra.ledger import NUMBERS_SOURCE, Conn, Ledger, PostgresLedger, UsageRow, credit_key
from infra.metrics import NUMBER_STEPS
from rating.catalog import AccountRating
from rating.rating import NUMBER_SETUP_FEE, NoRate

log = logging.getLogger(__name__)

NumberStatus = Literal["active", "on_hold", "released"]
NUMBER_STATUSES: Final[tuple[NumberStatus, ...]] = ("active", "on_hold", "released")

#: Reasons of number signals and of the inventory's rows.
RENEWAL_UNPAID: Final = "renewal_unpaid"
AUTO_PAY_OFF: Final = "auto_pay_off"
GRACE_EXPIRED: Final = "grace_expired"
CUSTOMER: Final = "customer"
DEACTIVATED: Final = "deactivated"

NumberEvent = NumberActivated | NumberRenewalDue | NumberDeactivated
#: An account's price list, plan and billing groups (``rating.catalog.Catalog.lookup``).
RatingLookup = Callable[[str], Awaitable[AccountRating | None]]


@dataclass(frozen=True, slots=True)
class NumberRules:
    """``grace_s``: how long a number stays On Hold before it is released;
    ``recharge_wait_s``: how long an uncovered renewal waits for an open auto-recharge."""

    grace_s: int = 7 * DAY_S
    recharge_wait_s: int = 600


@dataclass(frozen=True, slots=True)
class Number:
    account_id: str
    number: str
    lease: int
    status: NumberStatus
    auto_pay: bool
    monthly_fee: int
    one_time_fees: int
    activated_at: datetime
    paid_through: str
    unpaid_since: datetime | None
    held_at: datetime | None
    hold_reason: str | None
    grace_until: datetime | None
    released_at: datetime | None
    release_reason: str | None
    updated_at: datetime
    billing_group_id: str | None

    @property
    def next_renewal(self) -> datetime | None:
        """When the next month's fee is due (None once released)."""
        return None if self.status == "released" else period_start(next_period(self.paid_through))


def month_of(at: datetime) -> str:
    utc = at.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def next_period(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f"{year + 1:04d}-01" if month == 12 else f"{year:04d}-{month + 1:02d}"


def period_start(period: str) -> datetime:
    return datetime(int(period[:4]), int(period[5:7]), 1, tzinfo=UTC)


def renewal_key(account_id: str, number: str, lease: int, period: str) -> bytes:
    """The ledger's event key of one renewal: one per account, number, lease and month."""
    return credit_key(account_id, f"number:{number}:{lease}:{period}")


_COLUMNS: Final = (
    "n.account_id, n.number, n.lease, n.status, n.auto_pay, n.monthly_fee, n.one_time_fees,"
    " n.activated_at, n.paid_through, n.unpaid_since, n.held_at, n.hold_reason, n.grace_until,"
    " n.released_at, n.release_reason, n.updated_at, g.billing_group_id"
)
_FROM: Final = (
    " FROM numbers n LEFT JOIN number_groups g"
    " ON g.account_id = n.account_id AND g.number = n.number"
)


def _number(r: asyncpg.Record) -> Number:
    return Number(**dict(r))


async def get(pool: asyncpg.Pool, account_id: str, number: str) -> Number | None:
    r = await pool.fetchrow(
        f"SELECT {_COLUMNS}{_FROM} WHERE n.account_id = $1 AND n.number = $2", account_id, number
    )
    return None if r is None else _number(r)


async def list_numbers(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    status: NumberStatus | None = None,
    billing_group_id: str | None = None,
    before: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[Number]:
    """The account's numbers, newest activation first (then by number), from ``before`` (the
    last ``(activated_at, number)`` of the page before)."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS}{_FROM} WHERE n.account_id = $1"
        " AND ($2::text IS NULL OR n.status = $2)"
        " AND ($3::text IS NULL OR g.billing_group_id = $3)"
        " AND ($4::timestamptz IS NULL OR (n.activated_at, n.number) < ($4, $5))"
        " ORDER BY n.activated_at DESC, n.number DESC LIMIT $6",
        account_id,
        status,
        billing_group_id,
        None if before is None else before[0],
        None if before is None else before[1],
        limit,
    )
    return [_number(r) for r in rows]


async def set_auto_pay(
    pool: asyncpg.Pool, account_id: str, number: str, on: bool, *, now: datetime
) -> bool:
    """False: the account has no such number. A released number keeps its flag but is never
    charged again; a number On Hold with auto-pay turned on is renewed by the next tick."""
    done = await pool.fetchval(
        "UPDATE numbers SET auto_pay = $3, updated_at = $4"
        " WHERE account_id = $1 AND number = $2 RETURNING 1",
        account_id,
        number,
        on,
        now,
    )
    return done is not None


async def _locked(conn: Conn, account_id: str, number: str) -> Number | None:
    r = await conn.fetchrow(
        f"SELECT {_COLUMNS}{_FROM} WHERE n.account_id = $1 AND n.number = $2 FOR UPDATE OF n",
        account_id,
        number,
    )
    return None if r is None else _number(r)


class NumberLifecycle:
    """The numbers' steps (see the module docstring), on the balance store, the ledger and the
    inventory. ``rating``: the accounts' price lists and billing groups (a ``Catalog``'s
    ``lookup``); ``clock``: the one clock every step reads its ``now`` from."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        balances: BalanceStore,
        rating: RatingLookup,
        *,
        rules: NumberRules = NumberRules(),
        clock: Clock = system_clock,
        ledger: Ledger | None = None,
    ) -> None:
        self._pool = pool
        self._balances = balances
        self._rating = rating
        self._rules = rules
        self._clock = clock
        self._ledger = ledger or PostgresLedger(pool)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)

    # -- from inventory --------------------------------------------------------------------

    async def on_event(self, ev: NumberEvent) -> str:
        """Keep the inventory from one of inventory's events; what it did (for the metrics):
        ``activated``, ``deactivated``, a renewal's outcome (see ``advance``), or ``ignored``
        (an unknown account, a repeat, a number not in the inventory, stale)."""
        account_id, number = ev.subject, ev.data.number
        if isinstance(ev, NumberRenewalDue):
            return await self.advance(account_id, number, upto=ev.data.period)
        if isinstance(ev, NumberActivated):
            outcome = await self._activated(account_id, number, ev.time, ev.data.billing_group_id)
        else:
            outcome = await self._deactivated(account_id, number, ev.time)
        NUMBER_STEPS.labels(outcome).inc()
        return outcome

    async def _activated(
        self, account_id: str, number: str, at: datetime, stated_group: str | None
    ) -> str:
        rating = await self._rating(account_id)
        if rating is None:
            return "ignored"
        epoch = int(at.timestamp())
        monthly = rating.price_list.rate_numbers(1, at=epoch)
        try:
            setup = rating.price_list.one_time_fee(NUMBER_SETUP_FEE, at=epoch)
        except NoRate:
            setup = 0
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            # A new lease only for a number that is not the account's now, and only for an
            # activation after its release (a late repeat of the old one changes nothing).
            done = await conn.fetchval(
                "INSERT INTO numbers AS n (account_id, number, status, monthly_fee,"
                " one_time_fees, activated_at, paid_through, updated_at)"
                " VALUES ($1, $2, 'active', $3, $4, $5, $6, $7)"
                " ON CONFLICT (account_id, number) DO UPDATE SET lease = n.lease + 1,"
                " status = 'active', auto_pay = true, monthly_fee = $3, one_time_fees = $4,"
                " activated_at = $5, paid_through = $6, unpaid_since = NULL, held_at = NULL,"
                " hold_reason = NULL, grace_until = NULL, released_at = NULL,"
                " release_reason = NULL, updated_at = $7"
                " WHERE n.status = 'released' AND n.released_at <= $5 RETURNING 1",
                account_id,
                number,
                monthly,
                setup,
                at,
                month_of(at),
                now,
            )
            if done is None:
                return "ignored"
        # The group the event names, when it is one of the account's and the number has none
        # yet (``rating.groups``: an assignment of the account's own wins).
        groups = rating.groups
        if (
            stated_group is not None
            and groups is not None
            and stated_group in groups.known
            and number not in groups.numbers
        ):
            await assign_number(self._pool, account_id, number, stated_group)
        return "activated"

    async def _deactivated(self, account_id: str, number: str, at: datetime) -> str:
        """Inventory took the number back: released, no signal (telephony told us)."""
        done = await self._pool.fetchval(
            "UPDATE numbers SET status = 'released', released_at = $3, release_reason = $4,"
            " held_at = NULL, grace_until = NULL, hold_reason = NULL, unpaid_since = NULL,"
            " updated_at = $5"
            " WHERE account_id = $1 AND number = $2 AND status <> 'released'"
            " AND activated_at <= $3 RETURNING 1",
            account_id,
            number,
            at,
            DEACTIVATED,
            self._now(),
        )
        return "ignored" if done is None else "deactivated"

    # -- renewals, holds, releases ---------------------------------------------------------

    async def advance(self, account_id: str, number: str, *, upto: str | None = None) -> str:
        """Bring one number up to date at the clock's ``now``: renew each month due (up to
        ``upto`` when inventory announced one ahead, else the current month), hold it when a
        started month cannot be paid, release it when its grace period is over. Returns the
        last step: ``renewed``, ``waiting`` (for a recharge, or a month not started yet),
        ``held``, ``released``, ``current`` (nothing due), ``ignored`` (no such number, or
        released)."""
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            n = await _locked(conn, account_id, number)
            if n is None or n.status == "released":
                return "ignored"
            outcome = "current"
            target = max(month_of(now), upto or "")
            while n.paid_through < target:
                period = next_period(n.paid_through)
                step = await self._renew(conn, n, period, now)
                if step != "renewed":
                    outcome = step
                    break
                outcome = "renewed"
                n = await _locked(conn, account_id, number)
                assert n is not None
            if n.status == "on_hold" and n.grace_until is not None and now >= n.grace_until:
                outcome = await self._release(conn, n, GRACE_EXPIRED, now)
        NUMBER_STEPS.labels(outcome).inc()
        return outcome

    async def _renew(self, conn: Conn, n: Number, period: str, now: datetime) -> str:
        started = period_start(period) <= now
        if not n.auto_pay:
            return await self._hold(conn, n, period, AUTO_PAY_OFF, now) if started else "waiting"
        rating = await self._rating(n.account_id)
        if rating is None:
            return "ignored"
        fee = rating.price_list.rate_numbers(1, at=int(period_start(period).timestamp()))
        key = renewal_key(n.account_id, n.number, n.lease, period)
        if not await self._ledger.existing([key]):
            out = await self._balances.number_step(
                n.account_id,
                "renew",
                n.number,
                f"{n.lease}:{period}",
                fee=fee,
                reason="resume" if n.status == "on_hold" else "-",
                now_s=int(now.timestamp()),
            )
            if out.result == "unknown_account":
                return "ignored"
            if out.result == "insufficient_credit":
                if not started:
                    return "waiting"  # announced early: the month's start tries again
                since = n.unpaid_since or now
                if n.status == "on_hold":
                    return "waiting"
                if out.recharging and (now - since).total_seconds() < self._rules.recharge_wait_s:
                    if n.unpaid_since is None:
                        await conn.execute(
                            "UPDATE numbers SET unpaid_since = $3, updated_at = $3"
                            " WHERE account_id = $1 AND number = $2",
                            n.account_id,
                            n.number,
                            now,
                        )
                    return "waiting"
                return await self._hold(conn, n, period, RENEWAL_UNPAID, now)
            group = "" if rating.groups is None else rating.groups.of_number(n.number, None)
            await self._ledger.record_fee(conn, _renewal_row(n, period, fee, rating, group, now))
        await conn.execute(
            "UPDATE numbers SET status = 'active', paid_through = $3, monthly_fee = $4,"
            " unpaid_since = NULL, held_at = NULL, hold_reason = NULL, grace_until = NULL,"
            " updated_at = $5 WHERE account_id = $1 AND number = $2",
            n.account_id,
            n.number,
            period,
            fee,
            now,
        )
        return "renewed"

    async def _hold(self, conn: Conn, n: Number, period: str, reason: str, now: datetime) -> str:
        if n.status == "on_hold":
            return "waiting"
        out = await self._balances.number_step(
            n.account_id,
            "hold",
            n.number,
            f"{n.lease}:{period}",
            reason=reason,
            now_s=int(now.timestamp()),
        )
        if out.result == "unknown_account":
            return "ignored"
        await conn.execute(
            "UPDATE numbers SET status = 'on_hold', held_at = $3, hold_reason = $4,"
            " grace_until = $5, unpaid_since = coalesce(unpaid_since, $3), updated_at = $3"
            " WHERE account_id = $1 AND number = $2",
            n.account_id,
            n.number,
            now,
            reason,
            now + timedelta(seconds=self._rules.grace_s),
        )
        return "held"

    async def _release(self, conn: Conn, n: Number, reason: str, now: datetime) -> str:
        out = await self._balances.number_step(
            n.account_id,
            "release",
            n.number,
            str(n.lease),
            reason=reason,
            now_s=int(now.timestamp()),
        )
        if out.result == "unknown_account":
            return "ignored"
        await conn.execute(
            "UPDATE numbers SET status = 'released', released_at = $3, release_reason = $4,"
            " held_at = NULL, hold_reason = NULL, grace_until = NULL, unpaid_since = NULL,"
            " updated_at = $3 WHERE account_id = $1 AND number = $2",
            n.account_id,
            n.number,
            now,
            reason,
        )
        return "released"

    async def release(self, account_id: str, number: str, reason: str = CUSTOMER) -> Number | None:
        """The customer (or an operator) gives the number back: released at once,
        ``number.release``, no further charges, nothing refunded. None: no such number; a
        number released already is answered as it is."""
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            n = await _locked(conn, account_id, number)
            if n is None:
                return None
            if n.status != "released":
                await self._release(conn, n, reason, now)
                NUMBER_STEPS.labels("released").inc()
        return await get(self._pool, account_id, number)

    async def due(
        self, *, limit: int = 1000, after: tuple[str, str] = ("", "")
    ) -> list[tuple[str, str]]:
        """Numbers the clock's month has work for: not released, and paid through an earlier
        month, or On Hold, or waiting for a recharge; in ``(account_id, number)`` order after
        ``after``."""
        rows = await self._pool.fetch(
            "SELECT account_id, number FROM numbers WHERE status <> 'released'"
            " AND (paid_through < $1 OR status = 'on_hold' OR unpaid_since IS NOT NULL)"
            " AND (account_id, number) > ($2, $3) ORDER BY account_id, number LIMIT $4",
            month_of(self._now()),
            after[0],
            after[1],
            limit,
        )
        return [(r[0], r[1]) for r in rows]

    async def tick(self, *, batch: int = 1000) -> dict[str, int]:
        """Advance every number that has work (``due``), a batch at a time; the count of each
        outcome. A number whose step fails is logged and left for the next tick."""
        counts: dict[str, int] = {}
        after = ("", "")
        while True:
            todo = await self.due(limit=batch, after=after)
            for account_id, number in todo:
                try:
                    outcome = await self.advance(account_id, number)
                except (asyncpg.PostgresError, OSError, TimeoutError, BalanceStoreError) as exc:
                    log.warning("numbers: %s %s not advanced: %r", account_id, number, exc)
                    outcome = "failed"
                counts[outcome] = counts.get(outcome, 0) + 1
            if len(todo) < batch:
                return counts
            after = todo[-1]


def _renewal_row(
    n: Number, period: str, fee: int, rating: AccountRating, group: str, at: datetime
) -> UsageRow:
    return (
        renewal_key(n.account_id, n.number, n.lease, period),
        n.account_id,
        "fee",
        -fee,
        1,
        n.number,
        f"{rating.price_list.id}:monthly:{period}",
        at,
        NUMBERS_SOURCE,
        f"renewal:{n.number}:{n.lease}:{period}",
        None,
        0,
        group,
        "",
        "",
        n.number,
    )
