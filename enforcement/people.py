"""The people of an account: its users and access groups (docs/design/people.md), in PostgreSQL.

``People`` is the one writer of the tables ``users``, ``access_groups`` and
``access_group_members`` (tests/infra/test_ledger_writers.py checks it). A user is an ``admin``
or a ``user`` of one account, or one of the platform's ``operator`` people (no account); an
access group of an account adds privileges (``infra.http.api_keys.PRIVILEGES``) to its member
users. Keys acting as a user (``infra.http.api_keys``) act with the user's role and groups as
they are at each lookup, so what is changed here reaches the user's keys without touching them.

Every read and write of an account's people is scoped by the account: a user or group of
another account is answered exactly as one that does not exist. Nothing is ever deleted but an
access group: a user is disabled (``disabled_at``), and its keys stop opening anything.

Errors (``PeopleError``: the change was refused, nothing was written)::

    PeopleError
    ├── AccountNotFound   no such account
    ├── NotFound          no such user or group in this account (or one of another account)
    ├── EmailTaken        another user, of any account, has this email
    ├── GroupNameTaken    the account has a group of this name
    ├── NotOfAccount      these user ids are not users of the account (group members)
    └── UserDisabled      the user is disabled (no new keys for it)

``ValueError``: a value no caller should send (an email that is not one, an unknown role or
privilege); the HTTP models refuse those before they get here.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

import asyncpg

from infra.http.api_keys import PRIVILEGES

#: The role of a person: of one account (``admin``, ``user``) or of the platform (``operator``).
UserRole = Literal["operator", "admin", "user"]
USER_ROLES: Final[tuple[str, ...]] = get_args(UserRole)
#: A group keeps at most this many members (``PUT .../members`` sends the whole list).
MAX_MEMBERS: Final = 1000
#: RFC 5321's bound on a whole address.
MAX_EMAIL: Final = 254
#: The columns' bounds (migration 0008).
MAX_USER_NAME: Final = 200
MAX_GROUP_NAME: Final = 100

# A deliberately narrow address: a dot-atom local part (no quoted strings, no comments) at a
# domain of DNS labels under an alphabetic or punycode top level, in ASCII: what mail systems
# agree on, and nothing a log, a CSV or an email header could be tricked by.
_ATEXT: Final = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_EMAIL_RE: Final = re.compile(
    rf"(?=[^@]{{1,64}}@){_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}})",
    re.ASCII,
)
_USER_ID_RE: Final = re.compile(r"^usr_[a-z0-9]{16}$")


class PeopleError(Exception):
    """A change refused; nothing was written (see the module docstring for the tree)."""


class AccountNotFound(PeopleError):
    pass


class NotFound(PeopleError):
    pass


class EmailTaken(PeopleError):
    pass


class GroupNameTaken(PeopleError):
    pass


class NotOfAccount(PeopleError):
    def __init__(self, user_ids: Sequence[str]) -> None:
        super().__init__(f"not users of this account: {', '.join(user_ids)}")
        self.user_ids = tuple(user_ids)


class UserDisabled(PeopleError):
    pass


def normalize_email(email: str) -> str:
    """The address in lower case; ``ValueError`` unless it is one (see ``_EMAIL_RE``)."""
    if len(email) > MAX_EMAIL:
        raise ValueError(f"an email address has at most {MAX_EMAIL} characters")
    low = email.lower()
    if not _EMAIL_RE.fullmatch(low):
        raise ValueError("not an email address (name@example.com, ASCII)")
    return low


def is_user_id(text: str) -> bool:
    return _USER_ID_RE.match(text) is not None


def new_user_id() -> str:
    return f"usr_{secrets.token_hex(8)}"


def new_group_id() -> str:
    return f"grp_{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class User:
    id: str
    account_id: str | None
    email: str
    name: str
    role: UserRole
    created_at: datetime
    disabled_at: datetime | None


@dataclass(frozen=True, slots=True)
class AccessGroup:
    id: str
    account_id: str
    name: str
    privileges: tuple[str, ...]
    #: user ids, in order
    members: tuple[str, ...]
    created_at: datetime


#: Where a page of a list ends: the last item's ``(created_at, id)``; lists run newest first.
Position = tuple[datetime, str]

_GROUP_NAME_KEY: Final = "access_groups_account_id_name_key"
_USER: Final = "id, account_id, email, name, role, created_at, disabled_at"
_GROUP: Final = (
    "g.id, g.account_id, g.name, g.privileges, g.created_at,"
    " ARRAY(SELECT m.user_id FROM access_group_members m WHERE m.group_id = g.id"
    " ORDER BY m.user_id) AS members"
)


def _older(t: str) -> str:
    """Rows of table alias ``t`` past a page's end (``$2``, ``$3``: a ``Position`` or nulls)."""
    return f"($2::timestamptz IS NULL OR ({t}.created_at, {t}.id) < ($2, $3::text))"


def _user(row: asyncpg.Record) -> User:
    return User(**dict(row))


