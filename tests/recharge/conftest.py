"""The ``api`` fixture (tests/api.py), and what the payment tests stand on: the balance store on
the session's Redis, a pool on the test's own database, and the ``World`` of both."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from balance.accounts import put_price_list
from balance.store import RedisBalances
from infra.db import create_pool
from infra.redisclient import redis_client
from infra.settings import Settings
from meter.traffic import demo_price_list
from recharge.sandbox import SandboxGateway
from tests.api import api
from tests.recharge.world import Clock, Collected, World

__all__ = ["api", "balances", "pool", "world"]


@pytest.fixture
async def balances(redis_url: str) -> AsyncIterator[RedisBalances]:
    # The service's own factory: one node, or the cluster of tests/cluster.
    r = redis_client(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    yield RedisBalances(r)
    await r.aclose()


@pytest.fixture
async def pool(db_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_settings.database_url)
    yield p
    await p.close()


@pytest.fixture
async def world(pool: asyncpg.Pool, balances: RedisBalances) -> World:
    await put_price_list(pool, demo_price_list())
    return World(pool, balances, SandboxGateway(), Collected(), Clock(datetime.now(UTC)))
