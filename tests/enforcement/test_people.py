"""The people of an account through the API that ``meter run api`` serves, on the real
PostgreSQL and Redis: users, access groups and their privileges reaching the users' keys,
disabling, keys made, listed and revoked, who may manage whom (tenants, managers, operators),
hostile input, pagination, ``GET /v1/me``, and the ``meter users`` / ``meter keys`` commands."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from balance.accounts import AccountSpec, create_accounts
from enforcement.people import People, UserRole
from infra.http.api_keys import ApiKeys
from meter.commands import accounts as commands
from meter.parser import build_parser
from tests.api import Api, assert_error

Headers = dict[str, str]


def bearer(key: str) -> Headers:
    return {"Authorization": f"Bearer {key}"}


async def person(
    api: Api, account_id: str | None, role: UserRole, email: str | None = None
) -> tuple[str, Headers]:
    """A user of the account (an operator: None) and a key acting as it, made as the CLI
    makes them."""
    n = await api.svc.pool.fetchval("SELECT count(*) FROM users")
    u = await People(api.svc.pool).create_user(
        account_id,
        email or f"p{n}@example.com",
        role,
    )
    _, key = await api.svc.keys.create(account_id, u.role, user_id=u.id)
    return u.id, bearer(key)


async def add_user(api: Api, admin: Headers, account_id: str, email: str, role: str) -> str:
    r = await api.client.post(
        f"/v1/accounts/{account_id}/users",
        json={"email": email, "role": role, "name": "Ada"},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def add_key(api: Api, admin: Headers, account_id: str, user_id: str) -> Headers:
    r = await api.client.post(
        f"/v1/accounts/{account_id}/keys", json={"user_id": user_id}, headers=admin
    )
    assert r.status_code == 201, r.text
    return bearer(r.json()["key"])


async def payments(api: Api, account_id: str, headers: Headers) -> int:
    """The status of reading the payment history: billing.read (admins, edit_billing)."""
    r = await api.client.get(f"/v1/accounts/{account_id}/payments", headers=headers)
    return r.status_code


async def managers(api: Api) -> None:
    """``boss`` manages ``sub``; ``other`` is nobody's."""
    await api.seed("boss", "other")
    await create_accounts(
        api.svc.pool, api.svc.balances, [AccountSpec(id="sub", manager_id="boss")]
    )
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'boss'")


