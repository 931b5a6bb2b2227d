"""Billing groups (a contact center's billing units): their numbers, users and outbound
profiles, and the month's ledger records by group. The only writer of ``billing_groups``,
``number_groups``, ``billing_group_users`` and ``outbound_profiles``.

What a group is for, and the rules (docs/design/billing-groups.md): every charge is put in a
group when it is rated (``rating.groups``), and the ledger keeps that; the assignments here
decide only the charges rated after they change.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg


class GroupError(Exception):
    """A change that cannot be made: ``code`` for the API, ``field`` it is about."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    name: str
    numbers: list[str]
    users: list[str]
    outbound_profiles: list[str]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Profile:
    id: str
    name: str
    billing_group_id: str | None


def new_group_id() -> str:
    return "bg_" + secrets.token_hex(8)


async def groups(
    pool: asyncpg.Pool, account_id: str, *, only: Sequence[str] | None = None
) -> list[Group]:
    """The account's groups in name order (``only``: just these ids)."""
    rows = await pool.fetch(
        "SELECT g.id, g.name, g.created_at,"
        " ARRAY(SELECT n.number FROM number_groups n WHERE n.account_id = g.account_id"
        "  AND n.billing_group_id = g.id ORDER BY n.number) AS numbers,"
        " ARRAY(SELECT u.user_id FROM billing_group_users u WHERE u.account_id = g.account_id"
        "  AND u.billing_group_id = g.id ORDER BY u.user_id) AS users,"
        " ARRAY(SELECT p.id FROM outbound_profiles p WHERE p.account_id = g.account_id"
        "  AND p.billing_group_id = g.id ORDER BY p.id) AS outbound_profiles"
        " FROM billing_groups g WHERE g.account_id = $1"
        " AND ($2::text[] IS NULL OR g.id = ANY($2::text[])) ORDER BY g.name, g.id",
        account_id,
        None if only is None else list(only),
    )
    return [Group(**dict(r)) for r in rows]


async def group(pool: asyncpg.Pool, account_id: str, group_id: str) -> Group | None:
    found = await groups(pool, account_id, only=[group_id])
    return found[0] if found else None


async def groups_of_user(pool: asyncpg.Pool, account_id: str, user_id: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT billing_group_id FROM billing_group_users WHERE account_id = $1 AND user_id = $2",
        account_id,
        user_id,
    )
    return [r[0] for r in rows]


async def create(pool: asyncpg.Pool, account_id: str, name: str) -> Group:
    group_id = new_group_id()
    try:
        await pool.execute(
            "INSERT INTO billing_groups (account_id, id, name) VALUES ($1, $2, $3)",
            account_id,
            group_id,
            name,
        )
    except asyncpg.UniqueViolationError:
        raise GroupError(
            "name_taken", f"the account has a billing group {name!r}", "name"
        ) from None
    got = await group(pool, account_id, group_id)
    assert got is not None
    return got


async def rename(pool: asyncpg.Pool, account_id: str, group_id: str, name: str) -> Group | None:
    try:
        done = await pool.fetchval(
            "UPDATE billing_groups SET name = $3 WHERE account_id = $1 AND id = $2 RETURNING id",
            account_id,
            group_id,
            name,
        )
    except asyncpg.UniqueViolationError:
        raise GroupError(
            "name_taken", f"the account has a billing group {name!r}", "name"
        ) from None
    return None if done is None else await group(pool, account_id, group_id)


