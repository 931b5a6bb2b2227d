"""The API's own routes, called in-process: what every portal page shows and does.

A page never re-implements a route. It calls the route's function itself, with the signed-in
person as its ``Principal``, so that the permission check (``infra.http.access.RULES``), the
body's validation, the domain call and the error mapping are the API's, byte for byte. What a
route answers (a pydantic model, a ``JSONResponse``, a file) comes back as JSON data or as the
file; what it raises (``ApiError``) reaches the page, which shows its message.

Routes that read a JSON body read it from their ``Request``: ``with_body`` makes one holding
the form's fields as JSON, the same bytes an API client would send.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Message


def with_body(body: Mapping[str, object] | None = None) -> Request:
    """A request whose body is ``body`` as JSON (none: empty, for optional bodies)."""
    raw = b"" if body is None else json.dumps(body).encode()

    async def receive() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    return Request(scope, receive)


async def data(work: Awaitable[BaseModel | Response]) -> Any:
    """What the route answered, as JSON data (``ApiError`` as the route raised it)."""
    out = await work
    if isinstance(out, BaseModel):
        return out.model_dump(mode="json", by_alias=True)
    return json.loads(bytes(out.body)) if out.body else None


async def file(work: Awaitable[Response]) -> Response:
    """A route's file answer (a PDF, a CSV) as it is."""
    return await work
