"""Authorizations when a store lets the API down, against the real Redis and PostgreSQL through
the ASGI app ``meter run api`` serves: a Redis that lost an account (every concurrent request
waits for one rebuild), and a PostgreSQL that stalls (every answer by the deadline, with the
code of the store that was waited for; what is cached keeps being allowed)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
from prometheus_client import REGISTRY

from balance import keys
from infra.settings import Settings
from rating.rating import VoiceRate, voice_cost
from tests.api import Api, api_on, assert_error, grants_bought

DEADLINE_S = 0.5
#: What "within the deadline" tolerates on a loaded CI machine: an answer, not a hang.
SLACK_S = 1.0


def rebuilt_total() -> float:
    return REGISTRY.get_sample_value("meter_accounts_rebuilt_total") or 0.0


def count_rebuilds(api: Api, *, delay_s: float = 0.0) -> list[Sequence[str]]:
    """Wrap the API's rebuild function; returns the list of its calls. ``delay_s`` slows each
    rebuild down, so that every concurrent request certainly meets the loss before it ends."""
    calls: list[Sequence[str]] = []
    auth = api.svc.authorizer
    original = auth._rebuild
    assert original is not None

    async def counted(ids: Sequence[str]) -> list[str]:
        calls.append(list(ids))
        await asyncio.sleep(delay_s)
        return await original(ids)

    auth._rebuild = counted
    return calls


async def timed(work: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    t = time.monotonic()
    r = await work
    return r, time.monotonic() - t


async def test_two_hundred_concurrent_authorizations_for_an_account_redis_lost_share_one_rebuild(
    api: Api,
) -> None:
    await api.seed("acc_1", balance="1.00")
    service = await api.key("acc_1", "service")
    await api.svc.balances._r.flushall()  # a Redis that lost everything (the test's own)
    calls = count_rebuilds(api, delay_s=0.05)
    before = rebuilt_total()

    answers = await asyncio.gather(*(api.authorize(service, call_id=f"c{i}") for i in range(200)))

    assert {r.status_code for r in answers} == {200}, {r.text for r in answers}
    bodies = [r.json() for r in answers]
    assert {b["reason"] for b in bodies} == {"ok", "insufficient_credit"}
    assert calls == [["acc_1"]]
    assert rebuilt_total() - before == 1
    # ...and the rebuilt account is held to its credit as any other.
    rate = VoiceRate("44", 15_000)
    expected = grants_bought(1_000_000, rate, api.settings.authorize_grant_s)
    allowed = [b for b in bodies if b["decision"] == "allow"]
    held = await api.svc.balances.reservations("acc_1")
    assert len(allowed) == len(held) == len(expected)
    assert sum(held.values()) == sum(voice_cost(d, rate)[0] for d in expected) <= 1_000_000
    state = await api.svc.balances.get("acc_1")
    assert state is not None and state.balance == 1_000_000
    assert state.reserved == sum(held.values())


async def test_balance_requests_and_authorizations_share_the_rebuild_of_a_lost_account(
    api: Api,
) -> None:
    await api.seed("acc_1", balance="10.00")
    service = await api.key("acc_1", "service")
    r = await api.authorize(service, call_id="warm")  # prices and plan cached in the process
    assert r.json()["decision"] == "allow"
    await api.svc.balances._r.flushall()
    calls = count_rebuilds(api, delay_s=0.05)
    answers = await asyncio.gather(
        *(api.client.get("/v1/accounts/acc_1/balance", headers=service) for _ in range(20)),
        *(api.authorize(service, call_id=f"c{i}") for i in range(20)),
    )
    assert {r.status_code for r in answers} == {200}, {r.text for r in answers}
    assert {r.json()["balance"] for r in answers[:20]} == {"10.00"}
    assert {r.json()["reason"] for r in answers[20:]} == {"ok"}
    assert calls == [["acc_1"]]


async def test_an_account_lost_again_after_its_rebuild_is_rebuilt_again(api: Api) -> None:
    await api.seed("acc_1", balance="1.00")
    service = await api.key("acc_1", "service")
    calls = count_rebuilds(api)
    for i in range(2):
        await api.svc.balances._r.delete(keys.account("acc_1"))
        r = await api.authorize(service, call_id=f"after-loss-{i}")
        assert r.status_code == 200 and r.json()["decision"] == "allow", r.text
    assert calls == [["acc_1"], ["acc_1"]]


@contextlib.asynccontextmanager
async def accounts_locked(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """PostgreSQL stalled for every query that reads ``accounts`` (the catalog's account lookup,
    the rebuild from the ledger): another session holds the table's strongest lock."""
    conn = await asyncpg.connect(database_url)
    try:
        tr = conn.transaction()
        await tr.start()
        await conn.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            await tr.rollback()
    finally:
        await conn.close()


async def waiting_on_locks(conn: asyncpg.Connection) -> int:
    """Sessions of this database waiting for a lock: the API's queries stuck on the stall."""
    n = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(n)


