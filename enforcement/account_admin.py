"""An account's suspensions and who may lift them (docs/design/status-origins.md), and the
account queries of the API's account routes, against the book of record (PostgreSQL).

Every suspension has an origin: ``operator`` (a platform operator), ``manager`` (the admin of
the account's manager), ``tenant`` (the account's own admin) or ``past_due`` (an overdue
invoice). An account is suspended while any origin is there, and a resume lifts only the
origins its actor may lift (``LIFTS``): a tenant its own, a manager its own and the tenant's,
an operator everything, the hold the service pinned (``hold_reason``, e.g. ``recharge_cap``)
included. A payment lifts that pin too (``recharge.settlement``), never a suspension. This
module is the one writer of ``account_suspensions`` and of ``accounts.suspended``, which is
true exactly while the account has an origin (the Redis rebuild reads it); the CLI and the API
both go through ``change_status``.

Errors (what a caller does on each)::

    StatusError
    ├── UnknownAccount     no such account: nothing changed
    ├── LiftNotPermitted   a resume by an actor that may lift none of what holds the account:
    │                      nothing changed of record; ``remaining`` and ``hold_reason`` say
    │                      what holds it, ``LIFTED_BY`` who may lift each
    └── StateNotApplied    Redis did not answer, or may not have applied its part (PostgreSQL's
                           may be recorded): send the same request again, which repairs Redis

PostgreSQL's own errors (asyncpg's, ``OSError``, a timeout of the caller's) propagate: the
change may or may not be recorded, and the same request again is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, TypeVar, get_args

import asyncpg

from balance.accounts import load_into_redis
from balance.errors import BalanceStoreError
from balance.protocol import BalanceStore
from balance.values import AccountStatus, StatusChange
from enforcement.authorize import REDIS_DOWN
from infra.clock import Clock, system_clock
from infra.db import POSTGRES_DOWN
from infra.ledger import Conn

_T = TypeVar("_T")

#: Who suspended an account, in the order answers list them.
Origin = Literal["operator", "manager", "tenant", "past_due"]
ORIGINS: Final[tuple[Origin, ...]] = get_args(Origin)
#: Who asks: the API maps its caller here (an account's own admin is its ``tenant``); the
#: operators' CLI acts as ``operator``; the invoices (``enforcement.invoices``) as ``past_due``:
#: they suspend an account 14 days past due and lift only that when it is paid. What an actor
#: suspends is recorded as its own origin.
Actor = Literal["tenant", "manager", "operator", "past_due"]
Action = Literal["suspend", "resume"]

#: What each actor's resume lifts. ``past_due`` is an operator's alone (later also a payment of
#: the invoice); the pinned hold (``hold_reason``) is an operator's and a payment's.
LIFTS: Final[Mapping[Actor, frozenset[Origin]]] = {
    "tenant": frozenset({"tenant"}),
    "manager": frozenset({"tenant", "manager"}),
    "operator": frozenset(ORIGINS),
    "past_due": frozenset({"past_due"}),
}
#: Who may lift each origin, as a refusal names them.
LIFTED_BY: Final[Mapping[Origin, str]] = {
    "operator": "an operator",
    "manager": "the manager's admin or an operator",
    "tenant": "the account's admin, its manager's admin or an operator",
    "past_due": "an operator, or a payment of the overdue invoice",
}
PIN_LIFTED_BY: Final = "an operator or a payment"

#: A reason and an origin end up in '|'-separated outbox entries (set_status.lua checks it too).
_REASON: Final = re.compile(r"^[a-z0-9_]{1,64}$")
#: One status change of an account at a time, from PostgreSQL's write to Redis's (a session
#: lock: a transaction's would end before Redis is told).
_LOCK: Final = "SELECT pg_advisory_lock(hashtextextended('status:' || $1, 0))"
_UNLOCK: Final = "SELECT pg_advisory_unlock(hashtextextended('status:' || $1, 0))"


class StatusError(Exception):
    """Base class of the errors of ``change_status``."""


class UnknownAccount(StatusError, LookupError):
    """No such account: nothing changed."""


class LiftNotPermitted(StatusError):
    """The actor may lift none of what holds the account: nothing changed of record."""

    def __init__(
        self, actor: Actor, remaining: tuple[Origin, ...], hold_reason: str | None
    ) -> None:
        self.actor = actor
        self.remaining = remaining
        self.hold_reason = hold_reason
        held = [f"suspended by {o} (lifted by {LIFTED_BY[o]})" for o in remaining]
        if hold_reason is not None:
            held.append(f"on hold for {hold_reason} (lifted by {PIN_LIFTED_BY})")
        super().__init__(f"a {actor} may not lift this: the account is " + "; ".join(held))


class StateNotApplied(StatusError):
    """Redis did not answer, or may not have applied its part; PostgreSQL's may be recorded.
    Sending the same request again is safe and repairs Redis."""


@dataclass(frozen=True, slots=True)
class StatusOutcome:
    """What ``change_status`` left: the account's status (Redis's, where its credit puts it
    once nothing holds it), whether the request changed anything (an origin recorded or
    lifted, the pin lifted, or Redis brought back in step), the origins still there and the
    pinned hold's reason (None: none)."""

    account_id: str
    status: AccountStatus
    changed: bool
    suspended_by: tuple[Origin, ...]
    hold_reason: str | None


