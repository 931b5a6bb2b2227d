"""The HTTP API (FastAPI, OpenAPI at ``/openapi.json``): call authorization, balances, and the
operator's suspend / resume.

Every ``/v1`` endpoint needs ``Authorization: Bearer <api key>`` (``enforcement.http.auth``):

=====================================  ===============================================
``POST /v1/authorizations``            ``service`` keys for any account (call-control
                                       serves every customer); ``admin``/``user`` keys
                                       for their own account only
``GET /v1/accounts/{id}/balance``      ``service`` for any account; ``admin``/``user``
                                       for their own
``POST /v1/accounts/{id}/suspend``     ``admin`` of that account
``POST /v1/accounts/{id}/resume``      ``admin`` of that account (also lifts a hold the
                                       service pinned, e.g. after the recharge cap)
``PUT|GET /v1/accounts/{id}/           ``admin`` of that account (billing is admin only)
auto_recharge``, ``PUT|GET|DELETE
.../payment_method``, ``POST|GET
.../payments``
=====================================  ===============================================

Why a ``service`` key may authorize for any account: call-control sits in front of every
customer's calls and asks before each one; a key per customer would have to be looked up by the
switch per call. It belongs to the platform's own account, it cannot suspend, resume or (later)
pay, and it is the one kind of key that must never leave the platform. ``admin``/``user`` keys
are customers' keys; acting for managed accounts comes with the issue that brings them.

Failure policy: every answer comes within a bounded time, never a hang. An authorization, the
API key check included, answers within ``authorize_deadline_s`` (0.5 s by default). Past it,
or when a store refuses connections, the answer is a 503 with ``Retry-After: 1`` naming the
store that was waited for: ``balance_store_unavailable`` for Redis, ``database_unavailable`` for
PostgreSQL (an account the process has not cached, or one Redis lost and that must be rebuilt
from the ledger), ``key_store_unavailable`` for a key not cached. The call was then neither
allowed nor denied: call-control retries with the *same* ``call_id`` (reservations are
idempotent per call, so a retry never reserves twice) and applies its own fail-open or
fail-closed rule when retries run out. An account and a key already cached are answered while
PostgreSQL is away. Other PostgreSQL work is bounded by ``_DB_TIMEOUT_S`` (503
``database_unavailable``). Errors have one shape, see ``enforcement.http.errors``.

Speed (``meter bench authorize``): ``POST /v1/authorizations`` is answered by a plain ASGI
handler in front of FastAPI (``AuthorizeFastPath``, served by ``asgi_app``) with the same
functions as the FastAPI route that documents it, since the framework's layers cost more than
the authorization itself; and concurrent reservations share Redis round trips
(``balance.coalesce``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Path, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.types import Message, Receive, Scope, Send

from balance.accounts import load_into_redis
from balance.bundles import BundleError, buy_bundle
from balance.coalesce import CoalescingBalances
from balance.errors import BalanceStoreError
from balance.protocol import BalanceStore
from balance.values import AccountState
from contracts.events import ACCOUNT_ID_PATTERN
from contracts.money import format_money
from enforcement.authorize import (
    POSTGRES_DOWN,
    REDIS_DOWN,
    Authorizer,
    AuthorizeRequest,
    BalanceStoreUnavailable,
    DatabaseUnavailable,
)
from enforcement.http import errors as api_errors
from enforcement.http.auth import ApiKey, ApiKeys, KeyStoreUnavailable, Role
from enforcement.http.errors import ApiError
from enforcement.http.models import (
    AuthorizationIn,
    AuthorizationOut,
    AutoRechargeIn,
    AutoRechargeOut,
    BalanceOut,
    BundlePurchaseIn,
    BundlePurchaseOut,
    PaymentIn,
    PaymentMethodIn,
    PaymentMethodOut,
    PaymentOut,
    PaymentsOut,
    StatusIn,
    StatusOut,
)
from infra import metrics
from infra.db import create_pool
from infra.settings import Settings
from rating.catalog import Catalog
from recharge.gateway import SavedMethod
from recharge.policy import PolicyRefusal
from recharge.service import (
    LogNotifier,
    Payment,
    PaymentError,
    PaymentService,
    RechargeSettings,
)
from recharge.worker import make_gateway

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)

AUTHORIZATIONS: Final = "/v1/authorizations"
#: Bound on any PostgreSQL work of one request.
_DB_TIMEOUT_S: Final = 2.0
#: Larger bodies are refused (413) before they are parsed.
MAX_BODY_BYTES: Final = 65_536
_RETRY: Final = api_errors.RETRY_AFTER
#: What PostgreSQL being away looks like (not a bug in a query: those stay 500s).
_DB_DOWN: Final = POSTGRES_DOWN
#: PostgreSQL work a request stopped waiting for, finishing its cancellation (see ``_db``).
_LET_GO: Final[set[asyncio.Future[Any]]] = set()
_JSON: Final = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class ApiServices:
    """What the API runs on; ``connect_api`` makes them from settings."""

    pool: asyncpg.Pool
    balances: BalanceStore
    catalog: Catalog
    authorizer: Authorizer
    keys: ApiKeys
    #: top-ups, the saved method and auto-recharge settings; None: the payment routes 503
    payments: PaymentService | None = None


def api_redis_client(settings: Settings) -> aioredis.Redis:
    """Redis for the API.

    No socket read timeout: every call is already bounded by ``authorize_deadline_s``, and
    redis-py would wrap each send in a task of its own to time it. No bound on the pool either:
    reservations reach Redis through ``CoalescingBalances`` (one round trip at a time), and a
    bounded pool would turn each connection redis-py fails to give back (a pipeline cancelled
    or failing while it checks its scripts) into one slot lost for good, then into an outage.
    """
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=None,
        socket_connect_timeout=settings.redis_timeout_s,
    )


@contextlib.asynccontextmanager
async def connect_api(settings: Settings) -> AsyncIterator[ApiServices]:
    """Connections and caches for one API process; closed on exit."""
    pool = await create_pool(settings.database_url, max_size=4)
    r = api_redis_client(settings)
    try:
        balances = CoalescingBalances(
            r,
            max_accounts_per_call=settings.redis_accounts_per_call,
            timeout_s=settings.authorize_deadline_s,
        )
        catalog = Catalog(pool, lookup_timeout_s=_DB_TIMEOUT_S)
        await catalog.refresh()
        # The same reservation rules as the metering worker's live-call extensions.
        cc = settings.call_control()
        authorizer = Authorizer(
            balances,
            catalog,
            grant_s=cc.grant_s,
            grace_s=cc.grace_s,
            max_s=cc.max_s,
            deadline_s=settings.authorize_deadline_s,
            db_timeout_s=_DB_TIMEOUT_S,
            rebuild=lambda ids: load_into_redis(pool, balances, ids),
        )
        keys = ApiKeys(pool, ttl_s=settings.api_key_cache_s)
        gateway = make_gateway(settings)
        payments = PaymentService(
            pool,
            balances,
            gateway,
            LogNotifier(),
            backoff_s=settings.backoff(),
            max_declines=settings.recharge_max_declines,
            charge_timeout_s=settings.payment_timeout_s,
        )
        try:
            yield ApiServices(pool, balances, catalog, authorizer, keys, payments)
        finally:
            await gateway.close()
    finally:
        await r.aclose()
        await pool.close()


# --- shared by the FastAPI routes and the fast path -------------------------------------------


def bearer_token(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def authenticate(
    keys: ApiKeys, token: str | None, *, timeout_s: float | None = None
) -> ApiKey:
    """The caller's key: 401 without a valid one, 503 when it cannot be checked (within
    ``timeout_s`` when given)."""
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "send an API key as `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        key = await keys.authenticate(token, timeout_s=timeout_s)
    except KeyStoreUnavailable as exc:
        raise ApiError(
            503, "key_store_unavailable", "the API key could not be checked; retry", None, _RETRY
        ) from exc
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "unknown or revoked API key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return key


def may_act(key: ApiKey, account_id: str, roles: tuple[Role, ...]) -> None:
    """403 unless the key's role is one of ``roles`` and, but for ``service``, the account is
    the key's own."""
    if key.role not in roles:
        raise ApiError(403, "forbidden", f"a {key.role} key may not do this")
    if key.role != "service" and key.account_id != account_id:
        raise ApiError(403, "forbidden", "this key may only act on its own account")


