"""Every HTTP error of the API has one shape: ``{"error": {"code", "message", "field"}}``.

``field`` is the dotted path of the request field at fault (``to``, ``account_id``), or null.
Codes by status:

    400 malformed_json               the body is not JSON (or is missing)
    401 unauthorized                 no ``Authorization: Bearer`` key, or an unknown/revoked one
    402 card_declined                a manual top-up's card was declined (nothing charged)
    403 forbidden                    the key's role may not do this, or it is another account's
        lift_not_permitted           a resume by a key that may lift none of what holds the
                                     account (another's suspension, the recharge cap's hold)
    404 account_not_found, not_found
    405 method_not_allowed
    413 payload_too_large            a body over 64 KiB
    422 validation_error             JSON, but not what the endpoint takes (see ``field``)
    500 internal                     a bug; the body never carries a stack trace
    503 balance_store_unavailable    Redis did not answer within the deadline, or failed; retry
                                     with the same call_id (an authorization may or may not have
                                     been reserved: the retry gets the first answer). Only ever
                                     Redis: never for PostgreSQL's work.
        database_unavailable         PostgreSQL did not answer within the deadline (for an
                                     authorization: the account is not cached in the process,
                                     or Redis lost it and it could not be rebuilt); nothing was
                                     reserved; retry (every endpoint is idempotent)
        key_store_unavailable        the key could not be checked (not cached, PostgreSQL down)
    Every 503 carries ``Retry-After: 1``; ``balance_store_unavailable`` and
    ``database_unavailable`` are made by the two functions of that name, nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    402: "card_declined",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}
# Where a validation error's location starts with one of these, it is not part of the field.
_LOCATIONS: Final = frozenset({"body", "path", "query", "header", "cookie"})


#: Sent with every 503: the outage is expected to be short, and every retry is safe.
RETRY_AFTER: Final = {"Retry-After": "1"}


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ApiError(Exception):
    """Raise to answer with an error; ``headers`` are added to the response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def balance_store_unavailable(message: str) -> ApiError:
    """503: Redis did not answer in time or failed (never for PostgreSQL's work)."""
    return ApiError(503, "balance_store_unavailable", message, None, RETRY_AFTER)


def database_unavailable(message: str = "the database did not answer in time; retry") -> ApiError:
    """503: PostgreSQL did not answer in time or is unreachable; nothing was applied."""
    return ApiError(503, "database_unavailable", message, None, RETRY_AFTER)


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    return (
        ErrorOut(error=ErrorDetail(code=code, message=message, field=field))
        .model_dump_json()
        .encode()
    )


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = error_body(code, message, field)
    return Response(body, status, headers=headers, media_type="application/json")


def field_path(loc: Sequence[int | str]) -> str | None:
    """``("body", "data", 0, "to")`` -> ``"data[0].to"``; None for the body as a whole."""
    parts = list(loc[1:] if loc and loc[0] in _LOCATIONS else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def from_validation(errors: Sequence[Any]) -> ApiError:
    """The first of pydantic's errors as an ``ApiError`` (400 for broken JSON, else 422)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, "malformed_json", f"the body is not valid JSON: {first['msg']}")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    path = field_path(first["loc"])
    message = f"{path}: {first['msg']}{more}" if path else f"{first['msg']}{more}"
    return ApiError(422, "validation_error", message, path)


def install(app: FastAPI) -> None:
    """Answer every error, FastAPI's and Starlette's own included, in the one shape."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    async def request_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        e = from_validation(exc.errors())
        return error_response(e.status, e.code, e.message, e.field)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)

    async def internal(_: Request, exc: Exception) -> Response:
        # The server logs the exception (Starlette re-raises it after this response); the
        # caller learns only that it was not their fault.
        return error_response(500, "internal", "internal error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


_MEANINGS: Final = {
    400: "Malformed JSON (`malformed_json`)",
    401: "No API key, or an unknown or revoked one (`unauthorized`)",
    403: "The key's role may not do this, or the account is not the key's (`forbidden`)",
    404: "No such account (`account_not_found`)",
    413: "The body is over 64 KiB (`payload_too_large`)",
    422: "The body or a path parameter is not what the endpoint takes; see `field`",
    503: "Redis or PostgreSQL did not answer in time; retry, with the same ids",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses an endpoint may answer with."""
    return {
        s: {"model": ErrorOut, "description": _MEANINGS.get(s, _CODES.get(s, "error"))}
        for s in statuses
    }