async def test_an_access_group_gives_its_members_billing_and_taking_them_out_takes_it_away(
    api: Api,
) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    r = await api.client.post(
        "/v1/accounts/acc_a/users",
        json={"email": "Ada.Lovelace@Example.COM", "name": "Ada", "role": "user"},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    ada = r.json()
    assert ada["email"] == "ada.lovelace@example.com" and ada["role"] == "user"
    assert ada["id"].startswith("usr_") and ada["disabled_at"] is None
    ada_key = await add_key(api, admin, "acc_a", ada["id"])
    assert await payments(api, "acc_a", ada_key) == 403

    r = await api.client.post(
        "/v1/accounts/acc_a/access_groups",
        json={"name": "Billing", "privileges": ["edit_billing", "edit_billing"]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    group = r.json()
    assert group["privileges"] == ["edit_billing"] and group["members"] == []
    members = f"/v1/accounts/acc_a/access_groups/{group['id']}/members"
    r = await api.client.put(members, json={"user_ids": [ada["id"]]}, headers=admin)
    assert r.status_code == 200 and r.json()["members"] == [ada["id"]], r.text
    # This process dropped the member's cached key: the privilege is there at once.
    assert await payments(api, "acc_a", ada_key) == 200
    # Billing, not everything: people stay the admins'.
    r = await api.client.get("/v1/accounts/acc_a/users", headers=ada_key)
    assert_error(r, 403, "forbidden")

    r = await api.client.get(f"/v1/accounts/acc_a/access_groups/{group['id']}", headers=admin)
    assert r.json()["members"] == [ada["id"]]
    r = await api.client.put(members, json={"user_ids": []}, headers=admin)
    assert r.status_code == 200 and r.json()["members"] == []
    assert await payments(api, "acc_a", ada_key) == 403

    # Back in, then the group's privileges replaced, then the group deleted.
    await api.client.put(members, json={"user_ids": [ada["id"]]}, headers=admin)
    assert await payments(api, "acc_a", ada_key) == 200
    group_url = f"/v1/accounts/acc_a/access_groups/{group['id']}"
    r = await api.client.patch(group_url, json={"privileges": ["view_billing_unit"]}, headers=admin)
    assert r.status_code == 200 and r.json()["name"] == "Billing", r.text
    assert await payments(api, "acc_a", ada_key) == 403
    await api.client.patch(group_url, json={"privileges": ["edit_billing"]}, headers=admin)
    assert await payments(api, "acc_a", ada_key) == 200
    r = await api.client.delete(group_url, headers=admin)
    assert r.status_code == 204
    assert await payments(api, "acc_a", ada_key) == 403
    assert_error(await api.client.get(group_url, headers=admin), 404, "group_not_found", "group_id")
    assert_error(
        await api.client.delete(group_url, headers=admin), 404, "group_not_found", "group_id"
    )


async def test_another_process_sees_a_change_within_its_key_cache(api: Api) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    ada = await add_user(api, admin, "acc_a", "ada@example.com", "admin")
    key = (await add_key(api, admin, "acc_a", ada))["Authorization"].removeprefix("Bearer ")
    elsewhere = ApiKeys(api.svc.pool)  # another API process's cache
    assert (await elsewhere.authenticate(key)) is not None
    r = await api.client.delete(f"/v1/accounts/acc_a/users/{ada}", headers=admin)
    assert r.status_code == 200
    assert (await elsewhere.authenticate(key)) is not None  # up to api_key_cache_s
    elsewhere.forget()
    assert (await elsewhere.authenticate(key)) is None


async def test_a_disabled_user_s_keys_answer_401_and_a_demoted_admin_loses_billing(
    api: Api,
) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    bob = await add_user(api, admin, "acc_a", "bob@example.com", "admin")
    bob_key = await add_key(api, admin, "acc_a", bob)
    assert await payments(api, "acc_a", bob_key) == 200
    url = f"/v1/accounts/acc_a/users/{bob}"

    r = await api.client.patch(url, json={"role": "user"}, headers=admin)
    assert r.status_code == 200 and r.json()["role"] == "user" and r.json()["name"] == "Ada"
    api.svc.keys.forget()  # as another process would, past its cache
    assert await payments(api, "acc_a", bob_key) == 403
    assert_error(
        await api.client.get("/v1/accounts/acc_a/users", headers=bob_key), 403, "forbidden"
    )
    r = await api.client.patch(url, json={"name": "Bob"}, headers=admin)
    assert r.json()["name"] == "Bob" and r.json()["role"] == "user"
    r = await api.client.patch(url, json={"role": "admin"}, headers=admin)
    assert await payments(api, "acc_a", bob_key) == 200

    r = await api.client.delete(url, headers=admin)
    assert r.status_code == 200, r.text
    disabled_at = r.json()["disabled_at"]
    assert disabled_at is not None
    assert_error(
        await api.client.get("/v1/accounts/acc_a/balance", headers=bob_key), 401, "unauthorized"
    )
    api.svc.keys.forget()
    assert_error(
        await api.client.get("/v1/accounts/acc_a/balance", headers=bob_key), 401, "unauthorized"
    )
    # Idempotent; nothing deleted; no new key for a disabled user.
    r = await api.client.delete(url, headers=admin)
    assert r.status_code == 200 and r.json()["disabled_at"] == disabled_at
    assert (await api.client.get(url, headers=admin)).json()["disabled_at"] == disabled_at
    r = await api.client.post("/v1/accounts/acc_a/keys", json={"user_id": bob}, headers=admin)
    assert_error(r, 409, "user_disabled", "user_id")
    keys = (await api.client.get("/v1/accounts/acc_a/keys", headers=admin)).json()["data"]
    bobs = [k for k in keys if k["user_id"] == bob]
    assert len(bobs) == 1 and bobs[0]["active"] is False and bobs[0]["revoked_at"] is None
    assert await api.svc.pool.fetchval("SELECT count(*) FROM users WHERE id = $1", bob) == 1


async def test_keys_are_shown_once_listed_without_secrets_and_revoked(api: Api) -> None:
    await api.seed("acc_a", "acc_b")
    _, admin = await person(api, "acc_a", "admin")
    ada = await add_user(api, admin, "acc_a", "ada@example.com", "user")
    r = await api.client.post(
        "/v1/accounts/acc_a/keys", json={"user_id": ada, "label": "laptop"}, headers=admin
    )
    assert r.status_code == 201, r.text
    made = r.json()
    secret = made["key"]
    assert secret.startswith(f"mk_{made['key_id']}_")
    shown = {k: made[k] for k in ("account_id", "role", "user_id", "label", "active")}
    assert shown == dict(account_id="acc_a", role="user", user_id=ada, label="laptop", active=True)
    assert (
        await api.client.get("/v1/accounts/acc_a/balance", headers=bearer(secret))
    ).status_code == 200

    r = await api.client.get("/v1/accounts/acc_a/keys", headers=admin)
    assert r.status_code == 200
    listed = r.json()["data"]
    assert secret not in r.text and all("key" not in k for k in listed)
    assert listed[0]["key_id"] == made["key_id"]  # newest first
    assert await api.svc.pool.fetchval(
        "SELECT count(*) FROM api_keys WHERE account_id = 'acc_a'"
    ) == len(listed)

    url = f"/v1/accounts/acc_a/keys/{made['key_id']}"
    assert (await api.client.delete(url, headers=admin)).status_code == 204
    r = await api.client.get("/v1/accounts/acc_a/balance", headers=bearer(secret))
    assert_error(r, 401, "unauthorized")
    assert (await api.client.delete(url, headers=admin)).status_code == 204  # idempotent
    after = (await api.client.get("/v1/accounts/acc_a/keys", headers=admin)).json()["data"]
    revoked = next(k for k in after if k["key_id"] == made["key_id"])
    assert revoked["revoked_at"] is not None and revoked["active"] is False

    # Another account's key, user or group is answered as one that does not exist.
    b_key, _ = await api.svc.keys.create("acc_b", "admin")
    _, b_admin = await person(api, "acc_b", "admin")
    b_user = await add_user(api, b_admin, "acc_b", "bea@example.com", "user")
    r = await api.client.post(
        "/v1/accounts/acc_b/access_groups", json={"name": "g"}, headers=b_admin
    )
    b_group = r.json()["id"]
    made_up_group = "access_groups/grp_0123456789abcdef"
    pairs = [
        (f"keys/{b_key.key_id}", "keys/0123456789abcdef", ["DELETE"]),
        (f"users/{b_user}", "users/usr_0123456789abcdef", ["GET", "PATCH", "DELETE"]),
        (f"access_groups/{b_group}", made_up_group, ["GET", "PATCH", "DELETE"]),
        (f"access_groups/{b_group}/members", f"{made_up_group}/members", ["PUT"]),
    ]
    bodies: dict[str, Any] = {
        "GET": None,
        "DELETE": None,
        "PATCH": {"name": "x"},
        "PUT": {"user_ids": []},
    }
    for theirs, made_up, methods in pairs:
        for method in methods:
            got = [
                await api.client.request(
                    method, f"/v1/accounts/acc_a/{path}", json=bodies[method], headers=admin
                )
                for path in (theirs, made_up)
            ]
            assert got[0].status_code == 404, (method, theirs, got[0].text)
            assert (got[0].status_code, got[0].json()) == (got[1].status_code, got[1].json())
    # ...and nothing of theirs changed.
    still = await api.svc.keys.get(b_key.key_id, account_id="acc_b")
    assert still is not None and still.active and still.revoked_at is None
    assert (await api.client.get(f"/v1/accounts/acc_b/users/{b_user}", headers=b_admin)).json()[
        "disabled_at"
    ] is None
    r = await api.client.post("/v1/accounts/acc_a/keys", json={"user_id": b_user}, headers=admin)
    assert_error(r, 422, "unknown_user", "user_id")
    r = await api.client.post(
        "/v1/accounts/acc_a/keys", json={"user_id": "usr_0123456789abcdef"}, headers=admin
    )
    assert_error(r, 422, "unknown_user", "user_id")


async def test_no_service_or_operator_key_comes_out_of_the_api(api: Api) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    operator_user, _ = await person(api, None, "operator")
    ada = await add_user(api, admin, "acc_a", "ada@example.com", "user")
    for body in (
        {"role": "service"},
        {"role": "operator"},
        {"user_id": ada, "role": "admin"},
        {"user_id": ada, "account_id": None},
    ):
        r = await api.client.post("/v1/accounts/acc_a/keys", json=body, headers=admin)
        assert r.status_code == 422, (body, r.text)
    r = await api.client.post(
        "/v1/accounts/acc_a/keys", json={"user_id": operator_user}, headers=admin
    )
    assert_error(r, 422, "unknown_user", "user_id")
    for role in ("operator", "service"):
        r = await api.client.post(
            "/v1/accounts/acc_a/users",
            json={"email": f"{role}@example.com", "role": role},
            headers=admin,
        )
        assert_error(r, 422, "validation_error", "role")
    r = await api.client.patch(
        f"/v1/accounts/acc_a/users/{ada}", json={"role": "operator"}, headers=admin
    )
    assert_error(r, 422, "validation_error", "role")
    roles = await api.svc.pool.fetch(
        "SELECT DISTINCT role FROM api_keys WHERE account_id = 'acc_a'"
    )
    assert {r["role"] for r in roles} == {"admin"}


async def test_who_may_manage_people(api: Api) -> None:
    await managers(api)
    await api.seed("acc_a")
    _, tenant_user = await person(api, "acc_a", "user")
    service = await api.key("acc_a", "service")
    _, boss_admin = await person(api, "boss", "admin")
    _, boss_user = await person(api, "boss", "user")
    _, sub_admin = await person(api, "sub", "admin")
    _, operator = await person(api, None, "operator")
    user_body = {"email": "new@example.com", "role": "user"}

    # A user of the account, a service key: 403 on every route, before the body is read.
    for headers in (tenant_user, service):
        for method, path in [
            ("POST", "users"), ("GET", "users"), ("GET", "users/usr_0123456789abcdef"),
            ("POST", "access_groups"), ("GET", "access_groups"), ("POST", "keys"),
            ("GET", "keys"), ("DELETE", "keys/0123456789abcdef"),
        ]:  # fmt: skip
            r = await api.client.request(
                method, f"/v1/accounts/acc_a/{path}", content=b"{", headers=headers
            )
            assert_error(r, 403, "forbidden")

    # A manager's admin on its managed account: people and their keys.
    r = await api.client.post("/v1/accounts/sub/users", json=user_body, headers=boss_admin)
    assert r.status_code == 201, r.text
    sub_user = r.json()["id"]
    sub_key = await add_key(api, boss_admin, "sub", sub_user)
    assert (await api.client.get("/v1/accounts/sub/balance", headers=sub_key)).status_code == 200
    assert (await api.client.get("/v1/accounts/sub/users", headers=boss_admin)).status_code == 200
    # ...not on a foreign account, nor one that does not exist: the same answer.
    foreign = await api.client.post("/v1/accounts/other/users", json=user_body, headers=boss_admin)
    ghost = await api.client.post("/v1/accounts/ghost/users", json=user_body, headers=boss_admin)
    assert_error(foreign, 403, "forbidden")
    assert foreign.json() == ghost.json() and ghost.status_code == 403
    # Nor its users, nor the other way round.
    r = await api.client.get("/v1/accounts/sub/users", headers=boss_user)
    assert_error(r, 403, "forbidden")
    r = await api.client.get("/v1/accounts/boss/users", headers=sub_admin)
    assert_error(r, 403, "forbidden")
    # An account's admin on another account: 403 whether or not it exists.
    for account in ("other", "ghost"):
        r = await api.client.get(f"/v1/accounts/{account}/keys", headers=sub_admin)
        assert_error(r, 403, "forbidden")

    # Operators on any account; they alone learn that an account does not exist.
    r = await api.client.post(
        "/v1/accounts/other/users", json=user_body | {"email": "o@example.com"}, headers=operator
    )
    assert r.status_code == 201, r.text
    r = await api.client.get("/v1/accounts/ghost/users", headers=operator)
    assert_error(r, 404, "account_not_found", "account_id")


_ODD_EMAILS = [
    "a" * 250 + "@example.com",
    "a" * 65 + "@example.com",
    "no-at-sign",
    "a@b",
    "a@example.c",
    "a b@example.com",
    "a@example.com\n",
    " a@example.com",
    "a@@example.com",
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a@-example.com",
    "a@example-.com",
    "a@exa_mple.com",
    '"quoted"@example.com',
    "ünï@example.com",
    "a@exämple.com",
    "a@example.com<script>",
    "a@[127.0.0.1]",
    "",
]


@pytest.mark.parametrize("email", _ODD_EMAILS)
async def test_odd_emails_are_refused(api: Api, email: str) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    r = await api.client.post(
        "/v1/accounts/acc_a/users", json={"email": email, "role": "user"}, headers=admin
    )
    assert_error(r, 422, "validation_error", "email")
    assert await api.svc.pool.fetchval("SELECT count(*) FROM users") == 1


async def test_fair_emails_are_taken_once_across_the_platform(api: Api) -> None:
    await api.seed("acc_a", "acc_b")
    _, admin_a = await person(api, "acc_a", "admin")
    _, admin_b = await person(api, "acc_b", "admin")
    for email in (
        "o'brien+billing@mail.example.co.uk",
        "x@xn--bcher-kva.example",
        "A_B@EXAMPLE.ORG",
    ):
        await add_user(api, admin_a, "acc_a", email, "user")
    r = await api.client.post(
        "/v1/accounts/acc_b/users",
        json={"email": "a_b@example.org", "role": "admin"},
        headers=admin_b,
    )
    assert_error(r, 409, "email_taken", "email")
    r = await api.client.post(
        "/v1/accounts/acc_b/access_groups", json={"name": "Ops"}, headers=admin_b
    )
    assert r.status_code == 201
    r = await api.client.post(
        "/v1/accounts/acc_b/access_groups", json={"name": "Ops"}, headers=admin_b
    )
    assert_error(r, 409, "group_name_taken", "name")
    # Another account may have a group of that name.
    r = await api.client.post(
        "/v1/accounts/acc_a/access_groups", json={"name": "Ops"}, headers=admin_a
    )
    assert r.status_code == 201


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("users", b"{not json", 400, None),
        ("users", b"", 400, None),
        ("users", b"[1]", 422, None),
        ("users", {"email": 7, "role": "user"}, 422, "email"),
        ("users", {"email": "a@example.com"}, 422, "role"),
        ("users", {"email": "a@example.com", "role": "root"}, 422, "role"),
        ("users", {"email": "a@example.com", "role": "user", "is_admin": True}, 422, "is_admin"),
        ("users", {"email": "a@example.com", "role": "user", "name": "x" * 201}, 422, "name"),
        ("users", {"email": "a@example.com", "role": "user", "name": "a\x00b"}, 422, "name"),
        ("users", b'{"email": "' + b"a" * 70_000 + b'"}', 413, None),
        ("access_groups", {"name": ""}, 422, "name"),
        ("access_groups", {"name": "x" * 101}, 422, "name"),
        ("access_groups", {"name": "g", "privileges": ["root"]}, 422, "privileges[0]"),
        ("access_groups", {"name": "g", "privileges": "edit_billing"}, 422, "privileges"),
        ("access_groups", {"name": "g", "privileges": ["edit_billing"] * 11}, 422, "privileges"),
        ("access_groups", {"name": "g", "members": []}, 422, "members"),
        ("keys", {"user_id": "usr_NOTAUSER"}, 422, "user_id"),
        ("keys", {"user_id": "usr_0123456789abcdef", "label": "x" * 101}, 422, "label"),
        ("keys", {}, 422, "user_id"),
    ],
)
async def test_hostile_bodies(
    api: Api, path: str, body: bytes | dict[str, Any], status: int, field: str | None
) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = await api.client.post(f"/v1/accounts/acc_a/{path}", content=content, headers=admin)
    code = {400: "malformed_json", 413: "payload_too_large"}.get(status, "validation_error")
    assert_error(r, status, code, field)


async def test_hostile_members_and_paths(api: Api) -> None:
    await api.seed("acc_a", "acc_b")
    _, admin = await person(api, "acc_a", "admin")
    _, admin_b = await person(api, "acc_b", "admin")
    mine = await add_user(api, admin, "acc_a", "mine@example.com", "user")
    theirs = await add_user(api, admin_b, "acc_b", "theirs@example.com", "user")
    operator_user, _ = await person(api, None, "operator")
    r = await api.client.post("/v1/accounts/acc_a/access_groups", json={"name": "g"}, headers=admin)
    members = f"/v1/accounts/acc_a/access_groups/{r.json()['id']}/members"
    await api.client.put(members, json={"user_ids": [mine]}, headers=admin)
    for stranger in (theirs, operator_user, "usr_0123456789abcdef"):
        r = await api.client.put(members, json={"user_ids": [mine, stranger]}, headers=admin)
        assert_error(r, 422, "unknown_user", "user_ids")
        assert stranger in r.json()["error"]["message"]
    for bad in (
        {"user_ids": ["x"]},
        {"user_ids": "usr_0123456789abcdef"},
        {"user_ids": [mine] * 1001},
    ):
        r = await api.client.put(members, json=bad, headers=admin)
        assert r.status_code == 422, r.text
    # Nothing of that changed the membership.
    r = await api.client.get(members.removesuffix("/members"), headers=admin)
    assert r.json()["members"] == [mine]
    for path in ("users/usr_XYZ", "users/" + "a" * 300, "access_groups/grp_", "keys/ZZ"):
        r = await api.client.get(f"/v1/accounts/acc_a/{path}", headers=admin)
        assert r.status_code in (404, 405, 422), (path, r.text)
        assert set(r.json()) == {"error"}
    r = await api.client.get("/v1/accounts/acc_a/users/usr_XYZ", headers=admin)
    assert_error(r, 422, "validation_error", "user_id")


def _cursor(*parts: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=" + "A" * 300, "cursor"),
        ("cursor=" + _cursor("access_groups", "2026-01-01T00:00:00+00:00", "grp_x"), "cursor"),
        ("cursor=" + _cursor("users", "yesterday", "usr_x"), "cursor"),
        ("cursor=" + _cursor("users", "2026-01-01T00:00:00", "usr_x"), "cursor"),  # no offset
        ("cursor=" + _cursor("users", "2026-01-01T00:00:00+00:00", 7), "cursor"),
        ("cursor=" + _cursor("users", "2026-01-01T00:00:00+00:00"), "cursor"),
        ("cursor=" + base64.urlsafe_b64encode(b'{"a": 1}').decode(), "cursor"),
        ("cursor=%00%ff", "cursor"),
    ],
)
async def test_bad_pages(api: Api, query: str, field: str) -> None:
    await api.seed("acc_a")
    _, admin = await person(api, "acc_a", "admin")
    r = await api.client.get(f"/v1/accounts/acc_a/users?{query}", headers=admin)
    assert_error(r, 422, "validation_error", field)