async def delete(
    pool: asyncpg.Pool, account_id: str, group_id: str, *, reassign_to: str | None, force: bool
) -> bool:
    """Delete a group. One that numbers or outbound profiles are in is refused
    (``billing_group_in_use``) unless they are moved (``reassign_to`` another group) or left in
    none (``force``). Charges already rated keep the group they were given. False: no group."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(
            "SELECT 1 FROM billing_groups WHERE account_id = $1 AND id = $2 FOR UPDATE",
            account_id,
            group_id,
        ):
            return False
        numbers = await conn.fetchval(
            "SELECT count(*) FROM number_groups WHERE account_id = $1 AND billing_group_id = $2",
            account_id,
            group_id,
        )
        profiles = await conn.fetchval(
            "SELECT count(*) FROM outbound_profiles WHERE account_id = $1"
            " AND billing_group_id = $2",
            account_id,
            group_id,
        )
        if (numbers or profiles) and reassign_to is None and not force:
            raise GroupError(
                "billing_group_in_use",
                f"{numbers} numbers and {profiles} outbound profiles are in this group: pass"
                " reassign_to=<group id> to move them, or reassign_to=none to leave them in no"
                " group (charges already made keep this group)",
            )
        if reassign_to is not None:
            if reassign_to == group_id or not await conn.fetchval(
                "SELECT 1 FROM billing_groups WHERE account_id = $1 AND id = $2",
                account_id,
                reassign_to,
            ):
                raise GroupError(
                    "unknown_billing_group", f"no other group {reassign_to!r}", "reassign_to"
                )
            await conn.execute(
                "UPDATE number_groups SET billing_group_id = $3"
                " WHERE account_id = $1 AND billing_group_id = $2",
                account_id,
                group_id,
                reassign_to,
            )
            await conn.execute(
                "UPDATE outbound_profiles SET billing_group_id = $3"
                " WHERE account_id = $1 AND billing_group_id = $2",
                account_id,
                group_id,
                reassign_to,
            )
        else:
            await conn.execute(
                "DELETE FROM number_groups WHERE account_id = $1 AND billing_group_id = $2",
                account_id,
                group_id,
            )
            await conn.execute(
                "UPDATE outbound_profiles SET billing_group_id = NULL"
                " WHERE account_id = $1 AND billing_group_id = $2",
                account_id,
                group_id,
            )
        await conn.execute(
            "DELETE FROM billing_groups WHERE account_id = $1 AND id = $2", account_id, group_id
        )
    return True


async def set_numbers(
    pool: asyncpg.Pool, account_id: str, group_id: str, numbers: Sequence[str]
) -> Group | None:
    """The group's numbers become exactly ``numbers``: each listed one moves here (a number is
    in one group at most), the others leave it."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(
            "SELECT 1 FROM billing_groups WHERE account_id = $1 AND id = $2 FOR UPDATE",
            account_id,
            group_id,
        ):
            return None
        await conn.execute(
            "DELETE FROM number_groups WHERE account_id = $1 AND billing_group_id = $2"
            " AND NOT (number = ANY($3::text[]))",
            account_id,
            group_id,
            list(numbers),
        )
        await conn.execute(
            "INSERT INTO number_groups (account_id, number, billing_group_id)"
            " SELECT $1, n, $2 FROM unnest($3::text[]) n"
            " ON CONFLICT (account_id, number) DO UPDATE SET billing_group_id = $2"
            " WHERE number_groups.billing_group_id <> $2",
            account_id,
            group_id,
            list(numbers),
        )
    return await group(pool, account_id, group_id)


async def assign_number(
    pool: asyncpg.Pool, account_id: str, number: str, group_id: str | None
) -> bool:
    """Put one number in group ``group_id`` (out of its group, if any, when None). False: the
    account has no such group. Charges rated from now on follow; the ledger keeps the past."""
    async with pool.acquire() as conn, conn.transaction():
        if group_id is None:
            await conn.execute(
                "DELETE FROM number_groups WHERE account_id = $1 AND number = $2",
                account_id,
                number,
            )
            return True
        if not await conn.fetchval(
            "SELECT 1 FROM billing_groups WHERE account_id = $1 AND id = $2 FOR UPDATE",
            account_id,
            group_id,
        ):
            return False
        await conn.execute(
            "INSERT INTO number_groups (account_id, number, billing_group_id) VALUES ($1, $2, $3)"
            " ON CONFLICT (account_id, number) DO UPDATE SET billing_group_id = $3"
            " WHERE number_groups.billing_group_id <> $3",
            account_id,
            number,
            group_id,
        )
    return True


