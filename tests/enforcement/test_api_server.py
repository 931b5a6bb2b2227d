"""The API over real HTTP on loopback: uvicorn in this process under concurrent load, the
``meter keys`` and ``meter run api`` commands as subprocesses, and the benchmark's load
generator against it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from asyncio.subprocess import DEVNULL, PIPE
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from infra.settings import Settings
from meter.apiserver import asgi_app, server_for
from meter.bench_authorize import AuthorizationRequests
from meter.loadgen import run_step
from rating.rating import VoiceRate, voice_cost
from tests.api import UK_MOBILE, Api, grants_bought


@contextlib.asynccontextmanager
async def serving(api: Api) -> AsyncIterator[int]:
    """``api``'s app under a real uvicorn on a free loopback port, in this event loop."""
    server = server_for(asgi_app(api.settings, api.svc), "127.0.0.1", 0)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield server.port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def raw_authorization(port: int, key: str, call_id: str, to: str) -> bytes:
    body = orjson.dumps(
        {
            "account_id": "acc_1",
            "call_id": call_id,
            "direction": "outbound",
            "from": "+14155550100",
            "to": to,
        }
    )
    return (
        f"POST /v1/authorizations HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_a_thousand_concurrent_authorizations_over_http(api: Api) -> None:
    await api.seed("acc_1", balance="0.50")
    _, key = await api.svc.keys.create("acc_1", "service")
    async with serving(api) as port:
        requests = [raw_authorization(port, key, f"c{i}", UK_MOBILE) for i in range(1000)]
        # 64 keep-alive connections, each sending its next request as soon as it has an answer.
        r = await run_step("127.0.0.1", port, requests, 1e9, connections=64, marker=b'"allow"')
        # And a plain HTTP client, after them: everything is spoken for.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            late = await client.post(
                "/v1/authorizations",
                content=raw_authorization(port, key, "late", UK_MOBILE).split(b"\r\n\r\n")[1],
                headers={"Authorization": f"Bearer {key}"},
            )
    assert (r.ok, r.errors, r.unanswered) == (1000, 0, 0)
    assert late.status_code == 200
    assert late.json()["reason"] == "insufficient_credit"
    rate = VoiceRate("447", 35_000, 5_000, 60, 6)
    expected = grants_bought(500_000, rate, api.settings.authorize_grant_s)
    assert expected == [300, 300, 228]  # 0.18 + 0.18 + 0.138 of 0.50
    assert r.marked == len(expected)
    held = await api.svc.balances.reservations("acc_1")
    assert sum(held.values()) == sum(voice_cost(d, rate)[0] for d in expected) <= 500_000


async def test_the_load_generator_measures_a_real_server(api: Api) -> None:
    await api.seed("acc_1", "acc_2", balance="1000.00")
    _, key = await api.svc.keys.create("acc_1", "service")
    async with serving(api) as port:
        reqs = AuthorizationRequests(port, key, ["acc_1", "acc_2"])
        r = await run_step("127.0.0.1", port, reqs.make(200), 400, marker=b'"allow"')
    assert (r.scheduled, r.ok, r.errors, r.unanswered) == (200, 200, 0, 0)
    assert 150 <= r.marked < 200  # one destination in twelve has no rate
    assert 0 < r.percentile(0.5) <= r.percentile(0.99) <= r.latencies[-1] < 5
    assert r.elapsed_s >= 199 / 400  # open loop: the schedule, not the server, sets the pace


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    return env | {
        "METER_REDIS_URL": settings.redis_url,
        "METER_DATABASE_URL": settings.database_url,
        "METER_DATA_DIR": str(settings.data_dir),
        **extra,
    }


@pytest.mark.slow
async def test_meter_keys_create_and_meter_run_api(api: Api) -> None:
    await api.seed("acc_1", balance="5.00")
    cli = [sys.executable, "-m", "meter.cli"]
    made = await asyncio.create_subprocess_exec(
        *cli, "keys", "create", "--account", "acc_1", "--role", "user",
        env=_env(api.settings), stdout=PIPE, stderr=PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(made.communicate(), 60)
    assert made.returncode == 0, err
    key = out.decode().strip()
    assert key.startswith("mk_") and b"shown once" in err
    rows = await api.svc.pool.fetch("SELECT * FROM api_keys WHERE account_id = 'acc_1'")
    assert [r["role"] for r in rows] == ["user"]
    assert key not in str([dict(r) for r in rows])  # only its hash is stored

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(api.settings, METER_API_PORT=str(port), METER_LOG_LEVEL="WARNING")
    proc = await asyncio.create_subprocess_exec(
        *cli, "run", "api", env=env, stdout=DEVNULL, stderr=PIPE
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    r = await client.get(
                        "/v1/accounts/acc_1/balance", headers={"Authorization": f"Bearer {key}"}
                    )
                    break
                except httpx.TransportError:
                    assert proc.returncode is None, "meter run api exited"
                    assert time.monotonic() < deadline, "meter run api did not start"
                    await asyncio.sleep(0.1)
        assert r.status_code == 200 and r.json()["balance"] == "5.00"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
