"""Sign-in for people: passwords, the lockout, and the sessions a browser holds.

``Sessions`` is the one writer of the tables ``user_passwords`` and ``portal_sessions``
(migration 0018; tests/infra/test_ledger_writers.py checks it). A session acts as its user *as
the user is now*: each request reads the user's role, access groups and account again, exactly
as a user's API key does (``infra.http.api_keys``), and the session is answered as an
``ApiKey`` that ``infra.http.access`` judges like any other caller. A disabled user's sessions
open nothing.

The browser holds a random token (256 bits) in a cookie; only its SHA-256 is stored. Each
session has a CSRF token of its own that every form carries (``portal.web``).

Lockout: ``max_failures`` wrong passwords in a row lock the user's sign-in for ``lockout_s``;
while locked even the right password is refused, and when it lapses the count starts again.
The lock is per user, not per address, so that guessing from many addresses is bounded too; the
price is that someone who knows an email can keep its owner out for ``lockout_s`` at a time
(an operator sets a new password, which unlocks, or waits). An email nobody has is refused
exactly as a wrong password, in about the same time (``portal.passwords.check``).

Errors::

    SignInRefused      the sign-in was refused: code "wrong" (email or password) or "locked"
    WeakPassword       a password outside the bounds (portal.passwords); nothing written
    LookupError        set_password for a user that does not exist or is disabled
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

import asyncpg

from infra.clock import Clock, system_clock, utc_datetime
from infra.http.api_keys import ApiKey
from portal import passwords

#: The cookie's token and the CSRF token: 32 random bytes, URL-safe.
_TOKEN_BYTES: Final = 32


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class SignInRefused(Exception):
    def __init__(self, code: Literal["wrong", "locked"], until: datetime | None = None) -> None:
        super().__init__(code)
        self.code = code
        #: when a locked sign-in opens again
        self.until = until


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: who it is (``key``, as ``infra.http.access`` judges callers), the
    user's email and name for the page, and the CSRF token its forms carry."""

    key: ApiKey
    email: str
    name: str
    csrf: str
    expires_at: datetime


# The user as the session acts now: role, account, the privileges of its groups, how its
# account stands to managers (as api_keys' lookup reads a user's key).
_LOOKUP: Final = (
    "SELECT u.id AS user_id, u.account_id, u.role, u.email, u.name, s.csrf, s.expires_at,"
    " ARRAY(SELECT DISTINCT p FROM access_group_members m"
    "  JOIN access_groups g ON g.id = m.group_id, unnest(g.privileges) p"
    "  WHERE m.user_id = u.id) AS privileges,"
    " a.manager_id, coalesce(a.is_manager, false) AS is_manager"
    " FROM portal_sessions s JOIN users u ON u.id = s.user_id"
    " LEFT JOIN accounts a ON a.id = u.account_id"
    " WHERE s.token_hash = $1 AND s.ended_at IS NULL AND s.expires_at > $2"
    " AND u.disabled_at IS NULL"
)