async def test_a_stalled_postgres_answers_database_unavailable_by_the_deadline(
    db_settings: Settings,
) -> None:
    async with api_on(replace(db_settings, authorize_deadline_s=DEADLINE_S)) as api:
        await api.seed("cached", "cold", "lost", balance="10.00")
        service = await api.key("cached", "service")
        for account in ("cached", "lost"):  # key, prices and plan now in the process
            r = await api.authorize(service, account_id=account, call_id="warm")
            assert r.json()["decision"] == "allow", r.text
        await api.svc.balances._r.delete(keys.account("lost"))  # Redis lost it since
        calls = count_rebuilds(api)

        async with accounts_locked(db_settings.database_url) as locker:
            stalled = await asyncio.gather(
                *(
                    timed(api.authorize(service, account_id=a, call_id=f"{a}-{i}"))
                    for i in range(20)
                    for a in ("cold", "lost")
                )
            )
            for r, took in stalled:
                assert_error(r, 503, "database_unavailable")
                assert r.headers["retry-after"] == "1"
                assert took < DEADLINE_S + SLACK_S
            # Forty requests, one query each for the two accounts, not a connection each.
            assert 1 <= await waiting_on_locks(locker) <= 2
            assert calls == [["lost"]]
            # What the process has cached is answered as if nothing were wrong, also once a
            # check of the price lists' version is due (it waits in the background).
            await asyncio.sleep(1.1)
            for i in range(5):
                r, took = await timed(api.authorize(service, account_id="cached", call_id=f"{i}"))
                assert r.status_code == 200 and r.json()["decision"] == "allow", r.text
                assert took < DEADLINE_S + SLACK_S

        # PostgreSQL is back: the same requests are answered for real.
        for account in ("cold", "lost"):
            r = await api.authorize(service, account_id=account, call_id=f"{account}-0")
            assert r.status_code == 200 and r.json()["decision"] == "allow", r.text


Upstream = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@contextlib.asynccontextmanager
async def pausable_proxy(upstream: Upstream) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP relay to PostgreSQL; clear the event and it stops passing bytes and new
    connections, as a PostgreSQL host that stopped answering (the cancel requests asyncpg
    sends for abandoned queries included)."""
    flowing = asyncio.Event()
    flowing.set()
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65_536):
                await flowing.wait()
                dst.write(data)
                await dst.drain()
        dst.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await flowing.wait()
        up_reader, up_writer = await upstream()
        writers.append(up_writer)
        for t in (
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ):
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], flowing
    finally:
        flowing.set()
        server.close()
        for w in writers:
            w.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def proxied(database_url: str) -> tuple[Upstream, Callable[[int], str]]:
    """How to reach the DSN's server (TCP, or the unix socket the embedded server listens on),
    and the same DSN through a relay on a local TCP port."""
    parts = urlsplit(database_url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    socket_dir = query.pop("host", "") or (parts.hostname or "")
    port = int(query.pop("port", "") or parts.port or 5432)
    if socket_dir.startswith("/"):
        path = str(Path(socket_dir) / f".s.PGSQL.{port}")

        def upstream() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            return asyncio.open_unix_connection(path)
    else:

        def upstream() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            return asyncio.open_connection(socket_dir, port)

    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""

    def via(relay_port: int) -> str:
        netloc = f"{user}127.0.0.1:{relay_port}"
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    return upstream, via


async def test_a_postgres_host_that_stops_answering_never_holds_an_authorization(
    db_settings: Settings,
) -> None:
    upstream, via = proxied(db_settings.database_url)
    async with pausable_proxy(upstream) as (port, flowing):
        settings = replace(db_settings, database_url=via(port), authorize_deadline_s=DEADLINE_S)
        async with api_on(settings) as api:
            await api.seed("cached", "cold", balance="10.00")
            service = await api.key("cached", "service")
            r = await api.authorize(service, account_id="cached", call_id="warm")
            assert r.json()["decision"] == "allow", r.text

            flowing.clear()
            try:
                for i in range(3):
                    r, took = await timed(api.authorize(service, account_id="cold", call_id=f"{i}"))
                    assert_error(r, 503, "database_unavailable")
                    assert took < DEADLINE_S + SLACK_S
                r, took = await timed(api.authorize(service, account_id="cached", call_id="c"))
                assert r.json()["decision"] == "allow", r.text
                assert took < DEADLINE_S + SLACK_S
            finally:
                flowing.set()
            await wait_for_allow(lambda: api.authorize(service, account_id="cold", call_id="0"))


async def wait_for_allow(
    ask: Callable[[], Awaitable[httpx.Response]], within: float = 30.0
) -> None:
    """PostgreSQL back: the abandoned queries drain, and the account is answered for real."""
    end = time.monotonic() + within
    while True:
        r = await ask()
        if r.status_code == 200:
            assert r.json()["decision"] == "allow", r.text
            return
        assert_error(r, 503, "database_unavailable")
        assert time.monotonic() < end, "PostgreSQL came back but the account was never answered"
        await asyncio.sleep(0.2)
