"""Plans with included minutes, add-on minute bundles, and the account's bucket of seconds.

An account's bucket holds *grants* of voice seconds, each usable from ``valid_from`` until
``expires_at`` (unix seconds):

- its plan's allowance for the billing period (a calendar month, UTC): created by
  ``enforcement/lua/debit.lua`` at the period's first call, gone at the period's end;
- bundles bought from the balance (``buy_bundle``), each valid ``validity_days`` from purchase.

A call draws *billed* seconds (after increments) from the grants valid at its ``answered_at``,
the soonest to expire first; what the bucket cannot cover is charged in money at the call's
rate (``ceil(rate_per_min * overage_s / 60)``, the connect fee always). The draw happens in the
same Lua script as the debit, idempotently with the event: a duplicate draws nothing again.
The bucket lives in the account hash's ``min`` field (see ``enforcement/keys.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg

from enforcement.balance import RedisBalances
from meter.ledger import credit_key

BUNDLE_SOURCE: Final = "urn:meter:bundles"


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


class BundleError(Exception):
    """The bundle was definitely not bought (``reason``: unknown_bundle, unknown_account,
    insufficient_credit)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BundlePurchase:
    account_id: str
    purchase_id: str
    bundle_id: str
    seconds: int
    price: int  # micro-units taken from the balance
    valid_from: datetime
    expires_at: datetime
    applied: bool  # False: this purchase id was bought before (nothing taken again)
    balance: int  # micro-units after the purchase


async def buy_bundle(
    pool: asyncpg.Pool,
    balances: RedisBalances,
    account_id: str,
    bundle_id: str,
    purchase_id: str,
    *,
    now: datetime | None = None,
) -> BundlePurchase:
    """Buy a bundle from the balance: its price is debited and its seconds land in the
    account's bucket in one Redis script, once per ``purchase_id`` (the caller's idempotency
    key, ``[A-Za-z0-9_.:-]{1,64}``).

    Redis first (it decides atomically whether the available credit covers the price), then
    the ledger row and the purchase row, idempotent on the purchase id. After a crash or
    ``OutcomeUnknown``, call again with the same ``purchase_id``: nothing is taken twice and the
    missing rows are written. Raises ``BundleError`` when nothing was bought.

    This is the function the HTTP endpoint should call (``POST /v1/accounts/{id}/bundles``).
    """
    now = now or datetime.now(UTC)
    row = await pool.fetchrow(
        "SELECT seconds, price, validity_days FROM bundles WHERE id = $1", bundle_id
    )
    if row is None:
        raise BundleError("unknown_bundle", f"no bundle {bundle_id!r}")
    prior = await pool.fetchrow(
        "SELECT * FROM bundle_purchases WHERE account_id = $1 AND purchase_id = $2",
        account_id,
        purchase_id,
    )
    if prior is not None:  # its terms, not today's, so a retry sends Redis the same grant
        seconds, price = prior["seconds"], prior["price"]
        valid_from, expires_at = prior["valid_from"], prior["expires_at"]
    else:
        seconds, price = row["seconds"], row["price"]
        valid_from, expires_at = now, now + timedelta(days=row["validity_days"])
    out = await balances.grant_minutes(
        account_id,
        "b" + purchase_id,
        price=price,
        seconds=seconds,
        valid_from=int(valid_from.timestamp()),
        expires_at=int(expires_at.timestamp()),
        now_s=int(now.timestamp()),
    )
    if out.result == "unknown_account":
        raise BundleError("unknown_account", f"account {account_id!r} has no balance state")
    if out.result == "insufficient_credit":
        raise BundleError("insufficient_credit", f"the available credit does not cover {price}")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO bundle_purchases (account_id, purchase_id, bundle_id, seconds, price,"
            " valid_from, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            account_id,
            purchase_id,
            bundle_id,
            seconds,
            price,
            valid_from,
            expires_at,
        )
        await conn.execute(
            "INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, rate_ref,"
            " event_time, source, event_id) VALUES ($1, $2, 'bundle', $3, $4, $5, $6, $7, $8, $5)"
            " ON CONFLICT DO NOTHING",
            credit_key(account_id, "bundle:" + purchase_id),
            account_id,
            -price,
            seconds,
            purchase_id,
            bundle_id,
            valid_from,
            BUNDLE_SOURCE,
        )
    return BundlePurchase(
        account_id,
        purchase_id,
        bundle_id,
        seconds,
        price,
        valid_from,
        expires_at,
        out.result == "applied",
        out.balance,
    )
