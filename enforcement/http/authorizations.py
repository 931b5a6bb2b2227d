"""``POST /v1/authorizations``: may this call connect, and for how long.

The whole answer after the request is read is ``authorize_json``; both ways in call it: the
plain ASGI ``AuthorizeFastPath`` (what ``meter run api`` serves) and the FastAPI route here,
which documents the endpoint in the OpenAPI document and answers the same, slower.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec
from fastapi import APIRouter, Request, Security
from fastapi.responses import Response
from prometheus_client import Counter

from contracts.events import ACCOUNT_ID_PATTERN, whole_match
from enforcement.authorize import (
    AuthorizeRequest,
    BalanceStoreUnavailable,
    CallClosed,
    DatabaseUnavailable,
)
from enforcement.http.models import CALL_ID_PATTERN, AuthorizationIn, AuthorizationOut
from enforcement.http.services import ApiServices, Services
from infra import metrics
from infra.http import errors
from infra.http.access import allow
from infra.http.api_keys import ApiKey
from infra.http.bodies import MAX_BODY_BYTES, body_doc, parse_body
from infra.http.callers import authenticate, bearer, bearer_token
from infra.http.errors import ApiError

AUTHORIZATIONS: Final = "/v1/authorizations"

router = APIRouter()


_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _FastIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``AuthorizationIn``'s constraints in msgspec (about 5x cheaper to decode): a body it
    accepts, pydantic accepts with the same values (``tests/enforcement/test_fast_bodies.py``);
    anything else goes to pydantic, whose answer and error text stand."""

    account_id: Annotated[str, msgspec.Meta(pattern=whole_match(ACCOUNT_ID_PATTERN))]
    call_id: Annotated[str, msgspec.Meta(pattern=whole_match(CALL_ID_PATTERN))]
    direction: Literal["inbound", "outbound"]
    from_: _Text = msgspec.field(name="from")
    to: _Text
    outbound_profile_id: _Text | None = None


class _FastOut(msgspec.Struct):
    """``AuthorizationOut`` as msgspec writes it: the same fields in the same order, the same
    JSON (``tests/enforcement/test_fast_bodies.py``)."""

    decision: str
    reason: str
    max_duration_s: int
    reservation_id: str | None
    expires_at: datetime | None


_DECODE_IN: Final = msgspec.json.Decoder(_FastIn)
_ENCODE: Final = msgspec.json.Encoder()


def parse_authorization(raw: bytes) -> _FastIn | AuthorizationIn:
    """The body of an authorization: msgspec's reading when it accepts it, else pydantic's
    (``parse_body``: its 400 / 413 / 422 and their wording)."""
    if len(raw) <= MAX_BODY_BYTES:
        try:
            return _DECODE_IN.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
    return parse_body(raw, AuthorizationIn)


#: The decision counters' children, by (decision, reason): ``labels`` takes a lock per call.
_DECIDED: dict[tuple[str, str], Counter] = {}


def _count(decision: str, reason: str) -> None:
    child = _DECIDED.get((decision, reason))
    if child is None:
        child = _DECIDED[(decision, reason)] = metrics.AUTHORIZE_DECISIONS.labels(
            decision, reason
        )
    child.inc()


async def authenticate_by(services: ApiServices, header: str | None, deadline: float) -> ApiKey:
    """An authorization's key check, within the time left of its deadline (loop time)."""
    left = max(0.0, deadline - asyncio.get_running_loop().time())
    return await authenticate(services.keys, bearer_token(header), timeout_s=left)


def authorize_deadline(services: ApiServices) -> float:
    """When an authorization starting now must have answered (loop time)."""
    return asyncio.get_running_loop().time() + services.authorizer.deadline_s


async def authorize_json(
    services: ApiServices, key: ApiKey, raw: bytes, deadline: float | None = None
) -> bytes:
    """The whole of ``POST /v1/authorizations`` after authentication: the answer's JSON.
    ``deadline`` (loop time): when to have answered; default: ``authorize_deadline_s`` from
    now."""
    body = parse_authorization(raw)
    await allow(key, body.account_id, "calls.authorize", services.directory)
    t0 = time.perf_counter()
    try:
        d = await services.authorizer.authorize(
            AuthorizeRequest(
                body.account_id,
                body.call_id,
                body.direction,
                body.from_,
                body.to,
                body.outbound_profile_id,
            ),
            deadline=deadline,
        )
    except BalanceStoreUnavailable as exc:
        _count("error", "balance_store_unavailable")
        raise errors.balance_store_unavailable(str(exc)) from exc
    except DatabaseUnavailable as exc:
        # An account not cached yet could not be looked up, or not rebuilt: nothing reserved.
        _count("error", "database_unavailable")
        raise errors.database_unavailable(f"{exc}; retry") from exc
    except CallClosed as exc:
        # Not a deny reason of the contract: a client re-using a call_id that hung up.
        metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - t0)
        _count("error", "call_closed")
        raise ApiError(409, "call_closed", "this call_id has already hung up", "call_id") from exc
    metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - t0)
    _count(d.decision, d.reason)
    # AuthorizationOut's JSON (the OpenAPI document's schema), written by msgspec.
    return _ENCODE.encode(
        _FastOut(d.decision, d.reason, d.max_duration_s, d.reservation_id, d.expires_at)
    )


@router.post(
    AUTHORIZATIONS,
    response_model=AuthorizationOut,
    responses=errors.responses(400, 401, 403, 413, 422, 503),
    openapi_extra=body_doc(AuthorizationIn),
    summary="May this call connect, and for how long",
)
async def authorize(
    request: Request, svc: Services, _: Annotated[object, Security(bearer)]
) -> Response:
    """Allowing reserves credit for the first grant; concurrent calls of an account never
    together reserve more than its available credit, nor outnumber its plan's concurrent-call
    limit (inbound calls count too: beyond it, ``concurrent_call_limit``). Idempotent per
    ``call_id``: a retry gets the first answer. A deny is a 200 answer (unknown accounts
    included). Answered within ``authorize_deadline_s``, the key check included, or 503."""
    # The key is checked here rather than by the ``Caller`` dependency: within the
    # authorization's deadline, as the fast path does.
    deadline = authorize_deadline(svc)
    key = await authenticate_by(svc, request.headers.get("authorization"), deadline)
    payload = await authorize_json(svc, key, await request.body(), deadline)
    return Response(payload, media_type="application/json")