class Sessions:
    """Passwords and sessions in PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        clock: Clock = system_clock,
        ttl_s: int = 28_800,
        max_failures: int = 5,
        lockout_s: int = 900,
    ) -> None:
        if ttl_s < 60 or max_failures < 1 or lockout_s < 1:
            raise ValueError("a session lasts a minute or more; lockout needs 1 failure or more")
        self._pool = pool
        self._clock = clock
        self._ttl = timedelta(seconds=ttl_s)
        self._max_failures = max_failures
        self._lockout = timedelta(seconds=lockout_s)

    async def set_password(self, user_id: str, password: str) -> None:
        """Set (or replace) the user's password; it also lifts a lockout and ends the user's
        sessions, so a password thought stolen stops working everywhere at once."""
        hashed = passwords.hash_password(password)
        now = utc_datetime(self._clock)
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT id FROM users WHERE id = $1 AND disabled_at IS NULL", user_id
            )
            if found is None:
                raise LookupError(f"no user {user_id!r}, or it is disabled")
            await conn.execute(
                "INSERT INTO user_passwords (user_id, hash, set_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (user_id) DO UPDATE SET hash = EXCLUDED.hash,"
                " set_at = EXCLUDED.set_at, failures = 0, locked_until = NULL",
                user_id,
                hashed,
                now,
            )
            await conn.execute(
                "UPDATE portal_sessions SET ended_at = $2 WHERE user_id = $1 AND ended_at IS NULL",
                user_id,
                now,
            )

    async def sign_in(self, email: str, password: str) -> tuple[str, Session]:
        """A new session for the user of ``email`` if ``password`` is its own: ``(token for
        the cookie, session)``. ``SignInRefused`` otherwise (see the module docstring)."""
        now = utc_datetime(self._clock)
        user_id = await self._pool.fetchval(
            "SELECT u.id FROM users u JOIN user_passwords p ON p.user_id = u.id"
            " WHERE u.email = $1 AND u.disabled_at IS NULL",
            email.strip().lower(),
        )
        if user_id is None:
            passwords.check(None, password)  # as long as a wrong password takes
            raise SignInRefused("wrong")
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        async with self._pool.acquire() as conn, conn.transaction():
            # Locked for the check: concurrent guesses at one user are counted one by one.
            row = await conn.fetchrow(
                "SELECT hash, failures, locked_until FROM user_passwords"
                " WHERE user_id = $1 FOR UPDATE",
                user_id,
            )
            if row is None:  # the password was removed meanwhile
                raise SignInRefused("wrong")
            right = passwords.check(row["hash"], password)
            locked_until: datetime | None = row["locked_until"]
            if locked_until is not None and locked_until > now:
                raise SignInRefused("locked", locked_until)
            if not right:
                failures = row["failures"] + 1
                lock = now + self._lockout if failures >= self._max_failures else None
                await conn.execute(
                    "UPDATE user_passwords SET failures = $2, locked_until = $3 WHERE user_id = $1",
                    user_id,
                    0 if lock else failures,
                    lock,
                )
                # Refused after the block: raising inside it would roll the count back.
                refusal = SignInRefused("locked", lock) if lock else SignInRefused("wrong")
            else:
                refusal = None
                rehash = passwords.needs_rehash(row["hash"])
                await conn.execute(
                    "UPDATE user_passwords SET failures = 0, locked_until = NULL,"
                    " hash = CASE WHEN $2 THEN $3 ELSE hash END WHERE user_id = $1",
                    user_id,
                    rehash,
                    passwords.hash_password(password) if rehash else "",
                )
                await conn.execute(
                    "INSERT INTO portal_sessions (token_hash, user_id, csrf, created_at,"
                    " expires_at) VALUES ($1, $2, $3, $4, $5)",
                    token_hash(token),
                    user_id,
                    secrets.token_urlsafe(_TOKEN_BYTES),
                    now,
                    now + self._ttl,
                )
        if refusal is not None:
            raise refusal
        session = await self.session(token)
        if session is None:  # disabled between the two reads
            raise SignInRefused("wrong")
        return token, session

    async def session(self, token: str) -> Session | None:
        """The live session of ``token``, acting as its user is now; None when there is none
        (never was, signed out, expired, or its user disabled)."""
        if not token or len(token) > 100:
            return None
        row = await self._pool.fetchrow(_LOOKUP, token_hash(token), utc_datetime(self._clock))
        if row is None:
            return None
        key = ApiKey(
            # Names the user in what it does (a suspension's set_by), as a user's key does.
            f"portal:{row['user_id']}",
            row["account_id"],
            row["role"],
            row["user_id"],
            frozenset(row["privileges"]),
            row["manager_id"],
            row["is_manager"],
        )
        return Session(key, row["email"], row["name"], row["csrf"], row["expires_at"])

    async def sign_out(self, token: str) -> None:
        """End the session of ``token`` (nothing when there is none)."""
        await self._pool.execute(
            "UPDATE portal_sessions SET ended_at = $2 WHERE token_hash = $1 AND ended_at IS NULL",
            token_hash(token),
            utc_datetime(self._clock),
        )
