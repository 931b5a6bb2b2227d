"""Real services for the tests: the project's own redis-server and PostgreSQL (one per session,
so the machine's shared instances are never touched) and a fresh in-memory Tansu broker per
test (0.2 s to start), so the contract's fixed topic names never leak between tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from balance.accounts import AccountSpec, create_accounts, put_price_list
from contracts import topics
from infra import embedded
from infra.db import migrate
from infra.settings import Settings
from meter.traffic import demo_price_list
from metering.worker import Connections, connect


@dataclass(frozen=True)
class Services:
    redis_url: str
    admin_dsn: str


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("services")
    r = embedded.start_redis(root)
    pg = embedded.start_postgres(root)
    try:
        yield Services(r.url, pg.url)
    finally:
        r.stop()
        pg.stop()


@pytest.fixture(scope="session")
async def template_dsn(services: Services) -> str:
    dsn = await embedded.create_database(services.admin_dsn, "meter_template")
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def database_url(services: Services, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database per test (a copy of the template: ~50 ms)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE meter_template')
    finally:
        await admin.close()
    yield template_dsn.replace("/meter_template", f"/{name}")
    await embedded.drop_database(services.admin_dsn, name)


@pytest.fixture
async def redis_url(services: Services) -> AsyncIterator[str]:
    """The session's own redis-server, emptied before each test (it holds nothing else)."""
    r = aioredis.Redis.from_url(services.redis_url)
    await r.flushall()
    await r.aclose()
    yield services.redis_url


@pytest.fixture
async def kafka(tmp_path: Path) -> AsyncIterator[str]:
    handle = await asyncio.to_thread(embedded.start_kafka, tmp_path)
    try:
        await embedded.create_topics(handle.bootstrap, {t: 4 for t in topics.ALL})
        yield handle.bootstrap
    finally:
        await asyncio.to_thread(handle.stop)


@pytest.fixture
def settings(kafka: str, redis_url: str, database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap=kafka,
        redis_url=redis_url,
        database_url=database_url,
        data_dir=tmp_path,
        partitions=4,
        batch_timeout_ms=20,
        kafka_session_timeout_ms=2_000,
        consumer_group=f"meter-test-{uuid.uuid4().hex[:6]}",
    )


@pytest.fixture
def db_settings(redis_url: str, database_url: str, tmp_path: Path) -> Settings:
    """Settings for tests that need Redis and PostgreSQL but no broker."""
    return Settings(redis_url=redis_url, database_url=database_url, data_dir=tmp_path)


@pytest.fixture
async def conns(settings: Settings) -> AsyncIterator[Connections]:
    async with connect(settings) as c:
        yield c


Seeder = Callable[..., Awaitable[list[AccountSpec]]]


@pytest.fixture
def seed(conns: Connections) -> Seeder:
    async def _seed(
        *ids: str, balance: str = "100.00", low: str = "0", credit_limit: str = "0"
    ) -> list[AccountSpec]:
        await put_price_list(conns.pool, demo_price_list())
        specs = [
            AccountSpec.model_validate(
                {
                    "id": i,
                    "price_list_id": "standard",
                    "balance": balance,
                    "low_balance_threshold": low,
                    "credit_limit": credit_limit,
                }
            )
            for i in ids
        ]
        await create_accounts(conns.pool, conns.balances, specs)
        return specs

    return _seed


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 30.0, interval: float = 0.05
) -> None:
    """Wait until ``check()`` is true; fail with a clear message after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


def with_group(s: Settings, group: str) -> Settings:
    return replace(s, consumer_group=group)
