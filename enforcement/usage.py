"""The usage history (seeds 001 "Usage", 004 "Call History"): an account's charged events
from the ledger, newest first, filtered by time, type, billing group and number, one page at a
time. Amounts and quantities only: a rate is never shown (a managed account reads this too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

#: The ledger kinds the history shows (opening balances and payments are the ledger records').
USAGE_KINDS: tuple[str, ...] = ("call", "sms", "fee", "bundle", "provisional")


@dataclass(frozen=True, slots=True)
class UsageRow:
    entry_id: int
    time: datetime
    kind: str
    ref: str  # the call id, the message id, the number, the bundle purchase
    from_party: str
    to_party: str
    direction: str
    quantity: int  # billed seconds, message parts, one number, bundle seconds
    included_s: int
    amount: int  # micro-units, signed as in the ledger
    billing_group_id: str


async def usage(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    since: datetime | None,
    until: datetime | None,
    kinds: Sequence[str],
    groups: Sequence[str] | None,
    number: str | None,
    before: tuple[datetime, int] | None,
    limit: int,
) -> list[UsageRow]:
    """Rows newest first, ``before`` (time, entry id) the last one of the previous page: a
    keyset walk on the ledger's (account, time) index, whatever the size of the book."""
    rows = await pool.fetch(
        "SELECT entry_id, event_time AS time, kind, ref, from_party, to_party, direction,"
        " quantity, included_s, amount, billing_group_id FROM ledger"
        " WHERE account_id = $1 AND kind = ANY($2::text[])"
        " AND ($3::timestamptz IS NULL OR event_time >= $3)"
        " AND ($4::timestamptz IS NULL OR event_time < $4)"
        " AND ($5::text[] IS NULL OR billing_group_id = ANY($5::text[]))"
        " AND ($6::text IS NULL OR from_party = $6 OR to_party = $6)"
        " AND ($7::timestamptz IS NULL OR (event_time, entry_id) < ($7, $8))"
        " ORDER BY event_time DESC, entry_id DESC LIMIT $9",
        account_id,
        list(kinds),
        since,
        until,
        None if groups is None else list(groups),
        number,
        None if before is None else before[0],
        None if before is None else before[1],
        limit,
    )
    return [UsageRow(**dict(r)) for r in rows]
