"""Creating accounts and price lists (CLI, seed files, tests), and rebuilding Redis state.

An account's opening balance is a ledger row like any other credit, so the Redis balance always
equals the sum of the account's ledger rows once the pipeline is drained.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Literal, Self

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from balance import keys
from balance.protocol import BalanceStore
from balance.values import AccountStatus, NewAccount
from contracts.events import ACCOUNT_ID_PATTERN
from contracts.money import Micros
from infra.clock import Clock, system_clock, utc_datetime
from infra.ledger import Ledger, PostgresLedger, credit_key
from rating.plans import parse_bucket, rebuild_buckets
from rating.pricelists import RATE_COLUMNS, write_prices
from rating.rating import MAX_RATE_PER_MIN, PriceVersion, VoiceRate


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: accounts whose Redis state one pipelined round trip creates (``load_into_redis``)
_LOAD_PER_ROUND_TRIP = 2_000
_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class RateSpec(_Spec):
    prefix: Annotated[str, Field(pattern=r"^[0-9]{1,15}$")]
    description: str = ""
    rate_per_min: Annotated[Micros, Field(ge=0, le=MAX_RATE_PER_MIN)]
    connect_fee: Annotated[Micros, Field(ge=0)] = 0
    initial_s: Annotated[int, Field(ge=1, le=3600)] = 6
    subsequent_s: Annotated[int, Field(ge=1, le=3600)] = 6
    #: in force from then until the prefix's next version; default: always
    effective_from: AwareDatetime = _EPOCH


class PriceListSpec(_Spec):
    id: Annotated[str, Field(pattern=_ID)]
    description: str = ""
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    inbound_per_min: Annotated[Micros, Field(ge=0, le=MAX_RATE_PER_MIN)]
    sms_per_part: Annotated[Micros, Field(ge=0)]
    number_monthly_fee: Annotated[Micros, Field(ge=0)] = 0
    one_time_fees: dict[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")], Micros] = {}
    outbound: list[RateSpec] = []


class PlanSpec(_Spec):
    """A plan tier (docs/design/subscriptions.md): ``included_minutes`` of voice per calendar
    month (UTC); a ``flat_rate`` tier's ``monthly_fee`` and the DIDs and extensions it
    includes, each further one at its monthly rate (a ``payg`` tier: no fee, every unit at its
    rate); ``max_concurrent_calls`` live calls at once, inbound and outbound (0: no limit)."""

    id: Annotated[str, Field(pattern=_ID)]
    description: str = ""
    included_minutes: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    name: Annotated[str, Field(max_length=100)] = ""
    billing_model: Literal["flat_rate", "payg"] = "flat_rate"
    monthly_fee: Annotated[Micros, Field(ge=0)] = 0
    included_dids: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    included_extensions: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    did_rate: Annotated[Micros, Field(ge=0)] = 0
    extension_rate: Annotated[Micros, Field(ge=0)] = 0
    max_concurrent_calls: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    on_sale: bool = True


class BundleSpec(_Spec):
    """An add-on bundle on sale: ``minutes`` for ``price``, usable ``validity_days`` days."""

    id: Annotated[str, Field(pattern=_ID)]
    description: str = ""
    minutes: Annotated[int, Field(ge=1, le=1_000_000)]
    price: Annotated[Micros, Field(ge=0)]
    validity_days: Annotated[int, Field(ge=1, le=3660)] = 30


class AccountSpec(_Spec):
    """An account. A managed account (``manager_id``) uses its manager's price list unless it
    has its own; a manager is never itself managed (one level)."""

    id: Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN)]
    name: str = ""
    price_list_id: str | None = None
    manager_id: str | None = None
    plan_id: str | None = None
    balance: Micros = 0
    credit_limit: Annotated[Micros, Field(ge=0)] = 0
    low_balance_threshold: Annotated[Micros, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _priced(self) -> Self:
        if self.price_list_id is None and self.manager_id is None:
            raise ValueError("an account needs a price_list_id or a manager_id to inherit from")
        if self.manager_id == self.id:
            raise ValueError("an account cannot manage itself")
        return self


class SeedFile(_Spec):
    price_lists: list[PriceListSpec] = []
    plans: list[PlanSpec] = []
    bundles: list[BundleSpec] = []
    accounts: list[AccountSpec] = []


async def put_price_list(pool: asyncpg.Pool, spec: PriceListSpec) -> None:
    """Create or replace a price list: its rates and its other prices (every version of both)
    are replaced whole, and its version bumped so running catalogs reload it. To add versions
    while keeping the history calls are re-rated with, import a CSV of rates or call
    ``add_price_version`` (``rating.pricelists``) instead."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO price_lists (id, currency, inbound_per_min, sms_per_part, description,"
            " number_monthly_fee) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE"
            " SET currency = $2, inbound_per_min = $3, sms_per_part = $4, description = $5,"
            " number_monthly_fee = $6, version = price_lists.version + 1",
            spec.id,
            spec.currency,
            spec.inbound_per_min,
            spec.sms_per_part,
            spec.description,
            spec.number_monthly_fee,
        )
        # One version in force always, like a rate without effective_from; its fees cascade.
        await conn.execute("DELETE FROM price_list_prices WHERE price_list_id = $1", spec.id)
        await write_prices(
            conn,
            spec.id,
            PriceVersion(
                0,
                VoiceRate("", spec.inbound_per_min),
                spec.sms_per_part,
                spec.number_monthly_fee,
                spec.one_time_fees,
            ),
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
                    r.effective_from,
                )
                for r in spec.outbound
            ],
            columns=RATE_COLUMNS,
        )


