"""The Billing groups page's forms over the API's own routes: an admin puts numbers and users in
a group (a number moves from its other group), an Edit Billing unit user may change only its
own units, and a View Billing unit user sees no form and is refused."""

from __future__ import annotations

from enforcement import groups as group_store
from tests.api import Api
from tests.portal.conftest import csrf_of, person, sign_in
from tests.portal.test_signin import client_of


async def test_an_admin_sets_a_groups_numbers_and_users(api: Api) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    admin = await person(api, "acc", "admin")
    member = await pool.fetchval("SELECT id FROM users WHERE email = $1", admin)
    sales = await group_store.create(pool, "acc", "Sales")
    ops = await group_store.create(pool, "acc", "Ops")
    await group_store.set_numbers(pool, "acc", ops.id, ["+14155550101"])
    async with client_of(api) as client:
        assert (await sign_in(client, admin)).status_code == 303
        page = await client.get("/portal/a/acc/groups")
        assert page.status_code == 200 and "Numbers of Sales" in page.text
        r = await client.post(
            f"/portal/a/acc/groups/{sales.id}/members",
            data={
                "csrf": csrf_of(page.text),
                "numbers": "+14155550101\n+14155550102, ",
                "user_ids": member,
            },
        )
        assert r.status_code == 303, r.text
        got = {g.name: g for g in await group_store.groups(pool, "acc")}
        assert got["Sales"].numbers == ["+14155550101", "+14155550102"]
        assert got["Sales"].users == [member]
        assert got["Ops"].numbers == []  # moved: a number is in one group at most
        bad = await client.post(
            f"/portal/a/acc/groups/{sales.id}/members",
            data={"csrf": csrf_of(page.text), "numbers": "4155550101", "user_ids": ""},
        )
        assert bad.status_code == 422 and "numbers" in bad.text
        nocsrf = await client.post(
            f"/portal/a/acc/groups/{sales.id}/members", data={"numbers": "", "user_ids": ""}
        )
        assert nocsrf.status_code == 403
    assert [g.numbers for g in await group_store.groups(pool, "acc") if g.name == "Sales"] == [
        ["+14155550101", "+14155550102"]
    ]


async def test_a_viewer_of_billing_units_gets_no_form_and_is_refused(api: Api) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    viewer = await person(api, "acc", "user", ("view_billing_unit",))
    uid = await pool.fetchval("SELECT id FROM users WHERE email = $1", viewer)
    sales = await group_store.create(pool, "acc", "Sales")
    await group_store.set_users(pool, "acc", sales.id, [uid])
    async with client_of(api) as client:
        await sign_in(client, viewer)
        page = await client.get("/portal/a/acc/groups")
        assert page.status_code == 200 and "Numbers of Sales" not in page.text
        r = await client.post(
            f"/portal/a/acc/groups/{sales.id}/members",
            data={"csrf": csrf_of(page.text), "numbers": "+14155550109", "user_ids": ""},
        )
        assert r.status_code == 403
    assert (await group_store.group(pool, "acc", sales.id)).numbers == []  # type: ignore[union-attr]


async def test_an_admin_lists_adds_assigns_and_unassigns_outbound_profiles(api: Api) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    admin = await person(api, "acc", "admin")
    sales = await group_store.create(pool, "acc", "Sales")
    await group_store.put_profile(pool, "acc", "trunk-1", "Main trunk", None)
    async with client_of(api) as client:
        await sign_in(client, admin)
        page = await client.get("/portal/a/acc/groups")
        assert page.status_code == 200
        assert "Main trunk" in page.text and "Billing group of trunk-1" in page.text
        token = csrf_of(page.text)
        r = await client.post(
            "/portal/a/acc/profiles/trunk-1", data={"csrf": token, "billing_group_id": sales.id}
        )
        assert r.status_code == 303, r.text
        [p] = await group_store.profiles(pool, "acc")
        assert (p.name, p.billing_group_id) == ("Main trunk", sales.id)  # its name kept
        page = await client.get("/portal/a/acc/groups")
        assert 'data-figure="profile-group">Sales<' in page.text
        r = await client.post(
            "/portal/a/acc/profiles",
            data={"csrf": token, "profile_id": "sip:eu", "name": "EU", "billing_group_id": ""},
        )
        assert r.status_code == 303, r.text
        r = await client.post(
            "/portal/a/acc/profiles/trunk-1", data={"csrf": token, "billing_group_id": ""}
        )
        assert r.status_code == 303
        got = {p.id: p for p in await group_store.profiles(pool, "acc")}
        assert got["trunk-1"].billing_group_id is None and got["sip:eu"].name == "EU"
        # the API's own refusals, on the page with their status
        bad = await client.post(
            "/portal/a/acc/profiles/trunk-1",
            data={"csrf": token, "billing_group_id": "bg_0000000000000000"},
        )
        assert bad.status_code in (404, 422) and "Not done" in bad.text
        assert (
            await client.post(
                "/portal/a/acc/profiles", data={"csrf": token, "profile_id": "no spaces"}
            )
        ).status_code == 422
        assert (
            await client.post("/portal/a/acc/profiles/trunk-1", data={"billing_group_id": ""})
        ).status_code == 403  # no CSRF token
        r = await client.post("/portal/a/acc/profiles/sip:eu/delete", data={"csrf": token})
        assert r.status_code == 303
    assert [p.id for p in await group_store.profiles(pool, "acc")] == ["trunk-1"]


async def test_a_unit_editor_sees_the_profiles_but_may_not_change_them(api: Api) -> None:
    await api.seed("acc")
    pool = api.svc.pool
    editor = await person(api, "acc", "user", ("edit_billing_unit",))
    sales = await group_store.create(pool, "acc", "Sales")
    await group_store.put_profile(pool, "acc", "trunk-1", "Main trunk", None)
    async with client_of(api) as client:
        await sign_in(client, editor)
        page = await client.get("/portal/a/acc/groups")
        assert page.status_code == 200 and "trunk-1" in page.text
        assert "Billing group of trunk-1" not in page.text and "Add profile" not in page.text
        r = await client.post(
            "/portal/a/acc/profiles/trunk-1",
            data={"csrf": csrf_of(page.text), "billing_group_id": sales.id},
        )
        assert r.status_code == 403
    [p] = await group_store.profiles(pool, "acc")
    assert p.billing_group_id is None
