"""``BalanceStore``: the seam before Redis that every consumer of the balance store takes.

``balance.store.RedisBalances`` is the one implementation (``balance.coalesce`` wraps it for
the API); ``tests/balance/test_balance_contract.py`` is the contract suite every implementation
passes. The methods are those consumers call; what only tests and operators inspect
(``reservations``, ``recharge_state``, ``pending_outbox``, ``release``) stays on
``RedisBalances``; ``held_seconds`` is here since the subscription summary shows the seconds
calls in flight hold. Errors: ``balance.errors`` (``OutcomeUnknown`` or ``NotApplied``), for
every method. Money in integer micro-units, times in unix seconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from balance.values import (
    AccountOutcome,
    AccountState,
    AccountStatus,
    CallProgress,
    Credit,
    CreditOutcome,
    DebitLike,
    GrantOutcome,
    NewAccount,
    NumberAction,
    NumberOutcome,
    PendingSignal,
    PlanPeriod,
    Progress,
    Provisional,
    Released,
    Reservation,
    ReservationRequest,
    StatusAction,
    StatusChange,
    Tariff,
    Undraw,
)
from contracts.events import Direction
from infra.ledger import Unsettled


class BalanceStore(Protocol):
    """Accounts' real-time balances, reservations and outboxes (see ``RedisBalances`` for
    each method's contract: idempotency keys, what a retry after ``OutcomeUnknown`` does)."""

    # Usage (the metering processor).
    async def apply_debits(
        self,
        batch: Mapping[str, Sequence[DebitLike]],
        now_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[AccountOutcome]: ...

    async def credit(
        self,
        account_id: str,
        credit_id: str,
        amount: int,
        *,
        payment: bool = False,
        refund: bool = False,
        now_s: int | None = None,
    ) -> CreditOutcome: ...

    async def credit_many(
        self, credits: Sequence[Credit], *, now_s: int | None = None
    ) -> list[CreditOutcome]: ...

    async def undraw_many(self, draws: Sequence[Undraw]) -> list[int]: ...

    async def grant_minutes(
        self,
        account_id: str,
        grant_id: str,
        *,
        price: int,
        seconds: int,
        valid_from: int,
        expires_at: int,
        now_s: int,
    ) -> GrantOutcome: ...

    async def number_step(
        self,
        account_id: str,
        action: NumberAction,
        number: str,
        token: str,
        *,
        fee: int = 0,
        reason: str = "-",
        now_s: int | None = None,
    ) -> NumberOutcome: ...

    async def plan_step(
        self,
        account_id: str,
        token: str,
        *,
        fee: int,
        included_s: int,
        period: tuple[int, int],
        add_s: int = 0,
        cover: bool = False,
        now_s: int | None = None,
    ) -> GrantOutcome: ...

    # Calls' reservations (authorization, call progress, the sweep).
    async def reserve(
        self,
        account_id: str,
        call_id: str,
        direction: Direction,
        tariff: Tariff,
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plan: PlanPeriod | None = None,
    ) -> Reservation: ...

    async def reserve_many(
        self,
        calls: Sequence[ReservationRequest],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        force: bool = False,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Reservation]: ...

    async def progress(
        self,
        updates: Sequence[CallProgress],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Progress]: ...

    async def sweep_expired(
        self,
        *,
        now_s: int,
        limit: int = 1000,
        keep_s: int = 86_400,
        record: Callable[[list[Provisional]], Awaitable[None]] | None = None,
    ) -> list[Released | Provisional]: ...

    async def restore_provisional(
        self, charges: Sequence[Unsettled], *, now_s: int, keep_s: int = 86_400
    ) -> int: ...

    async def set_limits(
        self, account_id: str, *, credit_limit: int, low_threshold: int, now_s: int | None = None
    ) -> AccountStatus | None: ...

    # Outboxes (the outbox relay).
    async def pending_outboxes(self, limit: int = 1000) -> dict[str, list[PendingSignal]]: ...

    async def clear_outbox_pending(self, account_ids: Sequence[str]) -> None: ...

    async def ack_outbox(self, acks: dict[str, int]) -> None: ...

    # Accounts' state (provisioning, the API, payments, reconciliation).
    async def create_account(
        self,
        account_id: str,
        *,
        balance: int,
        credit_limit: int,
        low_threshold: int,
        status: AccountStatus = "active",
        seq: int = 0,
        bucket: str = "",
        recharge_threshold: int | None = None,
        recharge_trigger: int | None = None,
        hold_reason: str | None = None,
        credited: Sequence[str] = (),
        max_calls: int = 0,
    ) -> bool: ...

    async def create_accounts(self, accounts: Sequence[NewAccount]) -> list[bool]: ...

    async def get(self, account_id: str) -> AccountState | None: ...

    async def balances(self, account_ids: Sequence[str]) -> dict[str, int | None]: ...

    async def bucket(self, account_id: str) -> bytes | None: ...

    async def held_seconds(self, account_id: str) -> dict[str, int]:
        """Live reservations of an account: call_id -> seconds of the minute bucket held."""
        ...

    async def set_status(
        self,
        account_id: str,
        action: StatusAction,
        reason: str,
        *,
        now_s: int | None = None,
        lift_hold: bool = False,
    ) -> StatusChange | None: ...

    async def set_auto_recharge(self, account_id: str, threshold: int | None) -> int | None: ...

    async def close_recharge_trigger(self, account_id: str, seq: int) -> bool: ...

    # Concurrent calls (a subscription's change of plan).
    async def set_call_limit(
        self, account_id: str, max_calls: int, *, now_s: int | None = None
    ) -> int | None: ...
