"""``POST /v1/events``: CloudEvents over HTTP, produced to their topic keyed by account, 202 only
once the broker has them; a bad event, or one bad event of a batch, produces nothing."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from contracts import topics
from infra.kafkatools import read_all
from infra.settings import Settings
from tests.api import Api, api_on, assert_error
from tests.calls import answered, hangup

BATCH = {"Content-Type": "application/cloudevents-batch+json"}
SINGLE = {"Content-Type": "application/cloudevents+json"}


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[Api]:
    """The API with a broker (the test's own Tansu)."""
    async with api_on(replace(settings, authorize_deadline_s=5.0)) as a:
        yield a


async def service(api: Api) -> dict[str, str]:
    await api.seed("platform")
    return await api.key("platform", "service")


def body(doc: Any) -> bytes:
    return orjson.dumps(doc)


async def test_one_event_is_produced_to_its_topic_keyed_by_account(live: Api) -> None:
    h = await service(live)
    now = datetime.now(UTC)
    ev = hangup("acc_9", "c-1", now, 42)
    r = await live.client.post("/v1/events", content=body(ev), headers={**h, **SINGLE})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1}
    got = await read_all(live.settings.kafka_bootstrap, topics.CALL_EVENTS, expect=1)
    assert [(m.key, orjson.loads(m.value)) for m in got] == [(b"acc_9", ev)]


async def test_a_batch_goes_whole_and_a_retry_is_the_same_bytes(live: Api) -> None:
    h = await service(live)
    now = datetime.now(UTC)
    evs = [answered("acc_1", "c-1", now), hangup("acc_2", "c-2", now, 10)]
    r = await live.client.post("/v1/events", content=body(evs), headers={**h, **BATCH})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 2}
    # The same event alone, with other whitespace: produced as the same bytes.
    pretty = orjson.dumps(evs[1], option=orjson.OPT_INDENT_2)
    r = await live.client.post("/v1/events", content=pretty, headers={**h, **SINGLE})
    assert r.status_code == 202, r.text
    got = await read_all(live.settings.kafka_bootstrap, topics.CALL_EVENTS, expect=3)
    assert sorted(m.key for m in got) == [b"acc_1", b"acc_2", b"acc_2"]
    second = [m.value for m in got if m.key == b"acc_2"]
    assert second[0] == second[1]


async def test_one_bad_event_refuses_the_batch_whole_naming_it(live: Api) -> None:
    h = await service(live)
    now = datetime.now(UTC)
    bad = hangup("acc_2", "c-2", now, 10)
    del bad["data"]["to"]
    evs = [answered("acc_1", "c-1", now), bad]
    r = await live.client.post("/v1/events", content=body(evs), headers={**h, **BATCH})
    assert_error(r, 422, "validation_error", "[1].data.to")
    assert await read_all(live.settings.kafka_bootstrap, topics.CALL_EVENTS, idle_s=0.5) == []


@pytest.mark.parametrize(
    ("change", "status", "code", "field"),
    [
        (lambda e: e.update(type="call.teleport"), 422, "validation_error", "type"),
        (lambda e: e.update(subject="someone_else"), 422, "validation_error", "subject"),
        (lambda e: e["data"].update(billable_s="12"), 422, "validation_error", "data.billable_s"),
        (lambda e: e.update(specversion="0.3"), 422, "validation_error", "specversion"),
        (lambda e: e["data"].update(to="x" * 70_000), 413, "payload_too_large", None),
    ],
)
async def test_a_bad_event_is_a_clear_4xx(
    api: Api, change: Any, status: int, code: str, field: str | None
) -> None:
    h = await service(api)
    ev = hangup("acc_1", "c-1", datetime.now(UTC), 5)
    change(ev)
    r = await api.client.post("/v1/events", content=body(ev), headers={**h, **SINGLE})
    assert_error(r, status, code, field)


async def test_bodies_that_are_not_events(api: Api) -> None:
    h = await service(api)
    post = api.client.post
    assert_error(await post("/v1/events", content=b"{nope", headers=h), 400, "malformed_json")
    assert_error(await post("/v1/events", content=b"", headers=h), 400, "malformed_json")
    r = await post("/v1/events", content=b"[]", headers={**h, **BATCH})
    assert_error(r, 422, "validation_error")
    r = await post("/v1/events", content=b"{}", headers={**h, "Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    many = [hangup("a", f"c{i}", datetime.now(UTC), 1) for i in range(501)]
    r = await post("/v1/events", content=body(many), headers={**h, **BATCH})
    assert_error(r, 413, "payload_too_large")


async def test_only_service_keys_publish(api: Api) -> None:
    await api.seed("acc_1")
    ev = body(hangup("acc_1", "c-1", datetime.now(UTC), 5))
    for role in ("admin", "user"):
        r = await api.client.post("/v1/events", content=ev, headers=await api.key("acc_1", role))
        assert_error(r, 403, "forbidden")
    assert_error(await api.client.post("/v1/events", content=ev), 401, "unauthorized")


async def test_without_a_broker_it_answers_503_and_authorizes_meanwhile(api: Api) -> None:
    h = await service(api)
    ev = body(hangup("acc_1", "c-1", datetime.now(UTC), 5))
    r = await api.client.post("/v1/events", content=ev, headers=h)
    assert_error(r, 503, "broker_unavailable")
    assert r.headers["retry-after"] == "1"
    await api.seed("acc_1")
    assert (await api.authorize(h, account_id="acc_1")).status_code == 200


async def test_an_unreachable_broker_is_a_503_not_a_hang(db_settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    async with api_on(replace(db_settings, kafka_bootstrap=f"127.0.0.1:{port}")) as a:
        h = await service(a)
        ev = body(hangup("acc_1", "c-1", datetime.now(UTC), 5))
        r = await a.client.post("/v1/events", content=ev, headers=h)
        assert_error(r, 503, "broker_unavailable")
