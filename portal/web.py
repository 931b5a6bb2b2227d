"""The portal's plumbing: its router, sign-in and sign-out, the session cookie, CSRF, the
templates and how an API error becomes a page.

- **Session cookie** ``meter_session``: HttpOnly, SameSite=Lax, Path=/portal, ``Secure`` when
  ``Settings.portal_secure_cookies`` (set it where the API is served over TLS); its token is
  looked up in ``portal.sessions`` at every request.
- **CSRF**: every form carries its session's token in a hidden ``csrf`` field; a post without
  it, or with another, is refused (403 ``csrf_failed``) before anything is read. The sign-in
  form, before any session, carries a token that must equal its own cookie
  (``meter_signin``, double submit). SameSite=Lax keeps the session cookie off cross-site
  posts as a second line.
- **Who**: a page acts as the session's user, a ``Principal`` the API's own rules judge
  (``infra.http.access``); pages call the API's routes themselves (``portal.calls``).
- **Errors**: an ``ApiError`` a route raised becomes the page's message, with the route's own
  status (403 stays 403); no session is a redirect to the sign-in page.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from enforcement.http.services import ApiServices
from infra.http.access import Permission
from infra.http.callers import Principal
from infra.http.errors import ApiError
from infra.settings import Settings
from portal import passwords
from portal.sessions import Session, Sessions, SignInRefused
from recharge.routes import PaymentsHost

SESSION_COOKIE: Final = "meter_session"
SIGNIN_COOKIE: Final = "meter_signin"
#: Every page's headers: nothing cached, never framed, scripts and styles of the portal only.
_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
}
#: A form's fields, bounded: nothing a person types is longer.
_MAX_FIELDS: Final = 50
_MAX_FIELD: Final = 1000


@runtime_checkable
class Host(PaymentsHost, Protocol):
    """What the app serving the portal keeps as ``app.state.services``: the API's services
    (``ApiServices``) that also serve payments' routes (``meter.apiserver.ServedServices``)."""


@dataclass(frozen=True, slots=True)
class Config:
    secure_cookies: bool
    session_ttl_s: int
    max_failures: int
    lockout_s: int

    @classmethod
    def of(cls, settings: Settings) -> Config:
        return cls(
            settings.portal_secure_cookies,
            settings.portal_session_ttl_s,
            settings.portal_max_failures,
            settings.portal_lockout_s,
        )


@dataclass(frozen=True, slots=True)
class Ctx:
    """One page request: who asks (``session``, ``who``) and what the API runs on."""

    request: Request
    session: Session
    who: Principal
    svc: ApiServices
    host: PaymentsHost
    sessions: Sessions


class SignInFirst(Exception):
    """No live session: the browser is sent to the sign-in page."""


