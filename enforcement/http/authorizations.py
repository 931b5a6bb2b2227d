"""``POST /v1/authorizations``: may this call connect, and for how long.

The whole answer after the request is read is ``authorize_json``; both ways in call it: the
plain ASGI ``AuthorizeFastPath`` (what ``meter run api`` serves) and the FastAPI route here,
which documents the endpoint in the OpenAPI document and answers the same, slower.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Final

from fastapi import APIRouter, Request, Security
from fastapi.responses import Response

from enforcement.authorize import (
    AuthorizeRequest,
    BalanceStoreUnavailable,
    CallClosed,
    DatabaseUnavailable,
)
from enforcement.http.models import AuthorizationIn, AuthorizationOut
from enforcement.http.services import ApiServices, Services
from infra import metrics
from infra.http import errors
from infra.http.access import allow
from infra.http.api_keys import ApiKey
from infra.http.bodies import body_doc, parse_body
from infra.http.callers import authenticate, bearer, bearer_token
from infra.http.errors import ApiError

AUTHORIZATIONS: Final = "/v1/authorizations"

router = APIRouter()


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
    body = parse_body(raw, AuthorizationIn)
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
        metrics.AUTHORIZE_DECISIONS.labels("error", "balance_store_unavailable").inc()
        raise errors.balance_store_unavailable(str(exc)) from exc
    except DatabaseUnavailable as exc:
        # An account not cached yet could not be looked up, or not rebuilt: nothing reserved.
        metrics.AUTHORIZE_DECISIONS.labels("error", "database_unavailable").inc()
        raise errors.database_unavailable(f"{exc}; retry") from exc
    except CallClosed as exc:
        # Not a deny reason of the contract: a client re-using a call_id that hung up.
        metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - t0)
        metrics.AUTHORIZE_DECISIONS.labels("error", "call_closed").inc()
        raise ApiError(409, "call_closed", "this call_id has already hung up", "call_id") from exc
    metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - t0)
    metrics.AUTHORIZE_DECISIONS.labels(d.decision, d.reason).inc()
    out = AuthorizationOut(
        decision=d.decision,
        reason=d.reason,
        max_duration_s=d.max_duration_s,
        reservation_id=d.reservation_id,
        expires_at=d.expires_at,
    )
    return out.model_dump_json().encode()


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