def parse_body(raw: bytes, model: type[_M], *, optional: bool = False) -> _M:
    """Validate a JSON body with pydantic's own parser: 400 if it is not JSON, 422 if it is
    not what ``model`` takes. An empty body is ``model()`` when ``optional``."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if optional:
            return model()
        raise ApiError(400, "malformed_json", "a JSON body is required")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise api_errors.from_validation(exc.errors()) from None


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
    may_act(key, body.account_id, ("service", "admin", "user"))
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
        raise api_errors.balance_store_unavailable(str(exc)) from exc
    except DatabaseUnavailable as exc:
        # An account not cached yet could not be looked up, or not rebuilt: nothing reserved.
        metrics.AUTHORIZE_DECISIONS.labels("error", "database_unavailable").inc()
        raise api_errors.database_unavailable(f"{exc}; retry") from exc
    metrics.AUTHORIZE_SECONDS.observe(time.perf_counter() - t0)
    if d.reason == "call_closed":
        # Not a deny reason of the contract: a client re-using a call_id that hung up.
        metrics.AUTHORIZE_DECISIONS.labels("error", "call_closed").inc()
        raise ApiError(409, "call_closed", "this call_id has already hung up", "call_id")
    metrics.AUTHORIZE_DECISIONS.labels(d.decision, d.reason).inc()
    out = AuthorizationOut(
        decision=d.decision,
        reason=d.reason,  # type: ignore[arg-type]  # one of Reason; pydantic checks it
        max_duration_s=d.max_duration_s,
        reservation_id=d.reservation_id,
        expires_at=d.expires_at,
    )
    return out.model_dump_json().encode()


# --- the fast path ----------------------------------------------------------------------------


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
        extra: dict[str, str] = {}
        try:
            services: ApiServices = self.app.state.services
            deadline = authorize_deadline(services)
            header = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    header = value.decode("latin-1")
                    break
            key = await authenticate_by(services, header, deadline)
            payload = await authorize_json(services, key, await _read_body(receive), deadline)
            status = 200
        except ApiError as e:
            status, extra = e.status, e.headers
            payload = api_errors.error_body(e.code, e.message, e.field)
        except _ClientGone:
            return
        except Exception:
            # What Starlette's ServerErrorMiddleware does for the other routes.
            log.exception("authorization failed")
            status, payload = 500, api_errors.error_body("internal", "internal error")
        headers = [_JSON, (b"content-length", b"%d" % len(payload))]
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        start: Message = {"type": "http.response.start", "status": status, "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": payload})


# --- FastAPI ------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key: `mk_<key id>_<secret>`")


async def _caller(request: Request, _: Annotated[object, Security(_bearer)]) -> ApiKey:
    # HTTPBearer is there for the OpenAPI document; the header is read as the fast path does.
    services: ApiServices = request.app.state.services
    return await authenticate(services.keys, bearer_token(request.headers.get("authorization")))


# Module level: FastAPI resolves these (string) annotations in the module's namespace.
Caller = Annotated[ApiKey, Depends(_caller)]
AccountPath = Annotated[str, Path(pattern=ACCOUNT_ID_PATTERN)]


async def _body(request: Request, model: type[_M], *, optional: bool = False) -> _M:
    # Parsed here rather than as a FastAPI body parameter: FastAPI would decode the JSON before
    # the key is checked (a stranger's bad body would get 400, not 401).
    return parse_body(await request.body(), model, optional=optional)


def _body_doc(model: type[BaseModel], *, required: bool = True) -> dict[str, object]:
    # Bodies parsed by hand are invisible to FastAPI: describe them in the OpenAPI document.
    schema = model.model_json_schema(by_alias=True)
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }


async def _redis(work: Awaitable[_T], deadline_s: float) -> _T:
    try:
        async with asyncio.timeout(deadline_s):
            return await work
    except (TimeoutError, *REDIS_DOWN) as exc:
        raise api_errors.balance_store_unavailable(
            f"the balance store did not answer within {deadline_s} s; retry"
        ) from exc


async def _db(work: Awaitable[_T]) -> _T:
    # In a task of its own: a query cancelled by the bound waits for the server to confirm the
    # cancel (asyncpg), which a stalled server never does; the request answers at the bound,
    # and the task finishes its cancellation in the background.
    task = asyncio.ensure_future(work)
    try:
        async with asyncio.timeout(_DB_TIMEOUT_S):
            return await asyncio.shield(task)
    except (TimeoutError, *_DB_DOWN) as exc:
        raise api_errors.database_unavailable() from exc
    finally:
        if not task.done():
            task.cancel()
            _LET_GO.add(task)
            task.add_done_callback(_let_go)


def _let_go(task: asyncio.Future[Any]) -> None:
    _LET_GO.discard(task)
    if not task.cancelled():
        task.exception()  # seen: the request that wanted it has answered already


def asgi_app(settings: Settings, services: ApiServices | None = None) -> AuthorizeFastPath:
    """What to serve: ``create_app``'s API behind ``AuthorizeFastPath``."""
    return AuthorizeFastPath(create_app(settings, services))


