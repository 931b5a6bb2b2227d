"""Event ingest for switches that cannot speak Kafka (``POST /v1/events``): the contract's
inbound CloudEvents, checked as the metering worker checks them, produced to their own topic
keyed by ``account_id``, and acknowledged by the broker before the caller hears 202.

What a caller must know, as a tree of what can go wrong::

    IngestError
    ├── EventRefused        4xx: this request is wrong (``index``: which event of a batch,
    │                       ``field``: which field). Nothing of it was produced: a batch is
    │                       refused whole, so a switch never has to work out which half landed.
    └── BrokerUnavailable   503: no broker configured or reachable, or it did not acknowledge
                            in time. Some events may have been produced: send the same events
                            again (same ``source`` and ``id``), never new ids; ``(source, id)``
                            makes a repeat harmless (charged once).

Each event is produced as its canonical JSON (parsed, then serialized again, keys in the
order sent, no insignificant whitespace): the same event sent alone or in a batch, or sent
again, is the same bytes, so the worker sees a repeat, never ``duplicate_id_different_payload``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from contracts.events import parse_inbound
from contracts.topics import TOPIC_OF_TYPE

log = logging.getLogger(__name__)

#: A batch holds at most this many events (and its body at most ``MAX_BATCH_BYTES``).
MAX_BATCH_EVENTS: Final = 500
MAX_BATCH_BYTES: Final = 1024 * 1024
#: One event, alone or within a batch, is at most this large (as the API's other bodies).
MAX_EVENT_BYTES: Final = 65_536
#: How long a request waits for the broker's acknowledgement of all its events.
ACK_TIMEOUT_S: Final = 3.0
#: After a failed connection, requests are answered 503 at once for this long.
RECONNECT_AFTER_S: Final = 1.0


class IngestError(Exception):
    """Base of what ``events_from`` and an ``EventSink`` raise."""


class EventRefused(IngestError):
    """The request is wrong; nothing was produced. ``status`` 400/413/422."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None, index: int | None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.index = index
        # The field as the caller sees it: ``[3].data.to`` within a batch.
        self.field = _at(index, field)


class BrokerUnavailable(IngestError):
    """The broker did not take (all of) it; re-send the same events."""


@dataclass(frozen=True, slots=True)
class Record:
    """One event as it is produced: its topic, key (the account id) and value."""

    topic: str
    key: bytes
    value: bytes


class EventSink(Protocol):
    """Produces records and returns once the broker has acknowledged every one; raises
    ``BrokerUnavailable`` otherwise (some may have been produced)."""

    async def produce(self, records: Sequence[Record]) -> None: ...


def _at(index: int | None, field: str | None) -> str | None:
    if index is None:
        return field
    if field is None:
        return f"[{index}]"
    return f"[{index}]{field}" if field.startswith("[") else f"[{index}].{field}"


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses integers past 64 bits, which json takes (and pydantic then refuses).
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise EventRefused(
                400, "malformed_json", f"the body is not valid JSON: {exc}", None, None
            ) from None


def _dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # an integer past 64 bits
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _field(loc: Sequence[int | str]) -> str | None:
    parts = list(loc)
    if parts and isinstance(parts[0], str) and parts[0] in TOPIC_OF_TYPE:
        parts = parts[1:]  # the discriminator's tag, not a field
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def check(doc: Any, index: int | None = None) -> Record:
    """One parsed event as the record to produce, or ``EventRefused`` (422)."""
    if not isinstance(doc, dict):
        raise EventRefused(422, "validation_error", "an event is a JSON object", None, index)
    value = _dumps(doc)
    if len(value) > MAX_EVENT_BYTES:
        raise EventRefused(
            413, "payload_too_large", f"an event exceeds {MAX_EVENT_BYTES} bytes", None, index
        )
    try:
        ev = parse_inbound(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            known = ", ".join(sorted(TOPIC_OF_TYPE))
            raise EventRefused(
                422, "validation_error", f"type must be one of: {known}", "type", index
            ) from None
        field = _field(first["loc"])
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        raise EventRefused(422, "validation_error", message, field, index) from None
    if not ev.subject_matches():
        raise EventRefused(
            422, "validation_error", "subject must equal data.account_id", "subject", index
        )
    return Record(TOPIC_OF_TYPE[ev.type], ev.data.account_id.encode(), value)


def events_from(raw: bytes, *, batch: bool) -> list[Record]:
    """The records of a request body: one structured CloudEvent, or (``batch``) a JSON array
    of them, at most ``MAX_BATCH_EVENTS``. Refused whole at the first bad event."""
    if not raw.strip():
        raise EventRefused(400, "malformed_json", "a JSON body is required", None, None)
    doc = _loads(raw)
    if not batch:
        return [check(doc)]
    if not isinstance(doc, list):
        raise EventRefused(
            422, "validation_error", "a batch is a JSON array of CloudEvents", None, None
        )
    if not doc:
        raise EventRefused(422, "validation_error", "a batch holds at least one event", None, None)
    if len(doc) > MAX_BATCH_EVENTS:
        raise EventRefused(
            413,
            "payload_too_large",
            f"a batch holds at most {MAX_BATCH_EVENTS} events, not {len(doc)}",
            None,
            None,
        )
    return [check(d, i) for i, d in enumerate(doc)]


class NoBroker:
    """The sink of an API process without a broker configured: always 503."""

    async def produce(self, records: Sequence[Record]) -> None:
        raise BrokerUnavailable("no broker is configured (METER_KAFKA_BOOTSTRAP)")

    async def close(self) -> None:
        return None


NO_BROKER: Final = NoBroker()


class KafkaEvents:
    """``EventSink`` on aiokafka, connected on first use (and again after a failure, at most
    once per ``RECONNECT_AFTER_S``), so that the API starts and authorizes while the broker is
    away. ``acks="all"``; no idempotent producer (idempotency is ``(source, id)``'s)."""

    def __init__(self, bootstrap: str, *, ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._bootstrap = bootstrap
        self._ack_timeout_s = ack_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._failed_at = -RECONNECT_AFTER_S

    async def connect(self) -> None:
        """Connect now (the API's startup), rather than on the first request."""
        await self._started()

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is not None:
                return self._producer
            if time.monotonic() - self._failed_at < RECONNECT_AFTER_S:
                raise BrokerUnavailable("the broker was not reachable a moment ago; retry")
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                acks="all",
                linger_ms=1,
                enable_idempotence=False,
                request_timeout_ms=int(self._ack_timeout_s * 1000),
            )
            try:
                async with asyncio.timeout(self._ack_timeout_s):
                    await producer.start()
            except (KafkaError, OSError, TimeoutError) as exc:
                self._failed_at = time.monotonic()
                await producer.stop()
                log.warning("event ingest: broker %s not reachable: %r", self._bootstrap, exc)
                why = type(exc).__name__
                raise BrokerUnavailable(f"the broker is not reachable ({why})") from exc
            self._producer = producer
            return producer

    async def produce(self, records: Sequence[Record]) -> None:
        producer = await self._started()
        try:
            async with asyncio.timeout(self._ack_timeout_s):
                futures = [
                    await producer.send(r.topic, r.value, r.key, headers=_HEADERS) for r in records
                ]
                await asyncio.gather(*futures)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"the broker did not acknowledge within {self._ack_timeout_s} s "
                f"({type(exc).__name__}); send the same events again"
            ) from exc

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


_HEADERS: Final = [("content-type", b"application/cloudevents+json")]
