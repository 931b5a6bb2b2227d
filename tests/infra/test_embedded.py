"""Tests for infra.embedded: each service really starts, answers, and is gone after stop(),
even when it died first or its parent exits or is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from infra.embedded import (
    create_database,
    create_topics,
    drop_database,
    start_kafka,
    start_postgres,
    start_redis,
)
from infra.embedded.postgres import dsn_for_database
from tests.infra.embedded_probes import (
    assert_tcp_service_gone,
    kafka_roundtrip,
    pid_gone,
    redis_roundtrip,
    select_one,
    wait_pid_gone,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        await kafka_roundtrip(handle.bootstrap)
    finally:
        await asyncio.to_thread(handle.stop)
    assert_tcp_service_gone(handle)
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
        await redis_roundtrip(handle.url)
    finally:
        await asyncio.to_thread(handle.stop)
    assert_tcp_service_gone(handle)
    handle.stop()


@pytest.mark.timeout(120)
def test_stop_tolerates_a_process_that_already_died(tmp_path: Path) -> None:
    handle = start_redis(tmp_path)
    os.kill(handle.pid, signal.SIGKILL)
    assert wait_pid_gone(handle.pid)
    handle.stop()
    handle.stop()
    assert_tcp_service_gone(handle)


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
        assert await select_one(handle.url) == 1
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
    assert pid_gone(handle.pid)
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
        assert asyncio.run(select_one(kept)) == 1
    finally:
        second.stop()
    assert pid_gone(second.pid)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_postgres_restarts_after_postmaster_was_killed(tmp_path: Path) -> None:
    first = start_postgres(tmp_path)
    os.kill(first.pid, signal.SIGKILL)  # leaves postmaster.pid and socket lock behind
    assert wait_pid_gone(first.pid)
    first.stop()  # already dead: must not raise
    second = start_postgres(tmp_path)
    try:
        assert second.pid != first.pid
        assert asyncio.run(select_one(second.url)) == 1
    finally:
        second.stop()


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
    assert wait_pid_gone(pid), "redis-server outlived its parent's normal exit"


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
    assert wait_pid_gone(pid), "redis-server outlived its hard-killed parent"
