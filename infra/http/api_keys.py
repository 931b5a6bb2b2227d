"""API keys: creation, revocation and the cached lookup every HTTP request goes through.

A key is ``mk_<key_id>_<secret>``: ``key_id`` (16 lowercase hex) names it in logs and for
revocation; the whole key's SHA-256 is what PostgreSQL stores (table ``api_keys``). The key itself
is shown once, at creation, and never stored.

Lookups are cached in the process so that authorizing a call never waits for PostgreSQL: a
known key older than ``ttl_s`` (default 5 s) is still answered from the cache while it is
re-read in the background, so a revoked key keeps working for ``ttl_s`` plus one lookup at
most. Concurrent lookups of one key share one query. When PostgreSQL cannot answer, a key seen
within the last ``stale_s`` seconds keeps being served (calls keep connecting through a
database blip); a key not in the cache raises ``KeyStoreUnavailable``, at the latest after the
caller's ``timeout_s`` (an authorization's deadline): the shared lookup goes on without that
caller, so a stalled PostgreSQL never holds a request longer than its deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

import asyncpg

from infra.singleflight import SingleFlight

log = logging.getLogger(__name__)

#: ``operator``: the platform's staff, every account; ``admin`` and ``user``: people of one
#: account; ``service``: switches and call-control (docs/design/access.md).
Role = Literal["operator", "admin", "user", "service"]
ROLES: Final[tuple[str, ...]] = get_args(Role)
#: What an access group adds to its users' role (the seeds' privileges).
Privilege = Literal["edit_billing", "view_billing_unit", "edit_billing_unit"]
PRIVILEGES: Final[tuple[str, ...]] = get_args(Privilege)

_KEY_RE: Final = re.compile(r"^mk_([a-z0-9]{16})_[A-Za-z0-9_-]{43}$")
#: Bound on cached lookups, so a flood of made-up keys cannot grow the process without limit.
_MAX_CACHED: Final = 50_000


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as its account's admins see it: never the secret."""

    key_id: str
    account_id: str | None
    #: what the key acts with now: its user's current role, for a user's key
    role: str
    user_id: str | None
    label: str
    created_at: datetime
    revoked_at: datetime | None
    #: not revoked, and its user (if any) not disabled: the key opens the API
    active: bool = True


class KeyStoreUnavailable(Exception):
    """PostgreSQL did not answer a key lookup, and the key was not in the cache."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated caller: the key's id, its account (None for an operator) and role,
    the user it acts as (None for a service key or an account key made before users), the
    privileges of that user's access groups, and whether its account is a managed one (its
    manager, when so: it never sees prices) or a manager."""

    key_id: str
    account_id: str | None
    role: Role
    user_id: str | None = None
    privileges: frozenset[str] = frozenset()
    manager_id: str | None = None
    is_manager: bool = False


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, str]:
    """``(key_id, key)``: a fresh key with 256 random bits of secret."""
    key_id = secrets.token_hex(8)
    return key_id, f"mk_{key_id}_{secrets.token_urlsafe(32)}"


# A user's key acts with the user's role and privileges as they are now; a disabled user's
# keys are no keys.
_LOOKUP: Final = (
    "SELECT k.key_id, k.account_id, coalesce(u.role, k.role) AS role, k.user_id,"
    " ARRAY(SELECT DISTINCT p FROM access_group_members m"
    "  JOIN access_groups g ON g.id = m.group_id, unnest(g.privileges) p"
    "  WHERE m.user_id = k.user_id) AS privileges,"
    " a.manager_id, coalesce(a.is_manager, false) AS is_manager"
    " FROM api_keys k LEFT JOIN users u ON u.id = k.user_id"
    " LEFT JOIN accounts a ON a.id = k.account_id"
    " WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND u.disabled_at IS NULL"
)
#: A key as ``KeyInfo`` (``api_keys k LEFT JOIN users u``).
_INFO: Final = (
    "k.key_id, k.account_id, coalesce(u.role, k.role) AS role, k.user_id, k.label,"
    " k.created_at, k.revoked_at, (k.revoked_at IS NULL AND u.disabled_at IS NULL) AS active"
)


