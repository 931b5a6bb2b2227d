"""Buying a minute bundle from the balance: its price debited and its seconds granted at once.

The bucket the bundle lands in, and how calls draw from it, is described in ``rating.plans``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from balance.protocol import BalanceStore
from contracts.money import format_money
from infra.clock import Clock, system_clock, utc_datetime
from infra.ledger import Ledger, PostgresLedger, credit_key


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
    balances: BalanceStore,
    account_id: str,
    bundle_id: str,
    purchase_id: str,
    *,
    now: datetime | None = None,
    clock: Clock = system_clock,
    ledger: Ledger | None = None,
) -> BundlePurchase:
    """Buy a bundle from the balance: its price is debited and its seconds land in the
    account's bucket in one Redis script, once per ``purchase_id`` (the caller's idempotency
    key, ``[A-Za-z0-9_.:-]{1,64}``).

    Redis first (it decides atomically whether the available credit covers the price), then
    the ledger row and the purchase row, idempotent on the purchase id; a purchase the ledger
    has already is answered without asking Redis again. After a crash or
    ``OutcomeUnknown``, call again with the same ``purchase_id``: nothing is taken twice and the
    missing rows are written. Raises ``BundleError`` when nothing was bought.

    This is the function the HTTP endpoint should call (``POST /v1/accounts/{id}/bundles``).
    ``now`` (aware) defaults to ``clock``: the purchase's validity starts then. ``ledger``:
    the book of record (default: this pool's).
    """
    ledger = ledger or PostgresLedger(pool)
    now = now or utc_datetime(clock)
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
    if prior is not None and await ledger.existing(
        [credit_key(account_id, "bundle:" + purchase_id)]
    ):
        # Bought and booked: answered as it was, never granted again. Redis may have lost its
        # memory of the grant (a rebuild does not keep it), and would otherwise take the price
        # and add the seconds a second time on top of the rebuilt balance.
        st = await balances.get(account_id)
        return BundlePurchase(
            account_id,
            purchase_id,
            prior["bundle_id"],
            seconds,
            price,
            valid_from,
            expires_at,
            False,
            0 if st is None else st.balance,
        )
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
        raise BundleError(
            "insufficient_credit", f"the available credit does not cover {format_money(price)}"
        )
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
        await ledger.record_bundle(
            conn,
            account_id=account_id,
            purchase_id=purchase_id,
            bundle_id=bundle_id,
            price=price,
            seconds=seconds,
            valid_from=valid_from,
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