@dataclass(frozen=True, slots=True)
class _Recorded:
    """What the PostgreSQL step left: the origins there and their reasons (in ``ORIGINS``
    order), the pin, whether anything changed, and whether the resume lifted nothing it
    found."""

    reasons: dict[Origin, str]
    hold_reason: str | None
    changed: bool
    refused: bool

    @property
    def remaining(self) -> tuple[Origin, ...]:
        return tuple(o for o in ORIGINS if o in self.reasons)


async def account_currency(pool: asyncpg.Pool, account_id: str) -> str | None:
    """The account's currency; None when there is no such account."""
    currency = await pool.fetchval("SELECT currency FROM accounts WHERE id = $1", account_id)
    return None if currency is None else str(currency)


async def change_status(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    account_id: str,
    action: Action,
    actor: Actor,
    *,
    reason: str | None = None,
    set_by: str | None = None,
    now_s: int | None = None,
    redis_timeout_s: float | None = None,
    clock: Clock = system_clock,
) -> StatusOutcome:
    """Suspend or resume ``account_id`` as ``actor`` (the operators' CLI passes "operator").

    ``suspend`` records the actor's origin with ``reason`` (a short code, default the origin's
    name) and ``set_by`` (the API key's id, or the tool's name), and suspends Redis when it
    was not yet: a second origin queues no second ``account.suspend``. ``resume`` lifts what
    the actor may (``LIFTS``); only once no origin is left does Redis resume, queuing
    ``account.resume`` (and ``account.hold`` where a pin or the credit holds it). Raises
    ``LiftNotPermitted`` when something holds the account and the actor may lift none of it;
    with nothing to lift, the answer is ``changed`` False.

    Idempotent, PostgreSQL first then Redis: after a failure between them (``StateNotApplied``,
    a timeout), the same call again brings Redis in step with what PostgreSQL has, and so does
    any later call for the account, a refused one included. ``now_s`` (unix s, default
    ``clock``): when the origin was set, and which minute-bucket grants count for a resumed
    account. ``redis_timeout_s`` bounds each Redis call (None: unbounded).
    """
    if action not in ("suspend", "resume"):
        raise ValueError(f"unknown action {action!r}")
    if actor not in LIFTS:
        raise ValueError(f"unknown actor {actor!r}")
    reason = actor if reason is None else reason
    if not _REASON.match(reason):
        raise ValueError(f"reason must match {_REASON.pattern}: {reason!r}")
    if set_by is not None and not 0 < len(set_by) <= 100:
        raise ValueError("set_by must be 1 to 100 characters")
    now = int(clock()) if now_s is None else now_s
    # Redis lost the account: rebuilt first, from PostgreSQL as it stands. Rebuilt after the
    # change, it would already say suspended and account.suspend would never be queued.
    if await _in_redis(balances.get(account_id), redis_timeout_s) is None:
        try:
            await load_into_redis(pool, balances, [account_id], now=now)
        except BalanceStoreError as exc:
            raise StateNotApplied(f"the balance store failed a rebuild: {exc}; retry") from exc
    async with _one_at_a_time(pool, account_id) as conn:
        async with conn.transaction():
            done = await _record(conn, account_id, action, actor, reason, set_by, now)
        change = await _in_redis(
            _converge(balances, account_id, actor, reason, done, now), redis_timeout_s
        )
    if change is None:
        raise StateNotApplied(f"account {account_id} is missing from Redis; retry")
    if done.refused:
        raise LiftNotPermitted(actor, done.remaining, done.hold_reason)
    return StatusOutcome(
        account_id,
        change.status,
        done.changed or change.changed,
        done.remaining,
        done.hold_reason,
    )


