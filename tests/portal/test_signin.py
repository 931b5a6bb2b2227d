"""Sign-in, sessions, CSRF and the lockout, through the served API (httpx, in-process): the
cookie's attributes, a form without its token refused, a session that acts as its user is now,
sign-out, and the bounded lockout."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from infra.settings import Settings
from meter.apiserver import asgi_app
from portal.passwords import WeakPassword
from portal.sessions import Sessions
from tests.api import Api
from tests.helpers import run_meter
from tests.portal.conftest import PASSWORD, csrf_of, person, sign_in


def client_of(api: Api) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi_app(api.settings, api.svc)),
        base_url="http://meter",
    )


async def test_a_person_signs_in_sees_its_balance_and_signs_out(api: Api) -> None:
    await api.seed("ten", balance="42.50")
    email = await person(api, "ten", "admin")
    async with client_of(api) as c:
        r = await c.get("/portal/a/ten")
        assert r.status_code == 303 and r.headers["location"].startswith("/portal/signin")
        r = await sign_in(c, email)
        assert r.status_code == 303, r.text
        cookie = r.headers["set-cookie"]
        assert "meter_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Secure" not in cookie  # not over TLS here: portal_secure_cookies is off
        r = await c.get("/portal/", follow_redirects=True)
        assert r.status_code == 200 and "42.50 USD" in r.text, r.text
        assert "form-action 'self'" in r.headers["content-security-policy"]
        r = await c.post("/portal/signout", data={"csrf": csrf_of(r.text)})
        assert r.status_code == 303
        c.cookies.clear()
        # The old cookie opens nothing once signed out.
        c.cookies.set("meter_session", cookie.split(";")[0].split("=", 1)[1], path="/portal")
        assert (await c.get("/portal/a/ten")).status_code == 303


async def test_the_cookie_is_secure_where_the_setting_says_tls(api: Api) -> None:
    await api.seed("ten")
    email = await person(api, "ten", "admin")
    settings: Settings = replace(api.settings, portal_secure_cookies=True)
    app = asgi_app(settings, api.svc)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://meter"
    ) as c:
        r = await sign_in(c, email)
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(api: Api) -> None:
    await api.seed("ten")
    email = await person(api, "ten", "admin")
    async with client_of(api) as c:
        await sign_in(c, email)
        for data in ({}, {"csrf": "not-the-token"}):
            r = await c.post("/portal/a/ten/status", data={**data, "action": "suspend"})
            assert r.status_code == 403 and "csrf_failed" in r.text
        r = await c.post("/portal/signout", data={})
        assert r.status_code == 403
        st = await api.client.get("/v1/accounts/ten/balance", headers=await api.key("ten", "admin"))
        assert st.json()["status"] == "active"
        # The sign-in form has its own token (double submit): without it, no sign-in.
        c.cookies.clear()
        r = await c.post("/portal/signin", data={"email": email, "password": PASSWORD})
        assert r.status_code == 403 and "meter_session" not in r.headers.get("set-cookie", "")


async def test_a_session_acts_as_its_user_is_now(api: Api) -> None:
    await api.seed("ten")
    email = await person(api, "ten", "admin")
    async with client_of(api) as c:
        await sign_in(c, email)
        assert (await c.get("/portal/a/ten/billing")).status_code == 200
        await api.svc.pool.execute("UPDATE users SET role = 'user' WHERE email = $1", email)
        assert (await c.get("/portal/a/ten/billing")).status_code == 403
        await api.svc.pool.execute("UPDATE users SET disabled_at = now() WHERE email = $1", email)
        assert (await c.get("/portal/a/ten")).status_code == 303  # to the sign-in page


async def test_wrong_passwords_lock_the_sign_in_for_a_bounded_time(api: Api) -> None:
    await api.seed("ten")
    email = await person(api, "ten", "admin")
    async with client_of(api) as c:
        r = await sign_in(c, "nobody@example.com")
        assert r.status_code == 401 and "do not match" in r.text
        for _ in range(api.settings.portal_max_failures - 1):
            assert (await sign_in(c, email, "wrong password, long enough")).status_code == 401
        r = await sign_in(c, email, "wrong password, long enough")
        assert r.status_code == 429 and "locked" in r.text
        # Locked: even the right password is refused, until the lock lapses.
        assert (await sign_in(c, email)).status_code == 429
        await api.svc.pool.execute(
            "UPDATE user_passwords SET locked_until = now() - interval '1 second'"
        )
        assert (await sign_in(c, email)).status_code == 303
        # A new password (meter users passwd) also unlocks, and ends the sessions.
        user_id = await api.svc.pool.fetchval("SELECT id FROM users WHERE email = $1", email)
        await Sessions(api.svc.pool).set_password(user_id, "another long passphrase")
        assert (await c.get("/portal/a/ten")).status_code == 303


async def test_a_short_password_is_refused(api: Api) -> None:
    await api.seed("ten")
    await person(api, "ten", "admin")
    user_id = await api.svc.pool.fetchval("SELECT id FROM users LIMIT 1")
    with pytest.raises(WeakPassword):
        await Sessions(api.svc.pool).set_password(user_id, "short")
    stored = await api.svc.pool.fetchval("SELECT hash FROM user_passwords")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


async def test_meter_users_passwd_sets_the_first_operators_password(api: Api) -> None:
    async def meter(*args: str, stdin: bytes = b"") -> tuple[int, str]:
        code, _, err = await run_meter(
            api.settings.redis_url, api.settings.database_url, *args, stdin=stdin
        )
        return code, err

    code, _ = await meter("users", "create", "--email", "op@example.com", "--role", "operator")
    assert code == 0
    assert (await meter("users", "passwd", "--email", "op@example.com", stdin=b"short\n"))[0] == 2
    code, err = await meter(
        "users", "passwd", "--email", "op@example.com", stdin=b"%s\n" % PASSWORD.encode()
    )
    assert code == 0 and "password set" in err
    assert (await meter("users", "passwd", "--email", "nobody@example.com", stdin=b"x" * 20))[
        0
    ] == 1
    async with client_of(api) as c:
        r = await sign_in(c, "op@example.com")
        assert r.status_code == 303
        assert (await c.get("/portal/")).headers["location"] == "/portal/console"
