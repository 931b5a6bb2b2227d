"""``AuthorizeFastPath``: ``POST /v1/authorizations`` answered in plain ASGI, in front of the
FastAPI app; ``meter run api`` answers it lower still, in uvicorn's protocol, with the same
``AuthorizeFastPath.answer`` (``enforcement.http.fastproto``; ``meter bench authorize``
measures that)."""

from __future__ import annotations

import logging
from typing import Final

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from enforcement.http.authorizations import (
    AUTHORIZATIONS,
    authenticate_by,
    authorize_deadline,
    authorize_json,
)
from enforcement.http.services import ApiServices
from infra.http import errors
from infra.http.bodies import MAX_BODY_BYTES
from infra.http.errors import ApiError

log = logging.getLogger(__name__)

_JSON: Final = (b"content-type", b"application/json")


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class AuthorizeFastPath:
    """What ``meter run api`` serves: ``POST /v1/authorizations`` answered here, in plain ASGI;
    everything else (lifespan included) goes to the FastAPI ``app``.

    Measured on the benchmark machine, the layers an authorization would otherwise cross
    (FastAPI's and Starlette's middleware, routing, dependency solving, request objects) took
    more server time than the authorization itself. The FastAPI route stays: it documents the
    endpoint in the OpenAPI document, and answers the same, slower, when served without this.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != AUTHORIZATIONS or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        try:
            status, extra, payload = await self.answer(header, receive)
        except _ClientGone:
            return
        headers = [_JSON, (b"content-length", b"%d" % len(payload))]
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        start: Message = {"type": "http.response.start", "status": status, "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": payload})

    async def answer(
        self, header: bytes | None, body: Receive | bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        """The status, extra headers and JSON of an authorization whose ``Authorization``
        header is ``header``; ``body``: the body, read here from ``receive`` when it is one,
        or None when it was larger than ``MAX_BODY_BYTES``. Raises ``_ClientGone`` only."""
        try:
            services: ApiServices = self.app.state.services
            deadline = authorize_deadline(services)
            key = await authenticate_by(
                services, None if header is None else header.decode("latin-1"), deadline
            )
            if body is None:
                raise ApiError(
                    413, "payload_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes"
                )
            raw = body if isinstance(body, bytes) else await _read_body(body)
            return 200, {}, await authorize_json(services, key, raw, deadline)
        except ApiError as e:
            return e.status, e.headers, errors.error_body(e.code, e.message, e.field)
        except _ClientGone:
            raise
        except Exception:
            # What Starlette's ServerErrorMiddleware does for the other routes.
            log.exception("authorization failed")
            return 500, {}, errors.error_body("internal", "internal error")
