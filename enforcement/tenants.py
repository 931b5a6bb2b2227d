"""Accounts as operators and managers see them: create managed accounts, list them, read an
account's profile, and the operator's settings (credit limit, low-balance threshold,
verification level, whether it may manage accounts).

A managed account (seed 003) is created by its manager's admin, one level deep: it has its own
balance, payment method and status, it is rated with its manager's price list (it never has
one of its own through this path, and never sees one), and its opening balance is zero: money
comes in through its own payments. Operators create any account. PostgreSQL first, then Redis
(``balance.accounts.create_accounts``, idempotent), as every account is created.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from balance.accounts import AccountSpec, create_accounts
from balance.protocol import BalanceStore
from infra.clock import Clock, system_clock


class AccountConflict(Exception):
    """The id is taken, the manager cannot manage, or the price list does not exist."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True, slots=True)
class Profile:
    id: str
    name: str
    currency: str
    price_list_id: str | None
    manager_id: str | None
    is_manager: bool
    credit_limit: int
    low_balance_threshold: int
    verification_level: int
    created_at: datetime


_PROFILE = (
    "SELECT id, name, currency, price_list_id, manager_id, is_manager, credit_limit,"
    " low_balance_threshold, verification_level, created_at FROM accounts"
)


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(8)


async def profile(pool: asyncpg.Pool, account_id: str) -> Profile | None:
    r = await pool.fetchrow(_PROFILE + " WHERE id = $1", account_id)
    return None if r is None else Profile(**dict(r))


async def list_accounts(
    pool: asyncpg.Pool,
    *,
    manager_id: str | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[Profile]:
    """Accounts newest first, after the ``(created_at, id)`` ``before`` (the last of the page
    before, ``infra.http.pages``): all of them, or those ``manager_id`` manages."""
    rows = await pool.fetch(
        _PROFILE + " WHERE ($1::text IS NULL OR manager_id = $1)"
        " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
        " ORDER BY created_at DESC, id DESC LIMIT $4",
        manager_id,
        None if before is None else before[0],
        None if before is None else before[1],
        limit,
    )
    return [Profile(**dict(r)) for r in rows]


async def create_account(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    *,
    account_id: str | None,
    name: str,
    manager_id: str | None,
    price_list_id: str | None,
    credit_limit: int = 0,
    low_balance_threshold: int = 0,
    clock: Clock = system_clock,
) -> Profile:
    """Create one account (``AccountConflict`` when it cannot be: id taken, a manager that is
    not one or is itself managed, an unknown price list). ``account_id`` None: a fresh id."""
    account_id = account_id or new_account_id()
    if manager_id is not None:
        m = await pool.fetchrow(
            "SELECT is_manager, manager_id FROM accounts WHERE id = $1", manager_id
        )
        if m is None or not m["is_manager"] or m["manager_id"] is not None:
            raise AccountConflict(
                "not_a_manager", f"account {manager_id!r} may not manage accounts", "manager_id"
            )
    if price_list_id is not None and not await pool.fetchval(
        "SELECT 1 FROM price_lists WHERE id = $1", price_list_id
    ):
        raise AccountConflict(
            "unknown_price_list", f"no price list {price_list_id!r}", "price_list_id"
        )
    if await pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
        raise AccountConflict("account_exists", f"account {account_id!r} exists", "id")
    # Validated already (the API's body, the CLI's options): constructed, since the seed file's
    # model reads money as decimal strings.
    spec = AccountSpec.model_construct(
        id=account_id,
        name=name,
        price_list_id=price_list_id,
        manager_id=manager_id,
        credit_limit=credit_limit,
        low_balance_threshold=low_balance_threshold,
        plan_id=None,
        balance=0,
    )
    try:
        created = await create_accounts(pool, balances, [spec], clock=clock)
    except ValueError as exc:  # the manager became managed meanwhile
        raise AccountConflict("not_a_manager", str(exc), "manager_id") from None
    if not created:  # created by a concurrent request between the check and the insert
        raise AccountConflict("account_exists", f"account {account_id!r} exists", "id")
    p = await profile(pool, account_id)
    assert p is not None, account_id
    return p


async def update_settings(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    account_id: str,
    *,
    credit_limit: int | None = None,
    low_balance_threshold: int | None = None,
    verification_level: int | None = None,
    is_manager: bool | None = None,
    name: str | None = None,
    now_s: int | None = None,
) -> Profile | None:
    """The operator's settings; None for an unknown account. PostgreSQL first, then Redis's
    limits (``set_limits``, which moves the account where its credit now puts it); a retry
    repairs a failure in between. A managed account cannot become a manager (one level)."""
    async with pool.acquire() as conn, conn.transaction():
        cur = await conn.fetchrow(
            "SELECT manager_id, credit_limit, low_balance_threshold FROM accounts"
            " WHERE id = $1 FOR UPDATE",
            account_id,
        )
        if cur is None:
            return None
        if is_manager and cur["manager_id"] is not None:
            raise AccountConflict(
                "managed_account", "a managed account cannot manage accounts", "is_manager"
            )
        if is_manager is False and await conn.fetchval(
            "SELECT 1 FROM accounts WHERE manager_id = $1 LIMIT 1", account_id
        ):
            raise AccountConflict(
                "has_managed_accounts",
                "the account still manages accounts: move or close them first",
                "is_manager",
            )
        await conn.execute(
            "UPDATE accounts SET credit_limit = coalesce($2, credit_limit),"
            " low_balance_threshold = coalesce($3, low_balance_threshold),"
            " verification_level = coalesce($4, verification_level),"
            " is_manager = coalesce($5, is_manager), name = coalesce($6, name) WHERE id = $1",
            account_id,
            credit_limit,
            low_balance_threshold,
            verification_level,
            is_manager,
            name,
        )
    if credit_limit is not None or low_balance_threshold is not None:
        await balances.set_limits(
            account_id,
            credit_limit=cur["credit_limit"] if credit_limit is None else credit_limit,
            low_threshold=(
                cur["low_balance_threshold"]
                if low_balance_threshold is None
                else low_balance_threshold
            ),
            now_s=now_s,
        )
    return await profile(pool, account_id)