class ApiKeys:
    """The ``api_keys`` table behind an in-process cache (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl_s: float = 5.0,
        stale_s: float = 300.0,
        lookup_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._stale_s = stale_s
        self._lookup_timeout_s = lookup_timeout_s
        self._clock = clock
        # sha256 -> (key or None for "no such key", when it was read)
        self._cache: dict[bytes, tuple[ApiKey | None, float]] = {}
        # One query per key however many requests ask at once; a task of its own, so a
        # request cancelled meanwhile (client gone) does not cancel it for the others.
        self._inflight: SingleFlight[bytes, ApiKey | None] = SingleFlight(
            "api key lookup", on_done=self._settle
        )

    async def authenticate(self, key: str, *, timeout_s: float | None = None) -> ApiKey | None:
        """The key's owner and role, or ``None`` for a malformed, unknown or revoked key.

        Raises ``KeyStoreUnavailable`` only when the answer is neither cached nor obtainable
        within ``timeout_s`` (default: the lookup's own bound, ``lookup_timeout_s``).
        """
        if _KEY_RE.match(key) is None:
            return None  # not even shaped like a key: no need to ask anyone
        h = key_hash(key)
        hit = self._cache.get(h)
        now = self._clock()
        if hit is not None:
            age = now - hit[1]
            if age < self._ttl_s:
                return hit[0]
            if hit[0] is not None and age < self._stale_s:
                # A known key past its TTL is answered from the cache and re-read in the
                # background: no request waits for PostgreSQL every ttl_s.
                self._lookup_task(h)
                return hit[0]
        try:
            # The lookup bounds itself, but a cancelled asyncpg query waits for the server to
            # confirm the cancel: on a stalled server, only this caller's own bound ends the wait.
            async with asyncio.timeout(self._lookup_timeout_s if timeout_s is None else timeout_s):
                return await asyncio.shield(self._lookup_task(h))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise KeyStoreUnavailable(f"api key lookup failed: {type(exc).__name__}") from exc

    def _lookup_task(self, h: bytes) -> asyncio.Task[ApiKey | None]:
        return self._inflight.task(h, lambda: self._lookup(h))

    def _settle(self, h: bytes, task: asyncio.Task[ApiKey | None]) -> None:
        if task.cancelled():
            return
        # exception() also marks a failure as seen when no request is left to await it.
        exc = task.exception()
        if exc is None:
            self._remember(h, task.result(), self._clock())
        elif h in self._cache:
            log.warning("api key lookup failed (%r); serving the cached answer meanwhile", exc)

    async def _lookup(self, h: bytes) -> ApiKey | None:
        async with asyncio.timeout(self._lookup_timeout_s):
            row = await self._pool.fetchrow(_LOOKUP, h)
        if row is None:
            return None
        return ApiKey(
            row["key_id"],
            row["account_id"],
            row["role"],
            row["user_id"],
            frozenset(row["privileges"]),
            row["manager_id"],
            row["is_manager"],
        )

    def _remember(self, h: bytes, found: ApiKey | None, now: float) -> None:
        if len(self._cache) >= _MAX_CACHED:
            # Full: most likely of made-up keys. Keep only real keys still worth serving.
            self._cache = {
                k: v
                for k, v in self._cache.items()
                if v[0] is not None and now - v[1] < self._stale_s
            }
        self._cache[h] = (found, now)

    def forget(self) -> None:
        """Empty the cache (tests; after revoking keys in this process)."""
        self._cache.clear()

    async def create(
        self,
        account_id: str | None,
        role: Role,
        *,
        user_id: str | None = None,
        label: str = "",
    ) -> tuple[ApiKey, str]:
        """Create a key: for ``user_id`` (it acts as that user: pass the user's account and
        role), for a service, or an account key with a role of its own; an operator's key has
        no account. Returns the record and the key, which is not stored anywhere: show it
        once. Raises ``LookupError`` for an unknown account or user."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if (role == "operator") != (account_id is None):
            raise ValueError("an operator's key has no account; every other key has one")
        key_id, key = new_key()
        try:
            await self._pool.execute(
                "INSERT INTO api_keys (key_id, key_hash, account_id, role, user_id, label)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                key_id,
                key_hash(key),
                account_id,
                role,
                user_id,
                label,
            )
        except asyncpg.ForeignKeyViolationError:
            raise LookupError(f"no account {account_id!r} or user {user_id!r}") from None
        return ApiKey(key_id, account_id, role, user_id), key

    async def list(
        self,
        account_id: str,
        *,
        limit: int | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[KeyInfo]:
        """The keys of an account (live and revoked, newest first), never their secret: at most
        ``limit``, those older than ``before`` (a key's ``(created_at, key_id)``) when given."""
        rows = await self._pool.fetch(
            f"SELECT {_INFO} FROM api_keys k LEFT JOIN users u ON u.id = k.user_id"
            " WHERE k.account_id = $1"
            " AND ($2::timestamptz IS NULL OR (k.created_at, k.key_id) < ($2, $3::text))"
            " ORDER BY k.created_at DESC, k.key_id DESC LIMIT $4",
            account_id,
            None if before is None else before[0],
            None if before is None else before[1],
            limit,
        )
        return [KeyInfo(**dict(r)) for r in rows]

    async def get(self, key_id: str, *, account_id: str) -> KeyInfo | None:
        """The key, live or revoked, if it is ``account_id``'s; else None (as for no key)."""
        row = await self._pool.fetchrow(
            f"SELECT {_INFO} FROM api_keys k LEFT JOIN users u ON u.id = k.user_id"
            " WHERE k.key_id = $1 AND k.account_id = $2",
            key_id,
            account_id,
        )
        return None if row is None else KeyInfo(**dict(row))

    def drop_users(self, user_ids: Collection[str]) -> None:
        """Drop the cached lookups of these users' keys, after this process changed their role,
        groups or status: here the change shows at the next request, elsewhere within
        ``ttl_s``."""
        if not user_ids:
            return
        gone = set(user_ids)
        self._cache = {
            k: v for k, v in self._cache.items() if v[0] is None or v[0].user_id not in gone
        }

    async def revoke(self, key_id: str, *, account_id: str | None = None) -> bool:
        """Revoke a key (other processes notice within their cache ``ttl_s``), only if it is
        ``account_id``'s when given. Returns whether a live key was revoked."""
        done = await self._pool.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL"
            " AND ($2::text IS NULL OR account_id = $2) RETURNING key_id",
            key_id,
            account_id,
        )
        self._cache = {
            k: v for k, v in self._cache.items() if v[0] is None or v[0].key_id != key_id
        }
        return done is not None