async def put_plan(pool: asyncpg.Pool, spec: PlanSpec) -> None:
    """Create or update a plan. A change of allowance applies from the next period (the
    current period's allowance is already in Redis)."""
    await pool.execute(
        "INSERT INTO plans (id, description, included_s, name, billing_model, monthly_fee,"
        " included_dids, included_extensions, did_rate, extension_rate, max_concurrent_calls,"
        " on_sale) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        " ON CONFLICT (id) DO UPDATE SET description = $2, included_s = $3, name = $4,"
        " billing_model = $5, monthly_fee = $6, included_dids = $7, included_extensions = $8,"
        " did_rate = $9, extension_rate = $10, max_concurrent_calls = $11, on_sale = $12",
        spec.id,
        spec.description,
        spec.included_minutes * 60,
        spec.name,
        spec.billing_model,
        spec.monthly_fee,
        spec.included_dids,
        spec.included_extensions,
        spec.did_rate,
        spec.extension_rate,
        spec.max_concurrent_calls,
        spec.on_sale,
    )


async def put_bundle(pool: asyncpg.Pool, spec: BundleSpec) -> None:
    """Create or update a bundle on sale (bundles already bought keep their terms)."""
    await pool.execute(
        "INSERT INTO bundles (id, description, seconds, price, validity_days)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET description = $2,"
        " seconds = $3, price = $4, validity_days = $5",
        spec.id,
        spec.description,
        spec.minutes * 60,
        spec.price,
        spec.validity_days,
    )


async def create_accounts(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    specs: Sequence[AccountSpec],
    *,
    clock: Clock = system_clock,
    ledger: Ledger | None = None,
) -> int:
    """Create accounts with their opening balance (idempotent: existing ones are left alone).

    Order matters for a crash: PostgreSQL first (account row + opening ledger row in one
    transaction), then Redis, which is rebuilt from the ledger if it is missing.
    Returns the number of accounts newly created. ``clock``: the account's ``created_at`` (its
    new-account top-up days count from it), the opening row's time, and the ``now`` of the
    Redis state. ``ledger``: the book of record (default: this pool's).
    """
    now = utc_datetime(clock)
    ledger = ledger or PostgresLedger(pool)
    managers = {s.manager_id for s in specs if s.manager_id is not None}
    async with pool.acquire() as conn, conn.transaction():
        created = await conn.fetch(
            "INSERT INTO accounts (id, name, price_list_id, credit_limit, low_balance_threshold,"
            " manager_id, plan_id, created_at)"
            " SELECT u.*, $8::timestamptz FROM unnest($1::text[], $2::text[], $3::text[],"
            " $4::bigint[], $5::bigint[], $6::text[], $7::text[]) AS u"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            [s.id for s in specs],
            [s.name for s in specs],
            [s.price_list_id for s in specs],
            [s.credit_limit for s in specs],
            [s.low_balance_threshold for s in specs],
            [s.manager_id for s in specs],
            [s.plan_id for s in specs],
            now,  # the injected clock's, not PostgreSQL's: new-account limits count from it
        )
        if managers:
            # One level of management: price lists are inherited from the manager only.
            nested = await conn.fetch(
                "SELECT id FROM accounts WHERE id = ANY($1::text[]) AND manager_id IS NOT NULL",
                list(managers),
            )
            if nested:
                raise ValueError(
                    f"managers cannot themselves be managed: {sorted(r['id'] for r in nested)}"
                )
        new_ids = {r["id"] for r in created}
        await ledger.record_openings(conn, {s.id: s.balance for s in specs if s.id in new_ids}, now)
    await load_into_redis(
        pool, balances, [s.id for s in specs], now=int(now.timestamp()), ledger=ledger
    )
    return len(new_ids)


