"""What the recharge tests share: money in micro-units, debits and the triggers they fire in
Redis, and the ``World`` a payment test stands on (the fixtures are in conftest.py), with the
helpers that open accounts on it, build its payment service and check the ledger agrees."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg

from balance.accounts import AccountSpec, create_accounts
from balance.store import RedisBalances
from balance.values import RECHARGE_REQUESTED, Debit
from contracts.payments import Notification
from infra.ledger import PostgresLedger
from recharge.sandbox import SandboxGateway
from recharge.service import PaymentService

USD = 1_000_000
DAY = 19_000  # any UTC day number: the debits' dedup bucket


def debit(i: int, amount: int) -> Debit:
    """Debit number ``i`` (its event id) of ``amount`` micro-units, on the one test day."""
    return Debit(i.to_bytes(16, "big"), b"\x00" * 8, amount, DAY)


async def triggers(balances: RedisBalances, account: str) -> list[int]:
    """The seqs of the account's recharge triggers still in its outbox, oldest first."""
    return [s.seq for s in await balances.pending_outbox(account) if s.type == RECHARGE_REQUESTED]


class Collected:
    """A notifier that keeps what it is told, for the test to read."""

    def __init__(self) -> None:
        self.items: list[Notification] = []

    async def notify(self, notification: Notification) -> None:
        self.items.append(notification)

    def types(self) -> list[str]:
        return [n.type for n in self.items]


class Clock:
    """The time a payment service reads; tests set ``now`` to move it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def no_sleep(_: float) -> None:
    """The service's back-off sleep, skipped: the tests move the clock instead."""
    return None


class World(NamedTuple):
    """What a payment test stands on: real PostgreSQL and Redis, the sandbox gateway, the
    notifications it saw, and the clock the service reads (tests move it)."""

    pool: asyncpg.Pool
    balances: RedisBalances
    gateway: SandboxGateway
    notes: Collected
    clock: Clock


def payment_service(world: World, **kw: object) -> PaymentService:
    """A payment service on ``world``; ``kw``: its other settings (``backoff_s``, ...)."""
    pool, balances, gw, notes, clock = world
    return PaymentService(pool, balances, gw, notes, clock=clock, sleep=no_sleep, **kw)  # type: ignore[arg-type]


async def open_account(
    pool: asyncpg.Pool,
    balances: RedisBalances,
    account: str,
    balance: str,
    *,
    age: timedelta = timedelta(days=30),
    level: int = 1,
) -> None:
    """Open ``account`` with ``balance`` (dollars as a string), created ``age`` ago, at
    verification ``level``."""
    spec = AccountSpec.model_validate(
        {"id": account, "price_list_id": "standard", "balance": balance}
    )
    await create_accounts(pool, balances, [spec])
    await pool.execute(
        "UPDATE accounts SET created_at = now() - $2::interval, verification_level = $3"
        " WHERE id = $1",
        account,
        age,
        level,
    )


async def drift(pool: asyncpg.Pool, balances: RedisBalances, account: str, debited: int = 0) -> int:
    """Redis balance against the ledger; ``debited``: what the test took straight from Redis
    (no ledger row), so the payments' side alone is checked."""
    ledger = (await PostgresLedger(pool).balances([account]))[account]
    st = await balances.get(account)
    assert st is not None
    return st.balance - (ledger - debited)