async def test_lists_come_in_pages(api: Api) -> None:
    await api.seed("acc_a", "acc_b")
    _, admin = await person(api, "acc_a", "admin")
    await person(api, "acc_b", "user")  # never on acc_a's pages
    made = [await add_user(api, admin, "acc_a", f"u{i}@example.com", "user") for i in range(5)]
    for user_id in made[:3]:
        await add_key(api, admin, "acc_a", user_id)
    for i in range(3):
        await api.client.post(
            "/v1/accounts/acc_a/access_groups", json={"name": f"g{i}"}, headers=admin
        )

    async def walk(path: str, limit: int) -> list[list[str]]:
        pages: list[list[str]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
            r = await api.client.get(f"/v1/accounts/acc_a/{path}", params=params, headers=admin)
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"data", "next_cursor"}
            pages.append([item.get("id") or item["key_id"] for item in body["data"]])
            cursor = body["next_cursor"]
            if cursor is None:
                return pages

    users = await walk("users", 2)
    assert [len(p) for p in users] == [2, 2, 2]  # five made here and the admin
    flat = [u for p in users for u in p]
    assert flat[:5] == made[::-1] and len(set(flat)) == 6
    assert await walk("users", 6) == [flat]
    assert await walk("users", 200) == [flat]
    assert [len(p) for p in await walk("access_groups", 2)] == [2, 1]
    keys = await walk("keys", 3)
    assert [len(p) for p in keys] == [3, 1]  # three of users, the admin's
    # The default page is 50.
    r = await api.client.get("/v1/accounts/acc_a/users", headers=admin)
    assert len(r.json()["data"]) == 6 and r.json()["next_cursor"] is None
    # A cursor of one list is refused by another.
    r = await api.client.get("/v1/accounts/acc_a/users", params={"limit": 1}, headers=admin)
    users_cursor = r.json()["next_cursor"]
    r = await api.client.get(
        "/v1/accounts/acc_a/keys", params={"cursor": users_cursor}, headers=admin
    )
    assert_error(r, 422, "validation_error", "cursor")