async def load_into_redis(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    account_ids: Sequence[str],
    *,
    now: int | None = None,
    clock: Clock = system_clock,
    ledger: Ledger | None = None,
) -> list[str]:
    """Create the Redis state of accounts that have none, from the ledger. Returns those loaded.

    Used at account creation and when the hot path meets an account Redis does not know
    (Redis lost or flushed): balance = sum of the ledger, seq = last signal recorded, the
    minute bucket as it stands at ``now`` (unix s, default: ``clock``) from the bundles bought
    and the seconds drawn (``rating.plans.rebuild_buckets``), and the auto-recharge state:
    threshold, open trigger, a hold the service pinned, the plan's concurrent-call limit,
    payments the ledger has and Redis was not yet told of, and refunds likewise (remembered as
    applied, so finishing them credits nothing twice), and the markers of provisional charges
    no hangup has settled yet, so a late hangup settles its charge rather than paying for the
    call twice (those older than a marker's life are put back by the hangup itself,
    ``metering.calls.restore_late_markers``).
    ``ledger``: the book of record the balance and seq are read from (default: this pool's).
    """
    ledger = ledger or PostgresLedger(pool)
    rows = await pool.fetch(
        "SELECT a.id, a.credit_limit, a.low_balance_threshold, a.suspended, a.hold_reason,"
        " coalesce(p.included_s, 0) AS included_s,"
        " coalesce(p.max_concurrent_calls, 0) AS max_calls,"
        " CASE WHEN r.enabled THEN r.threshold_amount END AS recharge_threshold,"
        " (SELECT max(t.seq) FROM recharge_triggers t WHERE t.account_id = a.id"
        "  AND t.status = 'open') AS recharge_trigger,"
        " ARRAY(SELECT 'payment:' || y.id FROM payments y WHERE y.account_id = a.id"
        "  AND y.status = 'succeeded' AND y.credited_at IS NULL)"
        " || ARRAY(SELECT 'refund:' || f.id FROM refunds f WHERE f.account_id = a.id"
        "  AND f.status = 'succeeded' AND f.applied_at IS NULL) AS credited"
        " FROM accounts a LEFT JOIN plans p ON p.id = a.plan_id"
        " LEFT JOIN auto_recharge r ON r.account_id = a.id WHERE a.id = ANY($1::text[])",
        list(account_ids),
    )
    # One reading of the clock for the bucket and the status: read twice, a rebuild across a
    # month's end could replay the bucket for one period and judge the status in the next.
    at = int(clock()) if now is None else now
    ids = [r["id"] for r in rows]
    sums = await ledger.balances(ids)
    seqs = await ledger.last_seq(ids)
    buckets = await rebuild_buckets(pool, {r["id"]: r["included_s"] for r in rows}, now=at)
    states: list[NewAccount] = []
    for r in rows:
        bal = sums.get(r["id"], 0)
        avail = bal + r["credit_limit"]
        # as the scripts' state machine: money exhausted with minutes left is low, not hold
        secs = sum(
            g.remaining_s
            for g in parse_bucket(buckets.get(r["id"]))
            if g.valid_from <= at < g.expires_at
        )
        status: AccountStatus
        if r["suspended"]:
            status = "suspended"
        elif (avail <= 0 and secs <= 0) or r["hold_reason"]:
            status = "hold"
        elif avail <= r["low_balance_threshold"]:
            status = "low"
        else:
            status = "active"
        states.append(
            NewAccount(
                r["id"],
                balance=bal,
                credit_limit=r["credit_limit"],
                low_threshold=r["low_balance_threshold"],
                status=status,
                seq=seqs.get(r["id"], 0),
                bucket=buckets.get(r["id"], ""),
                recharge_threshold=r["recharge_threshold"],
                recharge_trigger=r["recharge_trigger"],
                hold_reason=r["hold_reason"],
                credited=tuple(r["credited"]),
                max_calls=r["max_calls"],
            )
        )
    below = {
        a.account_id
        for a in states
        if a.recharge_threshold is not None
        and a.recharge_trigger is None
        and a.balance + a.credit_limit <= a.recharge_threshold
    }
    if below:
        latched = await _refund_latched(pool, below)
        states = [replace(a, recharge_trigger=0) if a.account_id in latched else a for a in states]
    # Many accounts per round trip (a rebuild after a flush loads thousands at a time; one
    # script call awaited per account was nine tenths of its time), in bounded pipelines.
    loaded = []
    for start in range(0, len(states), _LOAD_PER_ROUND_TRIP):
        part = states[start : start + _LOAD_PER_ROUND_TRIP]
        written = await balances.create_accounts(part)
        loaded += [a.account_id for a, w in zip(part, written, strict=True) if w]
    if loaded:
        since = datetime.fromtimestamp(at - keys.PROVISIONAL_KEEP_S, UTC)
        unsettled = await ledger.unsettled_since(loaded, since)
        await balances.restore_provisional(unsettled, now_s=at)
    return loaded