async def set_users(
    pool: asyncpg.Pool, account_id: str, group_id: str, user_ids: Sequence[str]
) -> Group | None:
    """The group's users become exactly ``user_ids`` (users of the account, else
    ``unknown_user``); a user may be in any number of groups."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(
            "SELECT 1 FROM billing_groups WHERE account_id = $1 AND id = $2 FOR UPDATE",
            account_id,
            group_id,
        ):
            return None
        theirs = {
            r[0]
            for r in await conn.fetch(
                "SELECT id FROM users WHERE account_id = $1 AND id = ANY($2::text[])",
                account_id,
                list(user_ids),
            )
        }
        strangers = sorted(set(user_ids) - theirs)
        if strangers:
            raise GroupError(
                "unknown_user", f"not users of this account: {', '.join(strangers)}", "user_ids"
            )
        await conn.execute(
            "DELETE FROM billing_group_users WHERE account_id = $1 AND billing_group_id = $2",
            account_id,
            group_id,
        )
        await conn.execute(
            "INSERT INTO billing_group_users (account_id, billing_group_id, user_id)"
            " SELECT $1, $2, u FROM unnest($3::text[]) u",
            account_id,
            group_id,
            sorted(theirs),
        )
    return await group(pool, account_id, group_id)


async def profiles(pool: asyncpg.Pool, account_id: str) -> list[Profile]:
    rows = await pool.fetch(
        "SELECT id, name, billing_group_id FROM outbound_profiles WHERE account_id = $1"
        " ORDER BY id",
        account_id,
    )
    return [Profile(**dict(r)) for r in rows]


async def put_profile(
    pool: asyncpg.Pool, account_id: str, profile_id: str, name: str, group_id: str | None
) -> Profile:
    try:
        r = await pool.fetchrow(
            "INSERT INTO outbound_profiles (account_id, id, name, billing_group_id)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, id) DO UPDATE"
            " SET name = $3, billing_group_id = $4 RETURNING id, name, billing_group_id",
            account_id,
            profile_id,
            name,
            group_id,
        )
    except asyncpg.ForeignKeyViolationError:
        raise GroupError(
            "unknown_billing_group", f"no billing group {group_id!r}", "billing_group_id"
        ) from None
    assert r is not None
    return Profile(**dict(r))


async def delete_profile(pool: asyncpg.Pool, account_id: str, profile_id: str) -> bool:
    done = await pool.fetchval(
        "DELETE FROM outbound_profiles WHERE account_id = $1 AND id = $2 RETURNING id",
        account_id,
        profile_id,
    )
    return done is not None


# -- the month's ledger records ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One group's charges of one kind (and direction, for calls) in the month."""

    billing_group_id: str  # "" for none
    kind: str  # call, sms, fee, bundle, credit (payments), provisional, opening, correction
    direction: str  # inbound / outbound for calls, else ""
    count: int
    quantity: int  # billed seconds, message parts, numbers, bundle seconds
    included_s: int
    amount: int  # micro-units, signed as in the ledger (charges < 0)


@dataclass(frozen=True, slots=True)
class MonthReport:
    account_id: str
    month: str
    start: datetime
    end: datetime
    lines: list[Line] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines)


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` (checked by the caller) -> [first instant, first instant of the next), UTC."""
    year, mon = int(month[:4]), int(month[5:7])
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def month_report(
    pool: asyncpg.Pool, account_id: str, month: str, *, only_groups: Sequence[str] | None = None
) -> MonthReport:
    """The account's ledger rows of ``month`` (by the charge's own time, UTC), summed by group,
    kind and direction: the lines add up to the ledger's sum for the month to the micro-unit.
    ``only_groups``: just those groups' lines (a user who sees only its billing units)."""
    start, end = month_bounds(month)
    rows = await pool.fetch(
        "SELECT billing_group_id, kind, direction, count(*) AS count,"
        " sum(quantity)::bigint AS quantity, sum(included_s)::bigint AS included_s,"
        " sum(amount)::bigint AS amount FROM ledger"
        " WHERE account_id = $1 AND event_time >= $2 AND event_time < $3"
        " AND ($4::text[] IS NULL OR billing_group_id = ANY($4::text[]))"
        " GROUP BY billing_group_id, kind, direction ORDER BY billing_group_id, kind, direction",
        account_id,
        start,
        end,
        None if only_groups is None else list(only_groups),
    )
    return MonthReport(account_id, month, start, end, [Line(**dict(r)) for r in rows])