_ENV: Final = jinja2.Environment(
    loader=jinja2.PackageLoader("portal", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def money(amount: str | None, currency: str) -> str:
    """A decimal string with its currency, e.g. ``12.50 USD``; absent stays absent."""
    return "" if amount is None else f"{amount} {currency}"


_ENV.filters["money"] = money


def render(
    template: str, status: int = 200, *, headers: Mapping[str, str] | None = None, **values: Any
) -> HTMLResponse:
    body = _ENV.get_template(template).render(**values)
    return HTMLResponse(body, status_code=status, headers={**_HEADERS, **(headers or {})})


def _config(request: Request) -> Config:
    config: Config = request.state.portal
    return config


def services(request: Request) -> tuple[ApiServices, PaymentsHost]:
    svc = request.app.state.services
    if not isinstance(svc, ApiServices) or not isinstance(svc, Host):
        raise ApiError(503, "portal_unavailable", "the portal needs the one API's services")
    return svc, svc


def sessions_of(request: Request) -> Sessions:
    svc, _ = services(request)
    c = _config(request)
    return Sessions(
        svc.pool,
        clock=svc.clock,
        ttl_s=c.session_ttl_s,
        max_failures=c.max_failures,
        lockout_s=c.lockout_s,
    )


async def context(request: Request) -> Ctx:
    """The signed-in person's request; ``SignInFirst`` without a live session."""
    store = sessions_of(request)
    session = await store.session(request.cookies.get(SESSION_COOKIE, ""))
    if session is None:
        raise SignInFirst()
    svc, host = services(request)
    return Ctx(request, session, Principal(session.key, svc.directory), svc, host, store)


async def may(ctx: Ctx, account_id: str, permission: Permission) -> bool:
    """Whether the person holds ``permission`` on the account (what a control shows)."""
    try:
        await ctx.who.on(account_id, permission)
    except ApiError:
        return False
    return True


def may_anywhere(ctx: Ctx, permission: Permission) -> bool:
    try:
        ctx.who.anywhere(permission)
    except ApiError:
        return False
    return True


async def form(ctx: Ctx) -> FormData:
    """The posted form, once its CSRF token is the session's (else 403 ``csrf_failed``)."""
    data = await ctx.request.form(max_files=0, max_fields=_MAX_FIELDS)
    sent = data.get("csrf")
    if not isinstance(sent, str) or not hmac.compare_digest(sent, ctx.session.csrf):
        raise ApiError(403, "csrf_failed", "the form had no valid CSRF token: reload the page")
    for value in data.values():
        if isinstance(value, str) and len(value) > _MAX_FIELD:
            raise ApiError(422, "validation_error", "a field is too long")
    return data


def field(data: FormData, name: str) -> str:
    value = data.get(name)
    return value.strip() if isinstance(value, str) else ""


def whole(text: str) -> int | str:
    """A form field holding a whole number, as the API's body takes it: ASCII digits as an int,
    anything else as it came (``str.isdigit`` alone would take "²", which ``int`` refuses),
    for the route's own validation to answer with its 4xx."""
    return int(text) if text.isascii() and text.isdigit() else text


def error_page(exc: ApiError, ctx: Ctx | None = None) -> HTMLResponse:
    return render(
        "error.html",
        exc.status,
        ctx=ctx,
        error=exc,
        error_page=True,
        nav=[],
        headers=exc.headers if exc.status in (409, 503) else None,
    )


Handler = Callable[..., Awaitable[Response]]


def html(handler: Handler) -> Handler:
    """A page: ``ApiError`` shown as a page with its status; no session, the sign-in page."""

    @functools.wraps(handler)
    async def page(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except SignInFirst:
            request: Request = kwargs["request"]
            target = quote(request.url.path, safe="/")
            return RedirectResponse(f"/portal/signin?next={target}", status_code=303)
        except ApiError as exc:
            return error_page(exc)

    return page


def see(url: str, notice: str | None = None) -> RedirectResponse:
    """After a post that did what it should: to ``url`` (a page of the portal)."""
    return RedirectResponse(url + (f"?notice={notice}" if notice else ""), status_code=303)


def shown_in_place(exc: ApiError) -> bool:
    """A refusal its page shows in place; a 403 is the error page, with its status."""
    return exc.status != 403


async def act(
    work: Awaitable[object],
    redisplay: Callable[..., Awaitable[Response]],
    done: str,
    notice: str,
    *,
    shown: Callable[[ApiError], bool] = shown_in_place,
) -> Response:
    """A form's post: ``work`` (the API's routes it calls), then to ``done`` with ``notice``;
    a refusal ``shown`` in place redisplays the page (``redisplay(error=, status=)``) with it
    and its status, any other is raised (the error page)."""
    try:
        await work
    except ApiError as exc:
        if not shown(exc):
            raise
        return await redisplay(error=exc, status=exc.status)
    return see(done, notice)


# --- sign-in ------------------------------------------------------------------------------------

auth = APIRouter()


def _safe_next(target: str) -> str:
    # Only a path of the portal: never another site (an open redirect).
    if target.startswith("/portal/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/portal/"


def _signin_page(
    request: Request, status: int = 200, message: str | None = None, email: str = ""
) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(
        "signin.html",
        status,
        ctx=None,
        nav=[],
        csrf=token,
        message=message,
        email=email,
        next=_safe_next(request.query_params.get("next", "/portal/")),
        min_length=passwords.MIN_LENGTH,
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        max_age=3600,
        path="/portal/signin",
        httponly=True,
        samesite="lax",
        secure=_config(request).secure_cookies,
    )
    return response


@auth.get("/portal/signin")
async def signin_form(request: Request) -> Response:
    return _signin_page(request)


@auth.post("/portal/signin")
async def signin(request: Request) -> Response:
    data = await request.form(max_files=0, max_fields=_MAX_FIELDS)
    sent, cookie = data.get("csrf"), request.cookies.get(SIGNIN_COOKIE, "")
    if not isinstance(sent, str) or not cookie or not hmac.compare_digest(sent, cookie):
        return _signin_page(request, 403, "The form had expired: sign in again.")
    email, password = field(data, "email"), data.get("password")
    if not isinstance(password, str) or not email or len(email) > 254:
        return _signin_page(request, 422, "Give your email and your password.", email[:254])
    try:
        token, session = await sessions_of(request).sign_in(email, password)
    except SignInRefused as exc:
        if exc.code == "locked":
            until = exc.until.strftime("%H:%M UTC") if exc.until else "later"
            message = (
                "Too many wrong passwords: sign-in for this user is locked until "
                f"{until}. An administrator can set a new password meanwhile."
            )
            return _signin_page(request, 429, message, email)
        return _signin_page(request, 401, "That email and password do not match.", email)
    response = RedirectResponse(_safe_next(field(data, "next")), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=_config(request).session_ttl_s,
        path="/portal",
        httponly=True,
        samesite="lax",
        secure=_config(request).secure_cookies,
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/portal/signin")
    del session
    return response


@auth.post("/portal/signout")
@html
async def signout(request: Request) -> Response:
    ctx = await context(request)
    await form(ctx)
    await ctx.sessions.sign_out(request.cookies.get(SESSION_COOKIE, ""))
    response = RedirectResponse("/portal/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/portal")
    return response


_STATIC: Final = {"portal.css": "text/css", "portal.js": "text/javascript"}


@auth.get("/portal/static/{name}")
async def static(name: str) -> Response:
    media = _STATIC.get(name)
    if media is None:
        return Response(status_code=404)
    body = resources.files("portal").joinpath("static", name).read_bytes()
    return Response(body, media_type=media, headers={"Cache-Control": "max-age=300"})


def router(settings: Settings, *pages: APIRouter) -> APIRouter:
    """The portal's routes (none in the OpenAPI document: they are pages, not the API)."""
    config = Config.of(settings)

    async def configured(request: Request) -> None:
        request.state.portal = config

    top = APIRouter(include_in_schema=False, dependencies=[Depends(configured)])
    top.include_router(auth)
    for p in pages:
        top.include_router(p)
    return top
