"""Tests for infra.stack: the stack embeds exactly what is not configured, starts and stops
them together, and stops what already started when one fails."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from infra import embedded
from infra.embedded import KafkaHandle, PostgresHandle, RedisHandle, start_redis
from infra.settings import Settings
from infra.stack import EmbeddedStack, running_stack
from tests.infra.embedded_probes import (
    assert_tcp_service_gone,
    kafka_roundtrip,
    pid_gone,
    redis_roundtrip,
    select_one,
    wait_pid_gone,
)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stack_context_manager_starts_and_stops_everything(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path)
    started = time.monotonic()
    with stack as endpoints:
        print(f"stack ready in {time.monotonic() - started:.2f}s")
        assert endpoints.kafka_bootstrap and endpoints.redis_url and endpoints.database_url
        assert stack.start() is endpoints  # already started: same endpoints
        kafka, redis_handle, postgres = stack.kafka, stack.redis, stack.postgres
        assert kafka and redis_handle and postgres

        async def check() -> None:
            await kafka_roundtrip(endpoints.kafka_bootstrap or "")
            await redis_roundtrip(endpoints.redis_url or "")
            assert await select_one(endpoints.database_url or "") == 1

        asyncio.run(check())
    assert_tcp_service_gone(kafka)
    assert_tcp_service_gone(redis_handle)
    assert pid_gone(postgres.pid)
    stack.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = stack.endpoints


@pytest.mark.timeout(120)
def test_stack_starts_only_what_is_asked(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path, kafka=False, postgres=False)
    endpoints = stack.start()
    try:
        assert endpoints.kafka_bootstrap is None and endpoints.database_url is None
        assert endpoints.redis_url is not None
        asyncio.run(redis_roundtrip(endpoints.redis_url))
        redis_handle = stack.redis
        assert redis_handle is not None
    finally:
        stack.stop()
    assert_tcp_service_gone(redis_handle)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stack_failure_stops_what_already_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[KafkaHandle | PostgresHandle] = []
    real_kafka, real_postgres = embedded.start_kafka, embedded.start_postgres

    def kafka(root: Path) -> KafkaHandle:
        started.append(handle := real_kafka(root))
        return handle

    def postgres(root: Path) -> PostgresHandle:
        started.append(handle := real_postgres(root))
        return handle

    def broken_redis(root: Path) -> RedisHandle:
        raise RuntimeError("redis refused to start")

    monkeypatch.setattr(embedded, "start_kafka", kafka)
    monkeypatch.setattr(embedded, "start_postgres", postgres)
    monkeypatch.setattr(embedded, "start_redis", broken_redis)
    stack = EmbeddedStack(tmp_path)
    with pytest.raises(RuntimeError, match="redis refused"):
        stack.start()
    assert len(started) == 2
    for handle in started:
        assert wait_pid_gone(handle.pid, 1.0), handle


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_running_stack_keeps_configured_endpoints_and_embeds_the_rest(
    tmp_path: Path,
) -> None:
    configured = await asyncio.to_thread(start_redis, tmp_path / "configured")
    root = tmp_path / "embedded"
    try:
        settings = Settings(redis_url=configured.url, data_dir=tmp_path)
        async with running_stack(settings, root, kafka_needed=False) as resolved:
            assert resolved.redis_url == configured.url
            assert resolved.kafka_bootstrap == ""  # not needed: no broker started
            assert resolved.database_url.startswith("postgresql://")
            conn = await asyncpg.connect(resolved.database_url)
            try:  # migrated
                assert await conn.fetchval("select count(*) from schema_migrations") > 0
            finally:
                await conn.close()
            assert sorted(p.name for p in root.iterdir()) == ["postgres"]
        with pytest.raises(OSError):
            await asyncpg.connect(resolved.database_url, timeout=5)
        assert configured.is_running()  # configured services are not the stack's to stop
    finally:
        await asyncio.to_thread(configured.stop)
