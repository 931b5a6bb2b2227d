"""``POST /v1/authorizations`` answered in uvicorn's protocol (``enforcement.http.fastproto``,
what ``meter run api`` serves): the same answers as the ASGI route, over real HTTP on loopback,
with pipelining, ``Connection: close`` and oversized bodies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import orjson

from meter.apiserver import asgi_app, server_for
from tests.api import NOWHERE, UK, Api, call


@contextlib.asynccontextmanager
async def serving(api: Api) -> AsyncIterator[int]:
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


def _request(body: bytes, key: str | None, *, close: bool = False) -> bytes:
    head = "POST /v1/authorizations HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    if key:
        head += f"authorization: Bearer {key}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body


async def _responses(
    reader: asyncio.StreamReader, n: int
) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    for _ in range(n):
        head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        status = int(head[0].split()[1])
        headers = {n.lower(): v for n, v in (h.split(": ", 1) for h in head[1:] if h)}
        body = await reader.readexactly(int(headers["content-length"]))
        out.append((status, headers, body))
    return out


async def test_the_protocol_answers_as_the_asgi_route(api: Api) -> None:
    await api.seed("acc_1", balance="5.00")
    headers = await api.key("acc_1", "service")
    key = headers["Authorization"].split()[1]
    cases = [
        (orjson.dumps(call(call_id="c1", to=UK)), key),
        (orjson.dumps(call(call_id="c2", to=NOWHERE)), key),
        (orjson.dumps(call(account_id="ghost", call_id="c3", to=UK)), key),
        (orjson.dumps(call(call_id="c4", to=UK)), None),  # 401
        (orjson.dumps(call(call_id="c5", to=UK)), "mk_not_a_key"),  # 401
        (orjson.dumps(call(call_id="c6", to=UK) | {"x": 1}), key),  # 422
        (orjson.dumps(call(call_id="bad\n", to=UK)), key),  # 422
        (b"{", key),  # 400
        (b"", key),  # 400
        (b"{" + b" " * 70_000 + b"}", key),  # 413
        (b"{" + b" " * 70_000 + b"}", None),  # 401: the key is checked first
    ]
    async with serving(api) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for body, k in cases:
                writer.write(_request(body, k))
                [(status, hdrs, raw)] = await _responses(reader, 1)
                # The same request again through the ASGI route (httpx, in process): its
                # idempotent answer, or the same error.
                slow = await api.client.post(
                    "/v1/authorizations",
                    content=body,
                    headers={"content-type": "application/json"}
                    | ({"Authorization": f"Bearer {k}"} if k else {}),
                )
                assert status == slow.status_code, (body[:60], raw)
                assert orjson.loads(raw) == slow.json()
                assert hdrs["content-type"] == "application/json"
                assert "date" in hdrs
                if status == 401:
                    assert hdrs["www-authenticate"].startswith("Bearer")
        finally:
            writer.close()


async def test_pipelined_requests_are_answered_in_order(api: Api) -> None:
    await api.seed("acc_1", balance="5.00")
    headers = await api.key("acc_1", "service")
    key = headers["Authorization"].split()[1]
    get = b"GET /v1/accounts/acc_1/balance HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %s\r\n\r\n"
    async with serving(api) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                _request(orjson.dumps(call(call_id="p1", to=UK)), key)
                + _request(orjson.dumps(call(call_id="p2", to=UK)), key)
                + get % key.encode()
                + _request(orjson.dumps(call(call_id="p3", to=NOWHERE)), key)
            )
            out = await asyncio.wait_for(_responses(reader, 4), 10)
        finally:
            writer.close()
    assert [s for s, _, _ in out] == [200, 200, 200, 200]
    bodies = [orjson.loads(b) for _, _, b in out]
    assert [b.get("reservation_id") for b in bodies[:2]] == ["acc_1:p1", "acc_1:p2"]
    assert "available_credit" in bodies[2]
    assert bodies[3]["reason"] == "no_rate_for_destination"


async def test_connection_close_is_honoured(api: Api) -> None:
    await api.seed("acc_1", balance="5.00")
    headers = await api.key("acc_1", "service")
    key = headers["Authorization"].split()[1]
    async with serving(api) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request(orjson.dumps(call(call_id="k1", to=UK)), key, close=True))
        [(status, hdrs, _)] = await _responses(reader, 1)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        writer.close()
        # A plain client still gets its answer (keep-alive, its own way of reading).
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.post(
                "/v1/authorizations", json=call(call_id="k2", to=UK), headers=headers
            )
    assert (status, hdrs["connection"]) == (200, "close")
    assert r.status_code == 200 and r.json()["decision"] == "allow"


async def test_expect_100_continue_is_answered_before_the_body(api: Api) -> None:
    await api.seed("acc_1", balance="5.00")
    headers = await api.key("acc_1", "service")
    key = headers["Authorization"].split()[1]
    body = orjson.dumps(call(call_id="e1", to=UK))
    async with serving(api) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = _request(body, key).split(b"\r\n\r\n")[0]
            writer.write(head + b"\r\nexpect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(body)
            [(status, _, raw)] = await asyncio.wait_for(_responses(reader, 1), 5)
        finally:
            writer.close()
    assert status == 200 and orjson.loads(raw)["reservation_id"] == "acc_1:e1"
