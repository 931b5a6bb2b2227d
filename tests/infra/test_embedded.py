"""Tests for infra.embedded and infra.stack: each service really starts, answers, and is gone
after stop(); the stack embeds exactly what is not configured."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped, unused-ignore]

from infra import embedded
from infra.embedded import (
    KafkaHandle,
    PostgresHandle,
    RedisHandle,
    create_database,
    create_topics,
    drop_database,
    start_kafka,
    start_postgres,
    start_redis,
)
from infra.embedded.postgres import dsn_for_database
from infra.settings import Settings
from infra.stack import EmbeddedStack, running_stack

REPO_ROOT = Path(__file__).resolve().parents[2]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer exists or is a zombie (PID 1 here may not reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _wait_pid_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _assert_tcp_service_gone(handle: KafkaHandle | RedisHandle) -> None:
    assert not handle.is_running()
    assert _pid_gone(handle.pid)
    assert not _port_open(handle.port)


async def _kafka_roundtrip(bootstrap: str) -> None:
    topic = f"embedded-{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, {topic: 2})
    await create_topics(bootstrap, {topic: 2})  # already exists: must not raise
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), timeout=20)
    finally:
        await consumer.stop()
    assert (message.key, message.value) == (b"k1", b"hello")


async def _redis_roundtrip(url: str) -> None:
    client = aioredis.from_url(url)
    try:
        await client.set("embedded:key", "value")
        assert await client.get("embedded:key") == b"value"
    finally:
        await client.aclose()


async def _select_one(dsn: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("select 1")
    finally:
        await conn.close()


@pytest.mark.kafka
@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_kafka_starts_serves_and_stops(tmp_path: Path) -> None:
    started = time.monotonic()
    handle = await asyncio.to_thread(start_kafka, tmp_path)
    try:
        print(f"kafka ready in {time.monotonic() - started:.2f}s")
        assert handle.bootstrap == f"127.0.0.1:{handle.port}"
        assert handle.is_running()
        await _kafka_roundtrip(handle.bootstrap)
    finally:
        await asyncio.to_thread(handle.stop)
    _assert_tcp_service_gone(handle)
    handle.stop()  # idempotent
    assert handle.log_path.is_file()


class _FakeAdmin:
    """Stands in for AIOKafkaAdminClient: Tansu accepts any partition count, so
    broker-side errors cannot be provoked for real."""

    closed = False

    def __init__(self, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        _FakeAdmin.closed = True

    async def create_topics(self, new_topics: list[Any]) -> Any:
        codes = {"ok": 0, "exists": 36, "bad": 37}
        errors = [(t.name, codes[t.name], "boom" if t.name == "bad" else None) for t in new_topics]
        return SimpleNamespace(topic_errors=errors)


@pytest.mark.asyncio
async def test_create_topics_ignores_existing_and_raises_on_other_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiokafka.admin  # type: ignore[import-untyped, unused-ignore]
    from aiokafka.errors import InvalidPartitionsError  # type: ignore[import-untyped, unused-ignore]

    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _FakeAdmin)
    await create_topics("127.0.0.1:1", {"ok": 1, "exists": 1})
    with pytest.raises(InvalidPartitionsError, match="bad: error 37 boom"):
        await create_topics("127.0.0.1:1", {"ok": 1, "bad": 1})
    assert _FakeAdmin.closed


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_redis_starts_serves_and_stops(tmp_path: Path) -> None:
    handle = await asyncio.to_thread(start_redis, tmp_path)
    try:
        assert handle.url == f"redis://127.0.0.1:{handle.port}/0"
        await _redis_roundtrip(handle.url)
    finally:
        await asyncio.to_thread(handle.stop)
    _assert_tcp_service_gone(handle)
    handle.stop()


@pytest.mark.timeout(120)
def test_stop_tolerates_a_process_that_already_died(tmp_path: Path) -> None:
    handle = start_redis(tmp_path)
    os.kill(handle.pid, signal.SIGKILL)
    assert _wait_pid_gone(handle.pid)
    handle.stop()
    handle.stop()
    _assert_tcp_service_gone(handle)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", [start_kafka, start_redis], ids=["kafka", "redis"])
def test_port_in_use_fails_with_log_tail(tmp_path: Path, start: Any) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"(?s)exited with code.*last lines of.*in use"):
            start(tmp_path, port=port, timeout=20)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_postgres_starts_serves_and_stops(tmp_path: Path) -> None:
    handle = await asyncio.to_thread(start_postgres, tmp_path)
    try:
        assert handle.url.startswith("postgresql://")
        assert await _select_one(handle.url) == 1
        with pytest.raises(RuntimeError, match="already running"):
            start_postgres(tmp_path)

        dsn = await create_database(handle.url, "meter_embedded_test")
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("select current_database()") == "meter_embedded_test"
            await conn.execute("create table t (x int)")
            # Re-creating drops the old database even while we are connected to it.
            dsn_again = await create_database(handle.url, "meter_embedded_test")
        finally:
            await conn.close()
        assert dsn_again == dsn
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("select to_regclass('t')") is None
        finally:
            await conn.close()

        await drop_database(handle.url, "meter_embedded_test")
        await drop_database(handle.url, "meter_embedded_test")  # absent: no error
        admin = await asyncpg.connect(handle.url)
        try:
            names = {r["datname"] for r in await admin.fetch("select datname from pg_database")}
        finally:
            await admin.close()
        assert "meter_embedded_test" not in names
    finally:
        await asyncio.to_thread(handle.stop)
    assert not handle.is_running()
    assert _pid_gone(handle.pid)
    assert not (handle.pgdata / "postmaster.pid").exists()
    with pytest.raises(OSError):
        await asyncpg.connect(handle.url, timeout=5)
    handle.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_postgres_restarts_on_same_root_and_keeps_data(tmp_path: Path) -> None:
    first = start_postgres(tmp_path)
    try:
        asyncio.run(create_database(first.url, "kept"))
    finally:
        first.stop()
    second = start_postgres(tmp_path)
    try:
        assert second.pid != first.pid
        kept = dsn_for_database(second.url, "kept")
        assert asyncio.run(_select_one(kept)) == 1
    finally:
        second.stop()
    assert _pid_gone(second.pid)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_postgres_restarts_after_postmaster_was_killed(tmp_path: Path) -> None:
    first = start_postgres(tmp_path)
    os.kill(first.pid, signal.SIGKILL)  # leaves postmaster.pid and socket lock behind
    assert _wait_pid_gone(first.pid)
    first.stop()  # already dead: must not raise
    second = start_postgres(tmp_path)
    try:
        assert second.pid != first.pid
        assert asyncio.run(_select_one(second.url)) == 1
    finally:
        second.stop()


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
            await _kafka_roundtrip(endpoints.kafka_bootstrap or "")
            await _redis_roundtrip(endpoints.redis_url or "")
            assert await _select_one(endpoints.database_url or "") == 1

        asyncio.run(check())
    _assert_tcp_service_gone(kafka)
    _assert_tcp_service_gone(redis_handle)
    assert _pid_gone(postgres.pid)
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
        asyncio.run(_redis_roundtrip(endpoints.redis_url))
        redis_handle = stack.redis
        assert redis_handle is not None
    finally:
        stack.stop()
    _assert_tcp_service_gone(redis_handle)


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
        assert _wait_pid_gone(handle.pid, 1.0), handle


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


def _run_child(tmp_path: Path, body: str) -> int:
    """Run ``body`` in a fresh interpreter that prints the pid of what it started."""
    script = "import os, sys\nfrom pathlib import Path\nfrom infra.embedded import *\n"
    script += textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.strip(), out.stderr
    return int(out.stdout.split()[0])


@pytest.mark.timeout(120)
def test_atexit_stops_servers_left_running(tmp_path: Path) -> None:
    pid = _run_child(
        tmp_path,
        """
        h = start_redis(Path(sys.argv[1]))
        print(h.pid, flush=True)
        """,
    )
    assert _wait_pid_gone(pid), "redis-server outlived its parent's normal exit"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
@pytest.mark.timeout(120)
def test_servers_die_with_a_hard_killed_parent(tmp_path: Path) -> None:
    pid = _run_child(
        tmp_path,
        """
        h = start_redis(Path(sys.argv[1]))
        print(h.pid, flush=True)
        os._exit(0)  # no atexit, no stop(): only the parent-death signal can help
        """,
    )
    assert _wait_pid_gone(pid), "redis-server outlived its hard-killed parent"
