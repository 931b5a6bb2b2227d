"""Call authorization: may this call connect, and for how long (``POST /v1/authorizations``).

Pure domain service over the balance store and the price lists; the HTTP layer only maps
requests and errors. Errors::

    AuthorizeError
    ├── BalanceStoreUnavailable   Redis did not answer in time (or failed). The reservation may
    │                             or may not exist; a retry with the same call_id is safe
    │                             (reserve is idempotent per call_id).
    ├── DatabaseUnavailable       PostgreSQL did not answer in time: the account's price list
    │                             and plan could not be read, or the Redis state Redis lost
    │                             could not be rebuilt. Nothing was reserved; retry.
    └── CallClosed                The call_id has already hung up (reserve.lua's
                                  ``call_closed``). Not a deny reason of the contract: the API
                                  answers a 409; a new call needs a new call_id. Never retry.

Every answer, error or not, comes by the deadline. PostgreSQL is read only for an account the
process has not cached, or one Redis lost; that work runs in tasks of their own, one per account
at a time, which a caller past its deadline stops waiting for without cancelling: concurrent
requests for one account share one query and one connection, and no request waits for asyncpg
to cancel a query on a stalled server (which can take as long as the server is stalled).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, get_args

from redis.exceptions import RedisError

from balance.coalesce import CoalescingBalances
from balance.errors import BalanceStoreError
from balance.protocol import BalanceStore
from balance.values import PlanPeriod, Reservation, Tariff
from infra import metrics
from infra.db import POSTGRES_DOWN
from infra.singleflight import SingleFlight
from rating.catalog import Catalog
from rating.plans import month_period
from rating.rating import NoRate

#: What Redis being away looks like to the balance store's callers.
REDIS_DOWN: Final = (BalanceStoreError, RedisError, OSError)
#: How long a finished rebuild is remembered (see ``Authorizer.restore``): longer than any
#: reservation's round trip, which the deadline bounds.
_REBUILT_MEMORY_S: Final = 60.0

#: The contract's deny reasons, every one of which this service answers
#: (``concurrent_call_limit``: the account's plan allows no more live calls, inbound or
#: outbound; decided in ``balance/lua/reserve.lua`` with the reservation).
DenyReason = Literal[
    "insufficient_credit",
    "account_on_hold",
    "account_suspended",
    "unknown_account",
    "no_rate_for_destination",
    "concurrent_call_limit",
]
DENY_REASONS: Final[tuple[DenyReason, ...]] = get_args(DenyReason)
#: A decision's reason: ``ok`` when allowed, else why not.
DecisionReason = Literal["ok"] | DenyReason


class AuthorizeError(Exception):
    """Base class of authorization failures (not denials: those are answers)."""


class BalanceStoreUnavailable(AuthorizeError):
    """The balance store did not answer within the deadline; retry with the same call_id."""


class DatabaseUnavailable(AuthorizeError):
    """PostgreSQL did not answer within the deadline; nothing was reserved, retry."""


class CallClosed(AuthorizeError):
    """The call_id has already hung up: nothing was reserved, and a retry gets this again."""


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    account_id: str
    call_id: str
    direction: Literal["inbound", "outbound"]
    from_: str
    to: str
    outbound_profile_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    decision: Literal["allow", "deny"]
    reason: DecisionReason
    max_duration_s: int
    reservation_id: str | None
    expires_at: datetime | None
    reserved: int = 0  # micro-units held for the first grant

    @classmethod
    def deny(cls, reason: DenyReason) -> Decision:
        return cls("deny", reason, 0, None, None)


def reservation_id(account_id: str, call_id: str) -> str:
    return f"{account_id}:{call_id}"


class Authorizer:
    """Answers authorizations. ``deadline_s`` bounds the whole answer: past it the caller gets
    ``BalanceStoreUnavailable`` or ``DatabaseUnavailable`` (whichever was being waited for),
    never a hang."""

    def __init__(
        self,
        balances: BalanceStore,
        catalog: Catalog,
        *,
        grant_s: int = 300,
        grace_s: int = 60,
        max_s: int = 14_400,
        deadline_s: float = 0.5,
        db_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        rebuild: Callable[[Sequence[str]], Awaitable[list[str]]] | None = None,
    ) -> None:
        """``rebuild``: recreates the Redis state of accounts Redis lost, from the book of
        record (``balance.accounts.load_into_redis``); without it such an account is denied
        ``unknown_account`` until the hot path rebuilds it. ``db_timeout_s`` bounds one
        rebuild however long its callers wait (they give up at their deadline)."""
        self._balances = balances
        self._catalog = catalog
        self._grant_s = grant_s
        self._grace_s = grace_s
        self._max_s = max_s
        self._deadline_s = deadline_s
        self._db_timeout_s = db_timeout_s
        self._clock = clock
        self._rebuild = rebuild
        self._rebuilding: SingleFlight[str, None] = SingleFlight("rebuilding from the ledger")
        # account -> loop time its last rebuild finished (see restore)
        self._rebuilt_at: dict[str, float] = {}

    @property
    def deadline_s(self) -> float:
        return self._deadline_s

    async def authorize(self, req: AuthorizeRequest, *, deadline: float | None = None) -> Decision:
        """``deadline``: the event loop's time (``loop.time()``) by which to answer, when the
        caller has already spent part of ``deadline_s`` (checking the API key); default: now
        plus ``deadline_s``."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._deadline_s
        # A cached account (nearly every one) is answered without arming a timer.
        acct = self._catalog.cached(req.account_id)
        if acct is None:
            try:
                async with asyncio.timeout_at(deadline):
                    acct = await self._catalog.lookup(req.account_id)
            except (TimeoutError, *POSTGRES_DOWN) as exc:
                raise DatabaseUnavailable(
                    f"the account's prices could not be read within {self._deadline_s} s: "
                    f"{type(exc).__name__}"
                ) from exc
        if acct is None:
            return Decision.deny("unknown_account")
        plist = acct.price_list
        if req.direction == "inbound":
            rate = plist.inbound
        else:
            try:
                rate = plist.outbound_rate(req.to)
            except NoRate:
                return Decision.deny("no_rate_for_destination")
        now_s = int(self._clock())
        plan: PlanPeriod | None = None
        if acct.plan is not None and acct.plan.included_s:
            # The period's grant may not be in the bucket yet: debit.lua creates it at the
            # period's first charge, so the reservation counts the allowance itself.
            plan = PlanPeriod(acct.plan.included_s, *month_period(now_s))
        tariff = Tariff(rate.rate_per_min, rate.connect_fee, rate.initial_s, rate.subsequent_s)
        sent = loop.time()
        r = await self._reserve(req, tariff, now_s, plan, deadline)
        if r.reason == "unknown_account" and self._rebuild is not None:
            # The account exists (the catalog found it in PostgreSQL) but Redis lost it: a
            # flushed or failed-over Redis must not deny every call until the next usage event.
            # Every request that met the loss waits for the one rebuild, then reserves again.
            await self.restore(req.account_id, since=sent, deadline=deadline)
            r = await self._reserve(req, tariff, now_s, plan, deadline)
        if r.decision != "allow":
            if r.reason == "call_closed":
                raise CallClosed(f"call {req.call_id!r} has already hung up")
            return Decision("deny", r.reason, 0, None, None)
        return Decision(
            "allow",
            "ok",
            r.max_duration_s,
            reservation_id(req.account_id, req.call_id),
            datetime.fromtimestamp(r.expires_at, UTC),
            r.reserved,
        )

    async def _reserve(
        self,
        req: AuthorizeRequest,
        tariff: Tariff,
        now_s: int,
        plan: PlanPeriod | None,
        deadline: float,
    ) -> Reservation:
        try:
            if isinstance(self._balances, CoalescingBalances):
                # Bounded by the store's one deadline timer, not a timer per call.
                return await self._balances.reserve(
                    req.account_id,
                    req.call_id,
                    req.direction,
                    tariff,
                    now_s=now_s,
                    grant_s=self._grant_s,
                    grace_s=self._grace_s,
                    max_s=self._max_s,
                    plan=plan,
                    deadline=deadline,
                )
            async with asyncio.timeout_at(deadline):
                return await self._balances.reserve(
                    req.account_id,
                    req.call_id,
                    req.direction,
                    tariff,
                    now_s=now_s,
                    grant_s=self._grant_s,
                    grace_s=self._grace_s,
                    max_s=self._max_s,
                    plan=plan,
                )
        except (TimeoutError, *REDIS_DOWN) as exc:
            raise BalanceStoreUnavailable(
                f"the balance store did not answer within {self._deadline_s} s: "
                f"{type(exc).__name__}"
            ) from exc

    async def restore(self, account_id: str, *, since: float, deadline: float) -> None:
        """Make sure the Redis state of an account Redis lost is rebuilt from PostgreSQL, once
        for every caller that found it missing at ``since`` (loop time) or later: a rebuild
        already running is waited for, one finished since ``since`` is not repeated.

        Raises ``DatabaseUnavailable`` past ``deadline`` (loop time) or when PostgreSQL fails,
        ``BalanceStoreUnavailable`` when Redis fails. Without a ``rebuild`` function it does
        nothing. The rebuild itself goes on, bounded by ``db_timeout_s``, for the next caller.
        """
        if self._rebuild is None:
            return
        if self._rebuilt_at.get(account_id, -1.0) > since:
            return  # rebuilt after this caller looked: its next look finds it
        task = self._rebuilding.task(account_id, lambda: self._rebuild_one(account_id))
        try:
            async with asyncio.timeout_at(deadline):
                # Shielded: a caller at its deadline stops waiting; the others still need it.
                await asyncio.shield(task)
        except (TimeoutError, *POSTGRES_DOWN) as exc:
            # A timeout is PostgreSQL's: Redis answered this caller's reservation a moment
            # ago, and the rebuild is reads of the ledger then one Redis write.
            raise DatabaseUnavailable(
                f"the account's state could not be rebuilt from the ledger in time: "
                f"{type(exc).__name__}"
            ) from exc
        except (RedisError, BalanceStoreError) as exc:
            raise BalanceStoreUnavailable(
                f"the balance store failed while the account was rebuilt: {type(exc).__name__}"
            ) from exc

    async def _rebuild_one(self, account_id: str) -> None:
        assert self._rebuild is not None
        async with asyncio.timeout(self._db_timeout_s):
            loaded = await self._rebuild([account_id])
        # Empty when another process rebuilt it first: the state is there all the same.
        if loaded:
            metrics.ACCOUNTS_REBUILT.inc(len(loaded))
        now = asyncio.get_running_loop().time()
        if len(self._rebuilt_at) >= 1024:
            self._rebuilt_at = {
                a: t for a, t in self._rebuilt_at.items() if t > now - _REBUILT_MEMORY_S
            }
        self._rebuilt_at[account_id] = now
