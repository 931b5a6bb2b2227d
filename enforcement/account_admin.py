"""The account queries of the API's operator routes, against the book of record (PostgreSQL):
whether an account exists (its currency), and its suspension flag."""

from __future__ import annotations

import asyncpg


async def account_currency(pool: asyncpg.Pool, account_id: str) -> str | None:
    """The account's currency; None when there is no such account."""
    currency = await pool.fetchval("SELECT currency FROM accounts WHERE id = $1", account_id)
    return None if currency is None else str(currency)


async def set_suspended(pool: asyncpg.Pool, account_id: str, suspended: bool) -> None:
    """Set the operator's suspension flag. Resuming also clears the hold the service pinned
    (``hold_reason``, e.g. after the recharge cap); suspending keeps it. Idempotent."""
    await pool.execute(
        "UPDATE accounts SET suspended = $2,"
        " hold_reason = CASE WHEN $2 THEN hold_reason END WHERE id = $1",
        account_id,
        suspended,
    )
