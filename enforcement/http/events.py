"""``POST /v1/events``: the contract's inbound CloudEvents over HTTP, for switches without Kafka
(``enforcement.ingest`` checks and produces them).

- ``Content-Type: application/cloudevents+json`` (or ``application/json``): one structured
  CloudEvent, at most 64 KiB.
- ``Content-Type: application/cloudevents-batch+json``: a JSON array of them, at most
  ``MAX_BATCH_EVENTS`` events and ``MAX_BATCH_BYTES``. One bad event refuses the whole batch
  (422, ``field`` names it: ``[3].data.billable_s``) and nothing of it is produced.

202 ``{"accepted": N}`` once the broker has acknowledged every event; 503
``broker_unavailable`` (``Retry-After: 1``) when no broker is configured or reachable: send
the same events again. Service keys only (``events.ingest``).
"""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from enforcement.http.services import Services
from enforcement.ingest import (
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    BrokerUnavailable,
    EventRefused,
    events_from,
)
from infra import metrics
from infra.http import errors
from infra.http.callers import Caller
from infra.http.errors import RETRY_AFTER, ApiError

EVENTS: Final = "/v1/events"
BATCH: Final = "application/cloudevents-batch+json"
SINGLE: Final = frozenset({"application/cloudevents+json", "application/json"})

router = APIRouter()


class EventsAccepted(BaseModel):
    """How many events the broker acknowledged (all of the request's)."""

    accepted: int


async def _bounded_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


_SCHEMA: Final[dict[str, Any]] = {"type": "object", "description": "a CloudEvent 1.0"}


@router.post(
    EVENTS,
    status_code=202,
    response_model=EventsAccepted,
    responses=errors.responses(400, 401, 403, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/cloudevents+json": {"schema": _SCHEMA},
                BATCH: {"schema": {"type": "array", "items": _SCHEMA}},
            },
        }
    },
    summary="Publish usage events over HTTP (service keys): one CloudEvent, or a batch",
)
async def publish(request: Request, who: Caller, svc: Services) -> JSONResponse:
    """Each event goes to its contract topic keyed by ``data.account_id``, exactly as a switch
    would produce it; idempotency stays with ``(source, id)``."""
    who.anywhere("events.ingest")
    media = _media_type(request)
    if media == BATCH:
        batch, limit = True, MAX_BATCH_BYTES
    elif media in SINGLE or not media:
        batch, limit = False, MAX_EVENT_BYTES
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send application/cloudevents+json or {BATCH}, not {media!r}",
        )
    raw = await _bounded_body(request, limit)
    try:
        records = events_from(raw, batch=batch)
        await svc.events.produce(records)
    except EventRefused as exc:
        metrics.EVENTS_INGESTED.labels("refused").inc()
        raise ApiError(exc.status, exc.code, exc.message, exc.field) from None
    except BrokerUnavailable as exc:
        metrics.EVENTS_INGESTED.labels("broker_unavailable").inc()
        raise ApiError(503, "broker_unavailable", str(exc), None, RETRY_AFTER) from None
    metrics.EVENTS_INGESTED.labels("accepted").inc(len(records))
    return JSONResponse({"accepted": len(records)}, status_code=202)
