"""Creating accounts and price lists (CLI, seed files, tests), and rebuilding Redis state.

An account's opening balance is a ledger row like any other credit, so the Redis balance always
equals the sum of the account's ledger rows once the pipeline is drained.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from contracts.events import ACCOUNT_ID_PATTERN
from contracts.money import Micros
from enforcement.balance import RedisBalances
from meter.ledger import Ledger, LedgerRow, credit_key


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateSpec(_Spec):
    prefix: Annotated[str, Field(pattern=r"^[0-9]{1,15}$")]
    description: str = ""
    rate_per_min: Micros
    connect_fee: Micros = 0
    initial_s: Annotated[int, Field(ge=1, le=3600)] = 6
    subsequent_s: Annotated[int, Field(ge=1, le=3600)] = 6


class PriceListSpec(_Spec):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    inbound_per_min: Micros
    sms_per_part: Micros
    outbound: list[RateSpec] = []


class AccountSpec(_Spec):
    id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)]
    name: str = ""
    price_list_id: str
    balance: Micros = 0
    credit_limit: Annotated[Micros, Field(ge=0)] = 0
    low_balance_threshold: Annotated[Micros, Field(ge=0)] = 0


class SeedFile(_Spec):
    price_lists: list[PriceListSpec] = []
    accounts: list[AccountSpec] = []


async def put_price_list(pool: asyncpg.Pool, spec: PriceListSpec) -> None:
    """Create or replace a price list (its rates are replaced whole)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO price_lists (id, currency, inbound_per_min, sms_per_part)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET currency = $2,"
            " inbound_per_min = $3, sms_per_part = $4",
            spec.id,
            spec.currency,
            spec.inbound_per_min,
            spec.sms_per_part,
        )
        await conn.execute("DELETE FROM price_list_rates WHERE price_list_id = $1", spec.id)
        await conn.copy_records_to_table(
            "price_list_rates",
            records=[
                (
                    spec.id,
                    r.prefix,
                    r.description,
                    r.rate_per_min,
                    r.connect_fee,
                    r.initial_s,
                    r.subsequent_s,
                )
                for r in spec.outbound
            ],
            columns=[
                "price_list_id",
                "prefix",
                "description",
                "rate_per_min",
                "connect_fee",
                "initial_s",
                "subsequent_s",
            ],
        )


async def create_accounts(
    pool: asyncpg.Pool, balances: RedisBalances, specs: Sequence[AccountSpec]
) -> int:
    """Create accounts with their opening balance (idempotent: existing ones are left alone).

    Order matters for a crash: PostgreSQL first (account row + opening ledger row in one
    transaction), then Redis, which is rebuilt from the ledger if it is missing.
    Returns the number of accounts newly created.
    """
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        created = await conn.fetch(
            "INSERT INTO accounts (id, name, price_list_id, credit_limit, low_balance_threshold)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            [s.id for s in specs],
            [s.name for s in specs],
            [s.price_list_id for s in specs],
            [s.credit_limit for s in specs],
            [s.low_balance_threshold for s in specs],
        )
        new_ids = {r["id"] for r in created}
        rows = [
            LedgerRow(
                credit_key(s.id, "opening"),
                s.id,
                "opening",
                s.balance,
                0,
                "opening",
                "",
                now,
                "urn:meter:accounts",
                "opening",
                None,
            )
            for s in specs
            if s.id in new_ids
        ]
        if rows:
            await conn.executemany(
                "INSERT INTO ledger (event_key, account_id, kind, amount, quantity, ref, rate_ref,"
                " event_time, source, event_id, fingerprint)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT DO NOTHING",
                [
                    (
                        r.event_key,
                        r.account_id,
                        r.kind,
                        r.amount,
                        r.quantity,
                        r.ref,
                        r.rate_ref,
                        r.event_time,
                        r.source,
                        r.event_id,
                        r.fingerprint,
                    )
                    for r in rows
                ],
            )
    await load_into_redis(pool, balances, [s.id for s in specs])
    return len(new_ids)


async def load_into_redis(
    pool: asyncpg.Pool, balances: RedisBalances, account_ids: Sequence[str]
) -> list[str]:
    """Create the Redis state of accounts that have none, from the ledger. Returns those loaded.

    Used at account creation and when the hot path meets an account Redis does not know
    (Redis lost or flushed): balance = sum of the ledger, seq = last signal recorded.
    """
    ledger = Ledger(pool)
    rows = await pool.fetch(
        "SELECT id, credit_limit, low_balance_threshold, suspended FROM accounts"
        " WHERE id = ANY($1::text[])",
        list(account_ids),
    )
    ids = [r["id"] for r in rows]
    sums = await ledger.balances(ids)
    seqs = await ledger.last_seq(ids)
    loaded = []
    for r in rows:
        bal = sums.get(r["id"], 0)
        avail = bal + r["credit_limit"]
        if r["suspended"]:
            status = "suspended"
        elif avail <= 0:
            status = "hold"
        elif avail <= r["low_balance_threshold"]:
            status = "low"
        else:
            status = "active"
        if await balances.create_account(
            r["id"],
            balance=bal,
            credit_limit=r["credit_limit"],
            low_threshold=r["low_balance_threshold"],
            status=status,
            seq=seqs.get(r["id"], 0),
        ):
            loaded.append(r["id"])
    return loaded