def create_app(settings: Settings, services: ApiServices | None = None) -> FastAPI:
    """The API on ``services``; without them it connects per ``settings`` at startup and closes
    at shutdown (the lifespan). Serve it behind ``AuthorizeFastPath`` (``asgi_app``)."""

    @contextlib.asynccontextmanager
    async def lifespan(started: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            yield
            return
        async with connect_api(settings) as made:
            started.state.services = made
            # A process of its own (``meter run api``): as in the metering worker, what startup
            # built is frozen out of the collector's sight and young collections are rarer.
            # Each request's garbage dies by reference count; walking the whole heap every few
            # hundred requests showed up as tail latency.
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
            yield

    app = FastAPI(
        title="meter",
        summary="Real-time metering and prepaid balance enforcement",
        version="1",
        lifespan=lifespan,
    )
    api_errors.install(app)
    app.state.services = services  # set by the lifespan when None

    def current() -> ApiServices:
        svc: ApiServices = app.state.services
        return svc

    deadline = settings.authorize_deadline_s

    @app.post(
        AUTHORIZATIONS,
        response_model=AuthorizationOut,
        responses=api_errors.responses(400, 401, 403, 413, 422, 503),
        openapi_extra=_body_doc(AuthorizationIn),
        summary="May this call connect, and for how long",
    )
    async def authorize(request: Request, _: Annotated[object, Security(_bearer)]) -> Response:
        """Allowing reserves credit for the first grant; concurrent calls of an account never
        together reserve more than its available credit. Idempotent per ``call_id``: a retry
        gets the first answer. A deny is a 200 answer (unknown accounts included). Answered
        within ``authorize_deadline_s``, the key check included, or 503."""
        svc = current()
        # The key is checked here rather than by the ``Caller`` dependency: within the
        # authorization's deadline, as the fast path does.
        deadline = authorize_deadline(svc)
        key = await authenticate_by(svc, request.headers.get("authorization"), deadline)
        payload = await authorize_json(svc, key, await request.body(), deadline)
        return Response(payload, media_type="application/json")

    async def account_state(account_id: str) -> AccountState:
        """The account's Redis state, rebuilt from PostgreSQL first if Redis lost it."""
        svc = current()
        loop = asyncio.get_running_loop()
        looked = loop.time()
        st = await _redis(svc.balances.get(account_id), deadline)
        if st is None:
            # The authorizer's rebuild: one per account at a time, shared with the
            # authorizations that met the same loss.
            try:
                await svc.authorizer.restore(
                    account_id, since=looked, deadline=loop.time() + _DB_TIMEOUT_S
                )
            except DatabaseUnavailable as exc:
                raise api_errors.database_unavailable() from exc
            except BalanceStoreUnavailable as exc:
                raise api_errors.balance_store_unavailable(f"{exc}; retry") from exc
            st = await _redis(svc.balances.get(account_id), deadline)
            if st is None:
                raise api_errors.balance_store_unavailable("account state missing; retry")
        return st

    async def known(account_id: str) -> str:
        """The account's currency; 404 when there is no such account."""
        currency = await _db(
            current().pool.fetchval("SELECT currency FROM accounts WHERE id = $1", account_id)
        )
        if currency is None:
            raise ApiError(404, "account_not_found", f"no account {account_id!r}", "account_id")
        return str(currency)

    @app.get(
        "/v1/accounts/{account_id}/balance",
        response_model=BalanceOut,
        responses=api_errors.responses(401, 403, 404, 422, 503),
        summary="The account's balance, pending reservations and available credit",
    )
    async def balance(account_id: AccountPath, key: Caller) -> BalanceOut:
        may_act(key, account_id, ("service", "admin", "user"))
        currency = await known(account_id)
        st = await account_state(account_id)
        return BalanceOut(
            balance=format_money(st.balance),
            pending=format_money(st.reserved),
            credit_limit=format_money(st.credit_limit),
            available_credit=format_money(st.available),
            currency=currency,
            status=st.status,
        )

    async def set_status(
        request: Request, account_id: str, key: ApiKey, action: Literal["suspend", "resume"]
    ) -> StatusOut:
        may_act(key, account_id, ("admin",))
        body = await _body(request, StatusIn, optional=True)
        await known(account_id)
        svc = current()
        # Load a lost Redis state *before* the flag changes: loaded afterwards it would already
        # be suspended, and the suspend signal would never be queued.
        await account_state(account_id)
        # PostgreSQL first: it is the book of record, and Redis is rebuilt from it. A failure
        # between the two is repaired by retrying the request (both steps are idempotent).
        await _db(
            svc.pool.execute(
                "UPDATE accounts SET suspended = $2,"
                " hold_reason = CASE WHEN $2 THEN hold_reason END WHERE id = $1",
                account_id,
                action == "suspend",
            )
        )
        change = await _redis(svc.balances.set_status(account_id, action, body.reason), deadline)
        if change is None:
            raise api_errors.balance_store_unavailable("account state missing; retry")
        return StatusOut(account_id=account_id, status=change.status, changed=change.changed)

    status_doc = _body_doc(StatusIn, required=False)

    @app.post(
        "/v1/accounts/{account_id}/suspend",
        response_model=StatusOut,
        responses=api_errors.responses(400, 401, 403, 404, 422, 503),
        openapi_extra=status_doc,
        summary="Block inbound and outbound calls (operator); queues account.suspend",
    )
    async def suspend(request: Request, account_id: AccountPath, key: Caller) -> StatusOut:
        """Idempotent: suspending a suspended account changes nothing (``changed`` false)."""
        return await set_status(request, account_id, key, "suspend")

    @app.post(
        "/v1/accounts/{account_id}/resume",
        response_model=StatusOut,
        responses=api_errors.responses(400, 401, 403, 404, 422, 503),
        openapi_extra=status_doc,
        summary="Lift a suspension; queues account.resume (and account.hold without credit)",
    )
    async def resume(request: Request, account_id: AccountPath, key: Caller) -> StatusOut:
        """Idempotent. The account returns to the state its credit gives (active, low, hold)."""
        return await set_status(request, account_id, key, "resume")

    @app.post(
        "/v1/accounts/{account_id}/bundles",
        response_model=BundlePurchaseOut,
        responses=api_errors.responses(400, 401, 403, 404, 409, 422, 503),
        summary="Buy an add-on minute bundle from the balance (admin); idempotent per purchase_id",
    )
    async def buy(request: Request, account_id: AccountPath, key: Caller) -> BundlePurchaseOut:
        """The price is debited and the minutes land in the account's bucket together, once
        per ``purchase_id``; 409 ``insufficient_credit`` when the credit does not cover it."""
        may_act(key, account_id, ("admin",))
        body = await _body(request, BundlePurchaseIn)
        await known(account_id)
        await account_state(account_id)  # rebuilds a lost Redis state first
        svc = current()
        try:
            p = await _redis(
                buy_bundle(svc.pool, svc.balances, account_id, body.bundle_id, body.purchase_id),
                deadline,
            )
        except BundleError as exc:
            status, field = {
                "unknown_bundle": (404, "bundle_id"),
                "unknown_account": (404, "account_id"),
                "insufficient_credit": (409, None),
            }.get(exc.reason, (409, None))
            raise ApiError(status, exc.reason, str(exc), field) from None
        return BundlePurchaseOut(
            account_id=account_id,
            purchase_id=p.purchase_id,
            bundle_id=p.bundle_id,
            minutes=p.seconds // 60,
            price=format_money(p.price),
            valid_from=p.valid_from,
            expires_at=p.expires_at,
            balance=format_money(p.balance),
            created=p.applied,
        )

    # -- payments (admin only: billing) ---------------------------------------------------------

    def payments_of() -> PaymentService:
        svc = current().payments
        if svc is None:
            raise ApiError(503, "payments_unavailable", "payments are not configured", None)
        return svc

    async def _pay(work: Awaitable[_T]) -> _T:
        """A payment request's errors as API errors (rules 422/409, stores 503)."""
        try:
            return await work
        except PolicyRefusal as exc:
            status = (
                422
                if exc.code in ("invalid_amount", "amount_below_minimum", "amount_above_maximum")
                else 409
            )
            headers = (
                {"Retry-After": str(max(1, int(exc.retry_at.timestamp() - time.time())))}
                if exc.retry_at and status == 409
                else None
            )
            raise ApiError(status, exc.code, exc.message, "amount", headers) from None
        except PaymentError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        except (RedisError, BalanceStoreError) as exc:
            raise api_errors.balance_store_unavailable("the balance store failed; retry") from exc
        except _DB_DOWN as exc:
            raise api_errors.database_unavailable() from exc

    def auto_recharge_out(account_id: str, s: RechargeSettings) -> AutoRechargeOut:
        return AutoRechargeOut(
            account_id=account_id,
            enabled=s.enabled,
            threshold_amount=format_money(s.threshold_amount),
            recharge_amount=format_money(s.recharge_amount),
            disabled_reason=s.disabled_reason,
        )

    def method_out(account_id: str, gateway: str, m: SavedMethod) -> PaymentMethodOut:
        return PaymentMethodOut(
            account_id=account_id,
            gateway=gateway,
            brand=m.brand,
            last4=m.last4,
            method_ref=m.method_ref,
        )

    def payment_out(p: Payment) -> PaymentOut:
        return PaymentOut(
            id=p.id,
            account_id=p.account_id,
            kind=p.kind,  # type: ignore[arg-type]  # the table's CHECK allows only these
            paid_for="auto_recharge" if p.kind == "auto" else "top_up",
            amount=format_money(p.amount),
            captured=format_money(p.captured),
            currency=p.currency,
            status=p.status,  # type: ignore[arg-type]
            reason=p.reason,
            message=p.message,
            method=p.method,
            created_at=p.created_at,
            credited=p.credited_at is not None,
        )

    @app.put(
        "/v1/accounts/{account_id}/auto_recharge",
        response_model=AutoRechargeOut,
        responses=api_errors.responses(400, 401, 403, 404, 422, 503),
        openapi_extra=_body_doc(AutoRechargeIn),
        summary="Auto-recharge settings (admin): recharge when credit falls to the threshold",
    )
    async def put_auto_recharge(
        request: Request, account_id: AccountPath, key: Caller
    ) -> AutoRechargeOut:
        """Turned on while the account is already at or below the threshold, a recharge is
        triggered at once. Repeatable: the same body twice changes nothing more."""
        may_act(key, account_id, ("admin",))
        body = await _body(request, AutoRechargeIn)
        await known(account_id)
        await account_state(account_id)  # rebuilds a lost Redis state first
        s = await _pay(
            payments_of().set_auto_recharge(
                account_id, body.enabled, body.threshold_amount, body.recharge_amount
            )
        )
        return auto_recharge_out(account_id, s)

    @app.get(
        "/v1/accounts/{account_id}/auto_recharge",
        response_model=AutoRechargeOut,
        responses=api_errors.responses(401, 403, 404, 503),
        summary="Auto-recharge settings (admin); disabled_reason says if the service turned it off",
    )
    async def get_auto_recharge(account_id: AccountPath, key: Caller) -> AutoRechargeOut:
        may_act(key, account_id, ("admin",))
        await known(account_id)
        s = await _pay(payments_of().auto_recharge(account_id))
        if s is None:
            raise ApiError(404, "not_found", "auto-recharge was never set for this account")
        return auto_recharge_out(account_id, s)

    @app.put(
        "/v1/accounts/{account_id}/payment_method",
        response_model=PaymentMethodOut,
        status_code=201,
        responses=api_errors.responses(400, 401, 403, 404, 409, 422, 503),
        openapi_extra=_body_doc(PaymentMethodIn),
        summary="Save the account's one payment method (admin); 409 while one is saved",
    )
    async def put_method(
        request: Request, account_id: AccountPath, key: Caller
    ) -> PaymentMethodOut:
        """Replacing a method means deleting the saved one first."""
        may_act(key, account_id, ("admin",))
        body = await _body(request, PaymentMethodIn)
        await known(account_id)
        svc = payments_of()
        m = await _pay(svc.save_method(account_id, body.token))
        return method_out(account_id, svc.gateway_name, m)

    @app.get(
        "/v1/accounts/{account_id}/payment_method",
        response_model=PaymentMethodOut,
        responses=api_errors.responses(401, 403, 404, 503),
        summary="The saved payment method (admin)",
    )
    async def get_method(account_id: AccountPath, key: Caller) -> PaymentMethodOut:
        may_act(key, account_id, ("admin",))
        await known(account_id)
        svc = payments_of()
        m = await _pay(svc.saved_method(account_id))
        if m is None:
            raise ApiError(404, "not_found", "the account has no saved payment method")
        return method_out(account_id, svc.gateway_name, m)

    @app.delete(
        "/v1/accounts/{account_id}/payment_method",
        status_code=204,
        responses=api_errors.responses(401, 403, 404, 503),
        summary="Delete the saved payment method (admin); auto-recharge cannot charge until "
        "another is saved",
    )
    async def delete_method(account_id: AccountPath, key: Caller) -> Response:
        may_act(key, account_id, ("admin",))
        await known(account_id)
        if not await _pay(payments_of().delete_method(account_id)):
            raise ApiError(404, "not_found", "the account has no saved payment method")
        return Response(status_code=204)

    @app.post(
        "/v1/accounts/{account_id}/payments",
        response_model=PaymentOut,
        status_code=201,
        responses=api_errors.responses(400, 401, 402, 403, 404, 409, 422, 503),
        openapi_extra=_body_doc(PaymentIn),
        summary="A manual top-up (admin): charge the saved method and credit what it captured",
    )
    async def pay(request: Request, account_id: AccountPath, key: Caller) -> Response:
        """Idempotent per ``payment_id``. Limits: at least 10.00, whole cents; a new account
        may pay 100.00 on its first day, 50.00 more each day after (level-2 verification lifts
        it): 409 ``payment_limit_exceeded`` with ``Retry-After``. A declined card is 402
        ``card_declined`` (the payment is in the history with its decline code). When the
        gateway's answer is lost the payment is ``pending`` (202): it is settled in the
        background with the same idempotency key, never charged twice."""
        may_act(key, account_id, ("admin",))
        body = await _body(request, PaymentIn)
        await known(account_id)
        await account_state(account_id)
        svc = payments_of()
        if body.payment_method is not None:
            saved = await _pay(svc.saved_method(account_id))
            if saved is None or saved.method_ref != body.payment_method:
                raise ApiError(
                    409,
                    "payment_method_mismatch",
                    "payment_method is not the account's saved method",
                    "payment_method",
                )
        p = await _pay(svc.top_up(account_id, body.amount, body.payment_id))
        if p.status == "declined":
            raise ApiError(402, "card_declined", f"the card was declined ({p.reason}): {p.message}")
        if p.status == "failed":
            raise ApiError(
                503,
                "gateway_unavailable",
                f"the payment gateway refused: {p.message}",
                None,
                _RETRY,
            )
        out = payment_out(p)
        return Response(
            out.model_dump_json().encode(),
            status_code=202 if p.status == "pending" else 201,
            media_type="application/json",
        )

    @app.get(
        "/v1/accounts/{account_id}/payments",
        response_model=PaymentsOut,
        responses=api_errors.responses(401, 403, 404, 503),
        summary="Payment history (admin): top-ups and auto-recharges, newest first",
    )
    async def history(account_id: AccountPath, key: Caller) -> PaymentsOut:
        may_act(key, account_id, ("admin",))
        await known(account_id)
        ps = await _pay(payments_of().payments(account_id))
        return PaymentsOut(account_id=account_id, payments=[payment_out(p) for p in ps])

    return app