async def test_me_for_each_kind_of_key(api: Api) -> None:
    await managers(api)
    ada, ada_key = await person(api, "sub", "user", "ada@example.com")
    _, boss_admin = await person(api, "boss", "admin")
    body = {"name": "b", "privileges": ["view_billing_unit", "edit_billing"]}
    r = await api.client.post("/v1/accounts/sub/access_groups", json=body, headers=boss_admin)
    members = f"/v1/accounts/sub/access_groups/{r.json()['id']}/members"
    await api.client.put(members, json={"user_ids": [ada]}, headers=boss_admin)
    operator_user, operator_key = await person(api, None, "operator")
    _, bare_operator = await api.svc.keys.create(None, "operator")
    service = await api.key("other", "service")
    account_admin = await api.key("other", "admin")

    async def me(headers: Headers) -> dict[str, Any]:
        r = await api.client.get("/v1/me", headers=headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["key_id"] in headers["Authorization"]
        return body

    got = await me(ada_key)
    assert got | {"key_id": None, "name": None} == {
        "key_id": None,
        "name": None,
        "kind": "user",
        "role": "user",
        "account_id": "sub",
        "user_id": ada,
        "email": "ada@example.com",
        "privileges": ["edit_billing", "view_billing_unit"],
        "managed": True,
        "is_manager": False,
    }
    got = await me(boss_admin)
    assert (got["kind"], got["role"], got["is_manager"], got["managed"]) == (
        "user",
        "admin",
        True,
        False,
    )
    got = await me(operator_key)
    assert (got["kind"], got["role"], got["account_id"], got["user_id"]) == (
        "user",
        "operator",
        None,
        operator_user,
    )
    got = await me(bearer(bare_operator))
    assert (got["kind"], got["role"], got["account_id"], got["user_id"], got["email"]) == (
        "operator",
        "operator",
        None,
        None,
        None,
    )
    got = await me(service)
    assert (got["kind"], got["role"], got["account_id"], got["privileges"]) == (
        "service",
        "service",
        "other",
        [],
    )
    got = await me(account_admin)
    assert (got["kind"], got["role"], got["account_id"]) == ("account", "admin", "other")
    assert_error(await api.client.get("/v1/me"), 401, "unauthorized")
    assert_error(
        await api.client.get("/v1/me", headers=bearer("mk_0123456789abcdef_" + "A" * 43)),
        401,
        "unauthorized",
    )


async def test_the_people_routes_are_in_the_openapi_document(api: Api) -> None:
    doc = (await api.client.get("/openapi.json")).json()
    paths = doc["paths"]
    expected = {
        "/v1/accounts/{account_id}/users": {"get", "post"},
        "/v1/accounts/{account_id}/users/{user_id}": {"get", "patch", "delete"},
        "/v1/accounts/{account_id}/access_groups": {"get", "post"},
        "/v1/accounts/{account_id}/access_groups/{group_id}": {"get", "patch", "delete"},
        "/v1/accounts/{account_id}/access_groups/{group_id}/members": {"put"},
        "/v1/accounts/{account_id}/keys": {"get", "post"},
        "/v1/accounts/{account_id}/keys/{key_id}": {"delete"},
        "/v1/me": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
        for method in methods:
            op = paths[path][method]
            assert "401" in op["responses"], (path, method)
            if method in ("post", "patch", "put"):
                assert "requestBody" in op, (path, method)
    body = paths["/v1/accounts/{account_id}/users"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["additionalProperties"] is False
    schemas = doc["components"]["schemas"]
    assert set(schemas["UsersPage"]["properties"]) == {"data", "next_cursor"}
    assert "key" in schemas["KeyCreatedOut"]["properties"]
    assert "key" not in schemas["KeyOut"]["properties"]


# --- the command line ------------------------------------------------------------------------


async def run(api: Api, capsys: pytest.CaptureFixture[str], line: str) -> tuple[int, str, str]:
    """``meter LINE`` (words split on spaces) in this process: exit code, stdout, stderr."""
    args = build_parser().parse_args(line.split())
    fn = commands.users if args.command == "users" else commands.keys
    code = await fn(api.settings, args)
    out, err = capsys.readouterr()
    return code, out, err


async def test_meter_users_bootstraps_an_account_s_first_admin(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.seed("acc_a")
    line = "users create --account acc_a --email Root@Example.com --role admin --name Root"
    code, out, err = await run(api, capsys, line)
    assert code == 0, err
    admin = orjson.loads(out)
    assert (admin["email"], admin["role"], admin["account_id"]) == (
        "root@example.com",
        "admin",
        "acc_a",
    )
    code, out, err = await run(api, capsys, f"keys create --user {admin['id']} --label boot")
    assert code == 0, err
    key = bearer(out.strip())
    assert admin["id"] in err and "shown once" in err
    # The first admin, through the API, makes the rest.
    await add_user(api, key, "acc_a", "second@example.com", "user")
    code, out, _ = await run(api, capsys, "users list --account acc_a")
    assert code == 0 and [u["email"] for u in orjson.loads(out)] == [
        "second@example.com",
        "root@example.com",
    ]

    # Refusals: exit 2 for options, 1 for what the database says.
    for line, want in [
        ("users create --account acc_a --email root@example.com --role user", 1),
        ("users create --account ghost --email g@example.com --role user", 1),
        ("users create --account acc_a --email not-an-email --role user", 2),
        ("users create --account acc_a --email op@example.com --role operator", 2),
        ("users create --email u@example.com --role user", 2),
        ("users create --account acc_a --role user", 2),
        ("users disable", 2),
        ("users disable --user usr_0123456789abcdef", 1),
        ("users disable --email nobody@example.com", 1),
    ]:
        code, _, err = await run(api, capsys, line)
        assert code == want, (line, err)

    code, out, _ = await run(api, capsys, "users disable --email ROOT@example.com")
    assert code == 0 and orjson.loads(out)["disabled_at"] is not None
    api.svc.keys.forget()
    assert_error(await api.client.get("/v1/accounts/acc_a/users", headers=key), 401, "unauthorized")
    code, _, err = await run(api, capsys, f"keys create --user {admin['id']}")
    assert code == 1 and "disabled" in err


async def test_meter_keys_makes_operator_service_and_account_keys(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    await api.seed("acc_a", "acc_b")

    async def me(key: str) -> dict[str, Any]:
        body: dict[str, Any] = (await api.client.get("/v1/me", headers=bearer(key))).json()
        return body

    code, out, err = await run(api, capsys, "keys create --role operator --label ops")
    assert code == 0, err
    operator = out.strip()
    assert ((await me(operator))["kind"], (await me(operator))["account_id"]) == ("operator", None)
    r = await api.client.get("/v1/accounts/acc_b/users", headers=bearer(operator))
    assert r.status_code == 200

    code, out, _ = await run(api, capsys, "users create --email staff@example.com --role operator")
    staff = orjson.loads(out)
    assert code == 0 and staff["account_id"] is None
    code, out, _ = await run(api, capsys, f"keys create --user {staff['id']}")
    assert code == 0 and (await me(out.strip()))["user_id"] == staff["id"]
    code, out, _ = await run(api, capsys, "users list")
    assert code == 0 and [u["id"] for u in orjson.loads(out)] == [staff["id"]]

    for role in ("service", "admin", "user"):
        code, out, err = await run(api, capsys, f"keys create --account acc_a --role {role}")
        assert code == 0, err
        assert (await me(out.strip()))["role"] == role
    key_id = out.strip().split("_")[1]
    code, _, err = await run(api, capsys, f"keys revoke --key-id {key_id}")
    assert code == 0 and key_id in err
    assert (await run(api, capsys, f"keys revoke --key-id {key_id}"))[0] == 1

    for line, want in [
        ("keys create --role operator --account acc_a", 2),
        ("keys create --account acc_a", 2),
        ("keys create --role admin", 2),
        (f"keys create --user {staff['id']} --role admin", 2),
        ("keys create --user usr_0123456789abcdef", 1),
        ("keys create --account ghost --role user", 1),
        ("keys revoke", 2),
    ]:
        code, _, err = await run(api, capsys, line)
        assert code == want, (line, err)


def test_the_parser_keeps_the_old_keys_command() -> None:
    args = build_parser().parse_args(["keys", "create", "--account", "a", "--role", "service"])
    assert (args.account, args.role, args.user, args.label) == ("a", "service", None, "")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["users", "create", "--role", "service"])
