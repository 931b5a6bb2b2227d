"""The people pages over the API's people routes: an admin adds a user, changes its role and
access groups, disables it; makes an access group with privileges and members; makes a key
(its secret shown once, on the answer to the post) and revokes it. Whoever may not manage
people gets a 403, as from the API."""

from __future__ import annotations

import re

from balance.accounts import AccountSpec, create_accounts
from enforcement.people import People
from tests.api import Api
from tests.portal.conftest import csrf_of, person, sign_in
from tests.portal.test_signin import client_of


async def test_an_admin_adds_a_user_changes_its_role_and_groups_then_disables_it(
    api: Api,
) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    admin = await person(api, "acc", "admin")
    billing = await People(pool).create_group("acc", "Billing", ["edit_billing"])
    async with client_of(api) as client:
        await sign_in(client, admin)
        page = await client.get("/portal/a/acc/users")
        assert page.status_code == 200 and admin in page.text
        token = csrf_of(page.text)
        r = await client.post(
            "/portal/a/acc/users",
            data={"csrf": token, "email": "Grace@Example.com", "name": "Grace", "role": "user"},
        )
        assert r.status_code == 303, r.text
        grace = await People(pool).user_by_email("grace@example.com")
        assert grace is not None and (grace.role, grace.name) == ("user", "Grace")
        again = await client.post(
            "/portal/a/acc/users",
            data={"csrf": token, "email": "grace@example.com", "name": "", "role": "user"},
        )
        assert again.status_code == 409 and "email_taken" in again.text
        r = await client.post(
            f"/portal/a/acc/users/{grace.id}",
            data={"csrf": token, "name": "Grace H.", "role": "admin", "group": billing.id},
        )
        assert r.status_code == 303, r.text
        now = await People(pool).user(grace.id)
        assert now is not None and (now.role, now.name) == ("admin", "Grace H.")
        group = await People(pool).group("acc", billing.id)
        assert group is not None and list(group.members) == [grace.id]
        # unticked: out of the group again
        r = await client.post(
            f"/portal/a/acc/users/{grace.id}", data={"csrf": token, "name": "G", "role": "user"}
        )
        assert r.status_code == 303
        group = await People(pool).group("acc", billing.id)
        assert group is not None and list(group.members) == []
        r = await client.post(f"/portal/a/acc/users/{grace.id}/disable", data={"csrf": token})
        assert r.status_code == 303
        gone = await People(pool).user(grace.id)
        assert gone is not None and gone.disabled_at is not None
        page = await client.get("/portal/a/acc/users")
        assert re.search(r'data-user="grace@example.com">.*?Disabled', page.text, re.S)
        nocsrf = await client.post(
            "/portal/a/acc/users", data={"email": "x@example.com", "role": "user"}
        )
        assert nocsrf.status_code == 403
    assert await People(pool).user_by_email("x@example.com") is None


async def test_an_admin_makes_an_access_group_with_privileges_and_members(api: Api) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    admin = await person(api, "acc", "admin")
    member = await person(api, "acc", "user")
    member_id = await pool.fetchval("SELECT id FROM users WHERE email = $1", member)
    async with client_of(api) as client:
        await sign_in(client, admin)
        page = await client.get("/portal/a/acc/access_groups")
        token = csrf_of(page.text)
        r = await client.post(
            "/portal/a/acc/access_groups",
            data={"csrf": token, "name": "Units", "privilege": ["view_billing_unit"]},
        )
        assert r.status_code == 303, r.text
        [g] = [g for g in await People(pool).groups("acc", limit=10) if g.name == "Units"]
        assert list(g.privileges) == ["view_billing_unit"]
        r = await client.post(
            f"/portal/a/acc/access_groups/{g.id}",
            data={
                "csrf": token,
                "name": "Units",
                "privilege": ["edit_billing_unit", "edit_billing"],
                "member": member_id,
            },
        )
        assert r.status_code == 303, r.text
        got = await People(pool).group("acc", g.id)
        assert got is not None and list(got.members) == [member_id]
        assert sorted(got.privileges) == ["edit_billing", "edit_billing_unit"]
        page = await client.get("/portal/a/acc/access_groups")
        assert "Edit Billing, Edit Billing unit" in page.text and member in page.text
        bad = await client.post(
            f"/portal/a/acc/access_groups/{g.id}",
            data={"csrf": token, "name": "Units", "privilege": "root"},
        )
        assert bad.status_code == 422 and "Not done" in bad.text
        r = await client.post(f"/portal/a/acc/access_groups/{g.id}/delete", data={"csrf": token})
        assert r.status_code == 303
    assert await People(pool).group("acc", g.id) is None


async def test_a_key_is_shown_once_works_on_the_api_and_is_revoked(api: Api) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    admin = await person(api, "acc", "admin")
    user = await person(api, "acc", "user")
    user_id = await pool.fetchval("SELECT id FROM users WHERE email = $1", user)
    async with client_of(api) as client:
        await sign_in(client, admin)
        page = await client.get("/portal/a/acc/keys")
        r = await client.post(
            "/portal/a/acc/keys",
            data={"csrf": csrf_of(page.text), "user_id": user_id, "label": "switch"},
        )
        assert r.status_code == 201, r.text
        assert r.headers["cache-control"] == "no-store"
        found = re.search(r'value="(mk_[^"]+)" data-figure="secret"', r.text)
        assert found, r.text
        secret = found.group(1)
        bearer = {"Authorization": f"Bearer {secret}"}
        me = await api.client.get("/v1/me", headers=bearer)
        assert (me.status_code, me.json()["user_id"]) == (200, user_id)
        listed = await client.get("/portal/a/acc/keys")
        assert secret not in listed.text and "switch" in listed.text
        key_id = me.json()["key_id"]
        r = await client.post(
            f"/portal/a/acc/keys/{key_id}/revoke", data={"csrf": csrf_of(listed.text)}
        )
        assert r.status_code == 303
        api.svc.keys.forget()
        assert (await api.client.get("/v1/me", headers=bearer)).status_code == 401
        listed = await client.get("/portal/a/acc/keys")
        assert re.search(rf'data-key="{key_id}">.*?Revoked', listed.text, re.S)


async def test_only_who_may_manage_people_opens_or_posts_the_people_pages(api: Api) -> None:
    await api.seed("acc", "mgr")
    pool = api.svc.pool
    await pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    await create_accounts(pool, api.svc.balances, [AccountSpec(id="sub", manager_id="mgr")])
    editor = await person(api, "acc", "user", ("edit_billing",))
    async with client_of(api) as client:
        await sign_in(client, editor)
        home = await client.get("/portal/a/acc")
        assert "/users" not in home.text and "/keys" not in home.text
        for name in ("users", "access_groups", "keys"):
            assert (await client.get(f"/portal/a/acc/{name}")).status_code == 403
        r = await client.post(
            "/portal/a/acc/users",
            data={"csrf": csrf_of(home.text), "email": "y@example.com", "role": "admin"},
        )
        assert r.status_code == 403
    assert await People(pool).user_by_email("y@example.com") is None
    # a manager's admin manages its managed account's people
    async with client_of(api) as client:
        await sign_in(client, await person(api, "mgr", "admin"))
        page = await client.get("/portal/a/sub/users")
        assert page.status_code == 200
        r = await client.post(
            "/portal/a/sub/users",
            data={"csrf": csrf_of(page.text), "email": "sub@example.com", "role": "admin"},
        )
        assert r.status_code == 303, r.text
    made = await People(pool).user_by_email("sub@example.com")
    assert made is not None and made.account_id == "sub"
