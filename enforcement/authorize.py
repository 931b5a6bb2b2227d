"""Call authorization: may this call connect, and for how long (``POST /v1/authorizations``).

Pure domain service over the balance store and the price lists; the HTTP layer only maps
requests and errors. Errors::

    AuthorizeError
    └── BalanceStoreUnavailable   Redis did not answer in time. The reservation may or may
                                  not exist; a retry with the same call_id is safe (reserve
                                  is idempotent per call_id).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from redis.exceptions import RedisError

from enforcement.balance import OutcomeUnknown, PlanPeriod, RedisBalances, Tariff
from meter import metrics
from metering.catalog import Catalog
from metering.plans import month_period
from metering.rating import NoRate

DenyReason = Literal[
    "insufficient_credit",
    "account_on_hold",
    "account_suspended",
    "unknown_account",
    "no_rate_for_destination",
]
DENY_REASONS: Final[tuple[str, ...]] = (
    "insufficient_credit",
    "account_on_hold",
    "account_suspended",
    "unknown_account",
    "no_rate_for_destination",
)


class AuthorizeError(Exception):
    """Base class of authorization failures (not denials: those are answers)."""


class BalanceStoreUnavailable(AuthorizeError):
    """The balance store did not answer within the deadline; retry with the same call_id."""


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
    reason: str  # "ok" when allowed, else one of DENY_REASONS
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
    ``BalanceStoreUnavailable``, never a hang."""

    def __init__(
        self,
        balances: RedisBalances,
        catalog: Catalog,
        *,
        grant_s: int = 300,
        grace_s: int = 60,
        max_s: int = 14_400,
        deadline_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        rebuild: Callable[[Sequence[str]], Awaitable[list[str]]] | None = None,
    ) -> None:
        """``rebuild``: recreates the Redis state of accounts Redis lost, from the book of
        record (``meter.accounts.load_into_redis``); without it such an account is denied
        ``unknown_account`` until the hot path rebuilds it."""
        self._balances = balances
        self._catalog = catalog
        self._grant_s = grant_s
        self._grace_s = grace_s
        self._max_s = max_s
        self._deadline_s = deadline_s
        self._clock = clock
        self._rebuild = rebuild

    async def authorize(self, req: AuthorizeRequest) -> Decision:
        try:
            async with asyncio.timeout(self._deadline_s):
                return await self._authorize(req)
        except (TimeoutError, OutcomeUnknown, RedisError, OSError) as exc:
            raise BalanceStoreUnavailable(
                f"the balance store did not answer within {self._deadline_s} s: "
                f"{type(exc).__name__}"
            ) from exc

    async def _authorize(self, req: AuthorizeRequest) -> Decision:
        await self._catalog.resolve((req.account_id,))
        acct = self._catalog.get(req.account_id)
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
            plan = (acct.plan.included_s, *month_period(now_s))
        tariff = Tariff(rate.rate_per_min, rate.connect_fee, rate.initial_s, rate.subsequent_s)
        for attempt in range(2):
            r = await self._balances.reserve(
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
            if r.reason != "unknown_account" or self._rebuild is None or attempt:
                break
            # The account exists (the catalog found it in PostgreSQL) but Redis lost it: a
            # flushed or failed-over Redis must not deny every call until the next usage event.
            if not await self._rebuild([req.account_id]):
                break
            metrics.ACCOUNTS_REBUILT.inc()
        if r.decision != "allow":
            return Decision("deny", r.reason, 0, None, None)
        return Decision(
            "allow",
            "ok",
            r.max_duration_s,
            reservation_id(req.account_id, req.call_id),
            datetime.fromtimestamp(r.expires_at, UTC),
            r.reserved,
        )
