"""The ``api`` fixture (tests/api.py) and people who sign in to the portal."""

from __future__ import annotations

import re
import secrets

import httpx

from portal.sessions import Sessions
from tests.api import Api, api

__all__ = ["api", "csrf_of", "person", "sign_in"]

PASSWORD = "correct horse battery staple"


async def person(
    api: Api,
    account_id: str | None,
    role: str,
    privileges: tuple[str, ...] = (),
    *,
    email: str | None = None,
) -> str:
    """A user of ``account_id`` (an operator: None) with ``role``, in a group with
    ``privileges``, whose portal password is ``PASSWORD``; returns its email."""
    user_id = "usr_" + secrets.token_hex(8)
    email = email or f"{user_id}@example.com"
    pool = api.svc.pool
    await pool.execute(
        "INSERT INTO users (id, account_id, email, role) VALUES ($1, $2, $3, $4)",
        user_id,
        account_id,
        email,
        role,
    )
    if privileges:
        group_id = "grp_" + secrets.token_hex(8)
        await pool.execute(
            "INSERT INTO access_groups (id, account_id, name, privileges) VALUES ($1, $2, $3, $4)",
            group_id,
            account_id,
            group_id,
            list(privileges),
        )
        await pool.execute(
            "INSERT INTO access_group_members (group_id, user_id) VALUES ($1, $2)",
            group_id,
            user_id,
        )
    await Sessions(pool).set_password(user_id, PASSWORD)
    return email


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


async def sign_in(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> httpx.Response:
    """Sign in through the form as a browser would (its CSRF cookie and field)."""
    form = await client.get("/portal/signin")
    return await client.post(
        "/portal/signin",
        data={"csrf": csrf_of(form.text), "email": email, "password": password},
    )