async def _record(
    conn: Conn,
    account_id: str,
    action: Action,
    actor: Actor,
    reason: str,
    set_by: str | None,
    now: int,
) -> _Recorded:
    """The PostgreSQL step, in the caller's transaction."""
    account = await conn.fetchrow(
        "SELECT hold_reason FROM accounts WHERE id = $1 FOR UPDATE", account_id
    )
    if account is None:
        raise UnknownAccount(f"no account {account_id!r}")
    pin: str | None = account["hold_reason"]
    rows = await conn.fetch(
        "SELECT origin, reason FROM account_suspensions WHERE account_id = $1", account_id
    )
    reasons: dict[Origin, str] = {r["origin"]: r["reason"] for r in rows}
    changed = refused = False
    if action == "suspend":
        if actor not in reasons:
            await conn.execute(
                "INSERT INTO account_suspensions (account_id, origin, reason, set_by, set_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                account_id,
                actor,
                reason,
                set_by,
                datetime.fromtimestamp(now, UTC),
            )
            reasons[actor] = reason
            changed = True
    else:
        lifted = sorted(LIFTS[actor] & reasons.keys())
        lifts_pin = actor == "operator" and pin is not None
        refused = not lifted and not lifts_pin and (bool(reasons) or pin is not None)
        if lifted:
            await conn.execute(
                "DELETE FROM account_suspensions WHERE account_id = $1 AND origin = ANY($2)",
                account_id,
                lifted,
            )
            for o in lifted:
                del reasons[o]
        if lifts_pin:
            await conn.execute("UPDATE accounts SET hold_reason = NULL WHERE id = $1", account_id)
            pin = None
        changed = bool(lifted) or lifts_pin
    # Set from what is there whatever the action, so a flag left out of step is put right.
    await conn.execute(
        "UPDATE accounts SET suspended = $2 WHERE id = $1 AND suspended <> $2",
        account_id,
        bool(reasons),
    )
    return _Recorded(reasons, pin, changed, refused)


async def _converge(
    balances: BalanceStore,
    account_id: str,
    actor: Actor,
    reason: str,
    done: _Recorded,
    now: int,
) -> StatusChange | None:
    """Redis made to say what PostgreSQL now does: suspended while an origin is there (a no-op
    when it already is), else resumed, lifting the pin only for an operator."""
    if done.reasons:
        # The reason telephony hears: the caller's own suspension's, else the weightiest one
        # left (only a Redis out of step hears a suspend from a resume).
        first = done.reasons.get(actor) or done.reasons[done.remaining[0]]
        return await balances.set_status(account_id, "suspend", first, now_s=now)
    return await balances.set_status(
        account_id, "resume", reason, now_s=now, lift_hold=actor == "operator"
    )


@contextlib.asynccontextmanager
async def _one_at_a_time(pool: asyncpg.Pool, account_id: str) -> AsyncIterator[Conn]:
    """A connection holding the account's status lock. Without it, a tenant's resume and an
    operator's suspend could commit in one order and reach Redis in the other, leaving Redis
    resumed under the operator's suspension."""
    async with pool.acquire() as conn:
        await conn.execute(_LOCK, account_id)
        try:
            yield conn
        finally:
            # A connection that cannot unlock is broken: closing it, or the pool's reset on
            # release (pg_advisory_unlock_all), releases the lock all the same.
            with contextlib.suppress(*POSTGRES_DOWN, asyncpg.PostgresError):
                await conn.execute(_UNLOCK, account_id)


async def _in_redis(work: Awaitable[_T], timeout_s: float | None) -> _T:
    try:
        async with asyncio.timeout(timeout_s):
            return await work
    except (TimeoutError, *REDIS_DOWN) as exc:
        raise StateNotApplied(
            f"the balance store did not answer: {type(exc).__name__}; retry"
        ) from exc
