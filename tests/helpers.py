"""Shared test helpers: producing events, a record type for direct processor calls."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from contracts import topics
from infra import embedded
from infra.db import migrations
from meter.traffic import demo_price_list
from rating.rating import voice_cost


@dataclass(frozen=True)
class Rec:
    """Stands in for aiokafka's ConsumerRecord in direct ``MeteringProcessor`` calls."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def call_record(ev: dict[str, object], offset: int) -> Rec:
    """``ev`` as the metering consumer reads it from the call-events topic at ``offset``
    (partition 0, keyed by its subject)."""
    return Rec(topics.CALL_EVENTS, 0, offset, str(ev["subject"]).encode(), orjson.dumps(ev))


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    events: list[dict[str, Any] | bytes],
    key: bytes | None = None,
) -> None:
    futures = []
    for ev in events:
        value = ev if isinstance(ev, bytes) else orjson.dumps(ev)
        k = key if key is not None or isinstance(ev, bytes) else ev["subject"].encode()
        futures.append(await producer.send(topic, value, k))
    await asyncio.gather(*futures)


def expected_cost(event: dict[str, Any]) -> int:
    """Price an event with the demo price list, independently of the processor."""
    from rating.rating import PriceList, VoiceRate

    spec = demo_price_list()
    pl = PriceList(spec.id, spec.currency, VoiceRate("", spec.inbound_per_min), spec.sms_per_part)
    for r in spec.outbound:
        pl.add_outbound(
            VoiceRate(r.prefix, r.rate_per_min, r.connect_fee, r.initial_s, r.subsequent_s)
        )
    d = event["data"]
    if event["type"] == "message.sent":
        return int(pl.sms_per_part * d["parts"])
    rate = pl.inbound if d["direction"] == "inbound" else pl.outbound_rate(d["to"])
    return voice_cost(d["billable_s"], rate)[0]


def require_binary(name: str) -> str:
    """The path of ``name``; under CI a missing binary fails the test, elsewhere it skips it.

    ``./run test`` installs promtool and prometheus (Debian's ``prometheus`` package), so in CI a
    missing one is a broken install, never a reason to pass quietly.
    """
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (./run test installs Debian's prometheus package)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class OldDatabase:
    conn: asyncpg.Connection
    dsn: str


@contextlib.asynccontextmanager
async def database_before(admin_dsn: str, version: int) -> AsyncIterator[OldDatabase]:
    """A database of its own with every migration before ``version`` applied and recorded, as
    on a server that has not seen ``version`` yet (a migration's own test sets its rows up
    there, then migrates), and a connection to it; both gone at the end."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    dsn = await embedded.create_database(admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for v, mname, sql in migrations():
                if v < version:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", v, mname
                    )
            yield OldDatabase(conn, dsn)
        finally:
            await conn.close()
    finally:
        await embedded.drop_database(admin_dsn, name)


async def run_meter(
    redis_url: str, database_url: str, *args: str, stdin: bytes = b"", timeout_s: float = 60
) -> tuple[int, str, str]:
    """``python -m meter.cli ARGS`` in a process of its own, on these Redis and PostgreSQL (no
    other ``METER_*`` of the environment): its exit code, stdout and stderr."""
    import os
    import sys
    from asyncio.subprocess import PIPE

    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")} | {
        "METER_REDIS_URL": redis_url,
        "METER_DATABASE_URL": database_url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meter.cli", *args, env=env, stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