def _group(row: asyncpg.Record) -> AccessGroup:
    d = dict(row)
    return AccessGroup(**d | {"privileges": tuple(d["privileges"]), "members": tuple(d["members"])})


def _privileges(privileges: Collection[str]) -> list[str]:
    unknown = set(privileges) - set(PRIVILEGES)
    if unknown:
        raise ValueError(f"unknown privileges {sorted(unknown)}; expected {', '.join(PRIVILEGES)}")
    return sorted(set(privileges))


def _name(name: str, low: int, high: int) -> str:
    if not low <= len(name) <= high or any(c < " " or c == "\x7f" for c in name):
        raise ValueError(f"a name has {low} to {high} characters, none of them control ones")
    return name


def _role(role: str, account_id: str | None) -> None:
    if role not in USER_ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(USER_ROLES)}")
    if (role == "operator") != (account_id is None):
        raise ValueError("an operator has no account; every other user has one")


class People:
    """Users and access groups (see the module docstring). Reads answer None for what the
    account does not have; writes raise a ``PeopleError``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- users -----------------------------------------------------------------------------

    async def create_user(
        self, account_id: str | None, email: str, role: UserRole, name: str = ""
    ) -> User:
        """A new user of ``account_id`` (an operator: None). Raises ``EmailTaken`` when any
        user has the email, ``AccountNotFound``; ``ValueError`` for a bad email or role."""
        _role(role, account_id)
        try:
            row = await self._pool.fetchrow(
                f"INSERT INTO users (id, account_id, email, name, role)"
                f" VALUES ($1, $2, $3, $4, $5) RETURNING {_USER}",
                new_user_id(),
                account_id,
                normalize_email(email),
                _name(name, 0, MAX_USER_NAME),
                role,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "users_email_key":
                raise  # a user id drawn twice: 64 random bits, not worth a retry loop
            raise EmailTaken(f"a user with email {email.lower()!r} exists") from None
        except asyncpg.ForeignKeyViolationError:
            raise AccountNotFound(f"no account {account_id!r}") from None
        assert row is not None
        return _user(row)

    async def user(self, user_id: str, *, account_id: str | None = None) -> User | None:
        """The user, only if it is ``account_id``'s when given (the CLI's operators look up
        any user by leaving it out)."""
        row = await self._pool.fetchrow(
            f"SELECT {_USER} FROM users WHERE id = $1 AND ($2::text IS NULL OR account_id = $2)",
            user_id,
            account_id,
        )
        return None if row is None else _user(row)

    async def user_by_email(self, email: str) -> User | None:
        row = await self._pool.fetchrow(
            f"SELECT {_USER} FROM users WHERE email = $1", email.lower()
        )
        return None if row is None else _user(row)

    async def users(
        self, account_id: str | None, *, limit: int | None = None, before: Position | None = None
    ) -> list[User]:
        """The account's users (the operators: None), disabled ones too, newest first: at
        most ``limit``, those older than ``before`` when given."""
        # Two spellings rather than IS NOT DISTINCT FROM, which no index serves.
        whose = (
            "u.account_id = $1"
            if account_id is not None
            else "($1::text IS NULL AND u.account_id IS NULL)"
        )
        rows = await self._pool.fetch(
            f"SELECT {_USER} FROM users u WHERE {whose} AND {_older('u')}"
            " ORDER BY u.created_at DESC, u.id DESC LIMIT $4",
            account_id,
            None if before is None else before[0],
            None if before is None else before[1],
            limit,
        )
        return [_user(r) for r in rows]

    async def update_user(
        self,
        account_id: str,
        user_id: str,
        *,
        name: str | None = None,
        role: Literal["admin", "user"] | None = None,
    ) -> User:
        """Change what is given (None: unchanged); the user's keys act with the new role at
        their next lookup. Raises ``NotFound``."""
        if role is not None:
            _role(role, account_id)
        if name is not None:
            _name(name, 0, MAX_USER_NAME)
        row = await self._pool.fetchrow(
            f"UPDATE users SET name = coalesce($3, name), role = coalesce($4, role)"
            f" WHERE id = $1 AND account_id = $2 RETURNING {_USER}",
            user_id,
            account_id,
            name,
            role,
        )
        if row is None:
            raise NotFound(f"no user {user_id!r}")
        return _user(row)

    async def disable_user(self, user_id: str, *, account_id: str | None = None) -> User:
        """Disable the user (idempotent: the first ``disabled_at`` stays), only if it is
        ``account_id``'s when given; its keys open nothing from their next lookup. Its rows,
        keys and memberships stay. Raises ``NotFound``."""
        row = await self._pool.fetchrow(
            f"UPDATE users SET disabled_at = coalesce(disabled_at, now())"
            f" WHERE id = $1 AND ($2::text IS NULL OR account_id = $2) RETURNING {_USER}",
            user_id,
            account_id,
        )
        if row is None:
            raise NotFound(f"no user {user_id!r}")
        return _user(row)

    # --- access groups ---------------------------------------------------------------------

    async def create_group(
        self, account_id: str, name: str, privileges: Collection[str] = ()
    ) -> AccessGroup:
        """A new group, without members. Raises ``GroupNameTaken``, ``AccountNotFound``."""
        try:
            row = await self._pool.fetchrow(
                "WITH g AS (INSERT INTO access_groups (id, account_id, name, privileges)"
                " VALUES ($1, $2, $3, $4) RETURNING *)"
                " SELECT g.*, '{}'::text[] AS members FROM g",
                new_group_id(),
                account_id,
                _name(name, 1, MAX_GROUP_NAME),
                _privileges(privileges),
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _GROUP_NAME_KEY:
                raise
            raise GroupNameTaken(f"the account has a group named {name!r}") from None
        except asyncpg.ForeignKeyViolationError:
            raise AccountNotFound(f"no account {account_id!r}") from None
        assert row is not None
        return _group(row)

    async def group(self, account_id: str, group_id: str) -> AccessGroup | None:
        row = await self._pool.fetchrow(
            f"SELECT {_GROUP} FROM access_groups g WHERE g.id = $1 AND g.account_id = $2",
            group_id,
            account_id,
        )
        return None if row is None else _group(row)

    async def groups(
        self, account_id: str, *, limit: int | None = None, before: Position | None = None
    ) -> list[AccessGroup]:
        """The account's groups, newest first (as ``users``)."""
        rows = await self._pool.fetch(
            f"SELECT {_GROUP} FROM access_groups g WHERE g.account_id = $1 AND {_older('g')}"
            " ORDER BY g.created_at DESC, g.id DESC LIMIT $4",
            account_id,
            None if before is None else before[0],
            None if before is None else before[1],
            limit,
        )
        return [_group(r) for r in rows]

    async def update_group(
        self,
        account_id: str,
        group_id: str,
        *,
        name: str | None = None,
        privileges: Collection[str] | None = None,
    ) -> AccessGroup:
        """Change what is given (None: unchanged). Raises ``NotFound``, ``GroupNameTaken``."""
        if name is not None:
            _name(name, 1, MAX_GROUP_NAME)
        try:
            row = await self._pool.fetchrow(
                "WITH g AS (UPDATE access_groups SET name = coalesce($3, name),"
                " privileges = coalesce($4, privileges)"
                " WHERE id = $1 AND account_id = $2 RETURNING *)"
                f" SELECT {_GROUP} FROM g",
                group_id,
                account_id,
                name,
                None if privileges is None else _privileges(privileges),
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _GROUP_NAME_KEY:
                raise
            raise GroupNameTaken(f"the account has a group named {name!r}") from None
        if row is None:
            raise NotFound(f"no group {group_id!r}")
        return _group(row)

    async def delete_group(self, account_id: str, group_id: str) -> AccessGroup:
        """Delete the group and its memberships (its members lose its privileges); the group
        as it was. Raises ``NotFound``."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_GROUP} FROM access_groups g WHERE g.id = $1 AND g.account_id = $2"
                " FOR UPDATE",
                group_id,
                account_id,
            )
            if row is None:
                raise NotFound(f"no group {group_id!r}")
            await conn.execute("DELETE FROM access_groups WHERE id = $1", group_id)
        return _group(row)

    async def set_members(
        self, account_id: str, group_id: str, user_ids: Collection[str]
    ) -> tuple[AccessGroup, frozenset[str]]:
        """Make ``user_ids`` the group's whole membership (disabled users may stay members:
        their keys open nothing anyway). Returns the group and whose privileges may have
        changed (members before and after). Raises ``NotFound``, ``NotOfAccount`` (the users
        that are not the account's, or do not exist)."""
        wanted = sorted(set(user_ids))
        if len(wanted) > MAX_MEMBERS:
            raise ValueError(f"a group has at most {MAX_MEMBERS} members")
        async with self._pool.acquire() as conn, conn.transaction():
            # The group's row lock orders concurrent replacements of one membership: the
            # last one wins whole, never a mix of two lists.
            found = await conn.fetchval(
                "SELECT id FROM access_groups WHERE id = $1 AND account_id = $2 FOR UPDATE",
                group_id,
                account_id,
            )
            if found is None:
                raise NotFound(f"no group {group_id!r}")
            # A user never leaves its account and is never deleted: read once, it stays true.
            ours = await conn.fetch(
                "SELECT id FROM users WHERE id = ANY($1::text[]) AND account_id = $2",
                wanted,
                account_id,
            )
            strangers = sorted(set(wanted) - {r["id"] for r in ours})
            if strangers:
                raise NotOfAccount(strangers)
            before = await conn.fetch(
                "DELETE FROM access_group_members WHERE group_id = $1 RETURNING user_id",
                group_id,
            )
            await conn.execute(
                "INSERT INTO access_group_members (group_id, user_id)"
                " SELECT $1, unnest($2::text[])",
                group_id,
                wanted,
            )
            row = await conn.fetchrow(
                f"SELECT {_GROUP} FROM access_groups g WHERE g.id = $1", group_id
            )
        assert row is not None
        return _group(row), frozenset(wanted) | {r["user_id"] for r in before}
