"""Who may do what: the one permission table of the HTTP API, and the check every route makes.

A route names the permission it needs; ``allow`` answers for the caller (an ``ApiKey``) and the
account in the path (docs/design/access.md):

- an **operator** acts on every account, where the permission lets operators in;
- a **service** key (switches, call-control) acts for every account, for the few permissions
  call-control needs;
- an **admin** or **user** acts on its own account with its role, plus the privileges of its
  access groups (``edit_billing`` opens billing to a user, as the seeds' Edit Billing does);
- a **manager**'s admin acts on the accounts it manages as their admin would, where the
  permission lets managers in (seed 003: usage, balance, settings, keys); never the other
  way round, and never on accounts it does not manage.

Everything else is 403 ``forbidden``, and the answer is the same whether or not the other
account exists: a caller learns nothing of accounts it may not see. ``Relation`` tells the
route how the caller stands to the account, for what the route must do differently (who set a
suspension; whether prices may be shown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg

from infra.http.api_keys import ApiKey, Role
from infra.http.errors import RETRY_AFTER, ApiError

Permission = Literal[
    "calls.authorize",  # POST /v1/authorizations
    "balance.read",
    "account.read",  # the account's profile, and GET /v1/me
    "account.status",  # suspend / resume (what each may lift: enforcement.account_admin)
    "account.settings",  # credit limit, verification level, manager, price list: operators
    "accounts.create",  # managed accounts (managers) and any account (operators)
    "accounts.list",
    "billing.read",  # auto-recharge, payment method, payment history
    "billing.write",  # the same, changed; top-ups; bundles
    "people.manage",  # users, access groups, API keys of the account
    "billing_units.read",
    "billing_units.write",
    "events.ingest",  # POST /v1/events: switches publishing usage over HTTP
    "plans.read",  # GET /v1/plans: what can be bought
    "invoices.cancel",  # an invoice cancelled, its charges credited back: operators only
    "payments.refund",  # refunds to the card and as credit: operators only
]

#: How the caller stands to the account it acts on.
Relation = Literal["own", "managed", "operator", "service"]


@dataclass(frozen=True, slots=True)
class Rule:
    """Who holds a permission: ``roles`` on their own account, a user holding any of
    ``privileges`` on its own, managers' admins on their managed accounts (``manager``),
    operators on any (``operator``), service keys on any (``service``)."""

    roles: frozenset[Role]
    privileges: frozenset[str] = frozenset()
    manager: bool = False
    operator: bool = False
    service: bool = False


def _rule(
    *roles: Role,
    privileges: tuple[str, ...] = (),
    manager: bool = False,
    operator: bool = False,
    service: bool = False,
) -> Rule:
    return Rule(frozenset(roles), frozenset(privileges), manager, operator, service)


#: The table. Tests check every route x every kind of principal against their own copy of it.
RULES: Final[dict[Permission, Rule]] = {
    "calls.authorize": _rule("admin", "user", manager=True, service=True),
    "balance.read": _rule("admin", "user", manager=True, operator=True, service=True),
    "account.read": _rule("admin", "user", manager=True, operator=True),
    "account.status": _rule("admin", manager=True, operator=True),
    "account.settings": _rule(operator=True),
    "accounts.create": _rule(manager=True, operator=True),
    "accounts.list": _rule(manager=True, operator=True),
    # Operators read billing (support) but never spend a customer's card.
    "billing.read": _rule("admin", privileges=("edit_billing",), manager=True, operator=True),
    "billing.write": _rule("admin", privileges=("edit_billing",), manager=True),
    "people.manage": _rule("admin", manager=True, operator=True),
    "billing_units.read": _rule(
        "admin",
        privileges=("view_billing_unit", "edit_billing_unit"),
        manager=True,
        operator=True,
    ),
    "billing_units.write": _rule("admin", privileges=("edit_billing_unit",), manager=True),
    # Usage is the switch's word, never a customer's: a customer could post its own hangups.
    "events.ingest": _rule(service=True),
    # What is on sale: anyone of an account (a managed one sees no price), and operators.
    "plans.read": _rule("admin", "user", manager=True, operator=True),
    "invoices.cancel": _rule(operator=True),
    # Money given back is the operator's decision (issue 15), never the customer's own.
    "payments.refund": _rule(operator=True),
}


class DirectoryUnavailable(Exception):
    """PostgreSQL could not say who manages an account, and it was not cached."""


class Directory:
    """Who manages each account (``accounts.manager_id``), cached in the process for
    ``ttl_s``: the question a manager's request asks, on every request to a managed account.
    An account that does not exist is answered like one with no manager."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl_s: float = 5.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_cached: int = 100_000,
    ) -> None:
        self._pool = pool
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._max = max_cached
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def manager_of(self, account_id: str) -> str | None:
        now = self._clock()
        hit = self._cache.get(account_id)
        if hit is not None and now - hit[1] < self._ttl_s:
            return hit[0]
        try:
            async with asyncio.timeout(self._timeout_s):
                manager = await self._pool.fetchval(
                    "SELECT manager_id FROM accounts WHERE id = $1", account_id
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DirectoryUnavailable(f"account lookup failed: {type(exc).__name__}") from exc
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[account_id] = (manager, now)
        return None if manager is None else str(manager)

    def forget(self, account_id: str | None = None) -> None:
        """Drop the cached answer for ``account_id`` (all without one): after this process
        changed who manages it."""
        if account_id is None:
            self._cache.clear()
        else:
            self._cache.pop(account_id, None)


def forbidden(message: str = "this key may not do this") -> ApiError:
    return ApiError(403, "forbidden", message)


def holds(key: ApiKey, permission: Permission) -> bool:
    """Whether the key's role or privileges carry ``permission`` on its own account."""
    rule = RULES[permission]
    return key.role in rule.roles or (key.role == "user" and bool(rule.privileges & key.privileges))


async def allow(
    key: ApiKey, account_id: str, permission: Permission, directory: Directory
) -> Relation:
    """How ``key`` may act on ``account_id`` for ``permission``, or 403 ``forbidden`` (the same
    answer for an account that does not exist). 503 when who manages it cannot be read."""
    rule = RULES[permission]
    role = key.role
    if role == "operator":
        if rule.operator:
            return "operator"
        raise forbidden("an operator may not do this")
    if role == "service":
        if rule.service:
            return "service"
        raise forbidden("a service key may not do this")
    if key.account_id == account_id:
        if holds(key, permission):
            return "own"
        raise forbidden(f"a {role} may not do this")
    if rule.manager and role == "admin" and key.is_manager:
        try:
            manager = await directory.manager_of(account_id)
        except DirectoryUnavailable as exc:
            raise ApiError(
                503, "database_unavailable", f"{exc}; retry", None, RETRY_AFTER
            ) from exc
        if manager is not None and manager == key.account_id:
            return "managed"
    raise forbidden("this key may only act on its own account")


def allow_anywhere(key: ApiKey, permission: Permission) -> Relation:
    """For a route with no account in its path (``POST``/``GET /v1/accounts``, ``POST
    /v1/events``): operators where the permission lets them in, service keys where it lets
    them in, a manager's admin where it lets managers in (the route then acts on its managed
    accounts only); else 403."""
    rule = RULES[permission]
    if key.role == "operator" and rule.operator:
        return "operator"
    if key.role == "service" and rule.service:
        return "service"
    if key.role == "admin" and key.is_manager and rule.manager:
        return "managed"
    raise forbidden()


def sees_prices(key: ApiKey) -> bool:
    """A managed account never sees a price (seed 003): its manager's, or its own."""
    return key.manager_id is None
