"""Probes for the embedded servers: is a port open, is a pid gone, a round trip through each
service. Shared by the tests of infra.embedded and of infra.stack."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped, unused-ignore]

from infra.embedded import KafkaHandle, RedisHandle, create_topics


def port_open(port: int) -> bool:
    """True if something accepts TCP connections on ``port`` of 127.0.0.1."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def pid_gone(pid: int) -> bool:
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


def wait_pid_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to be gone; False if it outlived the wait."""
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_tcp_service_gone(handle: KafkaHandle | RedisHandle) -> None:
    """``handle`` is stopped: not running, its pid gone, its port closed."""
    assert not handle.is_running()
    assert pid_gone(handle.pid)
    assert not port_open(handle.port)


async def kafka_roundtrip(bootstrap: str) -> None:
    """A message produced and read back through a new two-partition topic (created twice:
    the second time must not raise)."""
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


async def redis_roundtrip(url: str) -> None:
    """A key set and read back."""
    client = aioredis.from_url(url)
    try:
        await client.set("embedded:key", "value")
        assert await client.get("embedded:key") == b"value"
    finally:
        await client.aclose()


async def select_one(dsn: str) -> Any:
    """``select 1`` on a new connection to ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("select 1")
    finally:
        await conn.close()