async def _refund_latched(pool: asyncpg.Pool, account_ids: set[str]) -> set[str]:
    """Of accounts at or below their auto-recharge threshold with no trigger open, those whose
    crossing a refund to the card took as handled (credit.lua's "rq" = 0, lost with Redis):
    their last card refund's ledger row was written after auto-recharge was last set, and no
    trigger was recorded or moved since (one still open at the refund, which a refund leaves
    as it is, is then closed after it, and its closing re-arms the next crossing). Every time
    compared is PostgreSQL's own ``now()`` (the row's ``recorded_at``, the settings' and the
    trigger's ``updated_at``).

    A crossing after the refund that a refund did not cause went through a trigger (the
    refund left the credit above the threshold, usage then took it below: ``debit.lua`` fired
    one, recorded by the recharge worker), so it is not taken for the refund's. Money in since
    the refund that lifted the credit above the threshold re-armed the trigger; an account
    below it now has crossed again since, through a trigger too."""
    refunds = await pool.fetch(
        "SELECT account_id, id FROM refunds WHERE account_id = ANY($1::text[])"
        " AND kind = 'card' AND status = 'succeeded'",
        sorted(account_ids),
    )
    if not refunds:
        return set()
    rows = await pool.fetch(
        "SELECT f.account_id FROM ("
        "  SELECT l.account_id, max(l.recorded_at) AS at FROM ledger l"
        "  WHERE l.event_key = ANY($1::bytea[]) GROUP BY l.account_id) f"
        " JOIN auto_recharge r ON r.account_id = f.account_id AND r.enabled"
        "  AND r.updated_at < f.at"
        " WHERE NOT EXISTS (SELECT 1 FROM recharge_triggers t"
        "  WHERE t.account_id = f.account_id AND t.updated_at >= f.at)",
        [credit_key(r["account_id"], "refund:" + r["id"]) for r in refunds],
    )
    return {r["account_id"] for r in rows}


async def rebuild_redis(
    pool: asyncpg.Pool,
    balances: BalanceStore,
    *,
    chunk: int = 5_000,
    in_flight: int = 2,
    now: int | None = None,
    clock: Clock = system_clock,
) -> int:
    """Create the Redis state of every account that has none, from the ledger
    (``load_into_redis`` over all accounts, ``chunk`` at a time, in id order): after a
    ``FLUSHALL``, a restore or a failover to an empty replica, instead of waiting for each
    account's next event. Accounts Redis has are left alone, so it is safe on a live service
    and to run again. Returns the number of accounts loaded.

    ``in_flight`` chunks at once, so one chunk's PostgreSQL reads overlap another's Redis
    round trips; one reading of the clock (``now``, unix s) for them all, as in
    ``load_into_redis``."""
    at = int(clock()) if now is None else now
    ledger = PostgresLedger(pool)
    loaded = 0
    running: set[asyncio.Task[list[str]]] = set()
    after = ""
    try:
        while True:
            ids = [
                r["id"]
                for r in await pool.fetch(
                    "SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2", after, chunk
                )
            ]
            if ids:
                after = ids[-1]
                running.add(
                    asyncio.create_task(load_into_redis(pool, balances, ids, now=at, ledger=ledger))
                )
            if not running:
                break
            if len(running) >= in_flight or not ids:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                loaded += sum(len(t.result()) for t in done)  # a failed chunk raises here
    finally:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return loaded
