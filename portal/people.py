"""The people pages of one account: its users, access groups and API keys
(``/portal/a/{account_id}/users``, ``/access_groups``, ``/keys``), over the people routes of
the API (``enforcement.http.people``, docs/design/people.md).

Every page and form needs ``people.manage`` on the account (RULES: its admins, its manager's
admins, operators), asked before anything else, so a direct URL answers 403 like the API. A
new key's secret is shown once, on the page the post answers (never in a URL, never cached:
``Cache-Control: no-store``); only its hash is kept.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from contracts.events import ACCOUNT_ID_PATTERN
from enforcement.http import people as routes
from infra.http.access import Permission
from infra.http.api_keys import PRIVILEGES
from infra.http.errors import ApiError
from infra.http.pages import MAX_LIMIT
from portal.calls import data, with_body
from portal.pages import account_page, enter
from portal.web import Ctx, act, context, field, form, html, shown_in_place

router = APIRouter()

Account = Annotated[str, Path(pattern=ACCOUNT_ID_PATTERN)]
UserId = Annotated[str, Path(pattern=r"^usr_[a-z0-9]{16}$")]
GroupId = Annotated[str, Path(pattern=r"^grp_[a-z0-9]{16}$")]
KeyId = Annotated[str, Path(pattern=r"^[a-z0-9]{16}$")]

#: The people pages -> the permission each needs (their forms need the same).
PAGES: Final[dict[str, Permission]] = {
    "/portal/a/{account_id}/users": "people.manage",
    "/portal/a/{account_id}/access_groups": "people.manage",
    "/portal/a/{account_id}/keys": "people.manage",
}
_PERMISSION: Final[Permission] = "people.manage"

#: The seeds' names of the privileges an access group gives.
PRIVILEGE_NAMES: Final = {
    "edit_billing": "Edit Billing",
    "view_billing_unit": "View Billing unit",
    "edit_billing_unit": "Edit Billing unit",
}

NOTICES: Final = {
    "user_added": "User added. They sign in once their password is set (meter users passwd).",
    "user_saved": "User saved: their sessions and keys act with it from their next request.",
    "user_disabled": "User disabled: their keys and sessions open nothing from now on.",
    "group_created": "Access group created.",
    "group_saved": "Access group saved: its members' privileges follow.",
    "group_deleted": "Access group deleted: its members lost its privileges.",
    "key_revoked": "Key revoked: the API refuses it within seconds.",
}


async def _all(ctx: Ctx, account_id: str) -> tuple[list[Any], list[Any], bool]:
    """The account's users and access groups (the first 200 of each; ``more`` when there are
    others: the API's lists are paginated, the page shows one page of each)."""
    users = await data(routes.list_users(account_id, ctx.who, ctx.svc, MAX_LIMIT, None))
    groups = await data(routes.list_groups(account_id, ctx.who, ctx.svc, MAX_LIMIT, None))
    more = users["next_cursor"] is not None or groups["next_cursor"] is not None
    return users["data"], groups["data"], more


# --- users ---------------------------------------------------------------------------------


async def _users(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    users, groups, more = await _all(ctx, account_id)
    return await account_page(
        ctx,
        account_id,
        "users.html",
        "/users",
        notices=NOTICES,
        users=users,
        groups=groups,
        member_of={u["id"]: {g["id"] for g in groups if u["id"] in g["members"]} for u in users},
        more=more,
        **extra,
    )


@router.get("/portal/a/{account_id}/users")
@html
async def users(request: Request, account_id: Account) -> Response:
    ctx = await enter(request, account_id, _PERMISSION)
    return await _users(ctx, account_id)


@router.post("/portal/a/{account_id}/users")
@html
async def user_add(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body = {
        "email": field(posted, "email"),
        "name": field(posted, "name"),
        "role": field(posted, "role"),
    }
    return await act(
        data(routes.create_user(with_body(body), account_id, ctx.who, ctx.svc)),
        partial(_users, ctx, account_id),
        f"/portal/a/{account_id}/users",
        "user_added",
    )


@router.post("/portal/a/{account_id}/users/{user_id}")
@html
async def user_save(request: Request, account_id: Account, user_id: UserId) -> Response:
    """The user's name and role (``PATCH .../users/{id}``), then its access groups: each group
    whose membership changes gets its whole membership set (``PUT .../members``)."""
    ctx = await context(request)
    posted = await form(ctx)
    chosen = {g for g in posted.getlist("group") if isinstance(g, str)}
    body = {"name": field(posted, "name"), "role": field(posted, "role")}
    async def work() -> None:
        await data(routes.patch_user(with_body(body), account_id, user_id, ctx.who, ctx.svc))
        _, groups, _ = await _all(ctx, account_id)
        for g in groups:
            members: list[str] = g["members"]
            if (g["id"] in chosen) == (user_id in members):
                continue
            now = [*members, user_id] if g["id"] in chosen else [m for m in members if m != user_id]
            await data(
                routes.put_members(
                    with_body({"user_ids": now}), account_id, g["id"], ctx.who, ctx.svc
                )
            )
    return await act(
        work(),
        partial(_users, ctx, account_id),
        f"/portal/a/{account_id}/users",
        "user_saved",
    )


@router.post("/portal/a/{account_id}/users/{user_id}/disable")
@html
async def user_disable(request: Request, account_id: Account, user_id: UserId) -> Response:
    ctx = await context(request)
    await form(ctx)
    return await act(
        data(routes.disable_user(account_id, user_id, ctx.who, ctx.svc)),
        partial(_users, ctx, account_id),
        f"/portal/a/{account_id}/users",
        "user_disabled",
    )


# --- access groups -------------------------------------------------------------------------


async def _groups(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    users, groups, more = await _all(ctx, account_id)
    return await account_page(
        ctx,
        account_id,
        "access_groups.html",
        "/access_groups",
        notices=NOTICES,
        users=users,
        groups=groups,
        emails={u["id"]: u["email"] for u in users},
        privileges=PRIVILEGE_NAMES,
        more=more,
        **extra,
    )


def _privileges(posted: Any) -> list[str]:
    # Only the privileges there are; anything else a form sends is the route's to refuse.
    sent = [p for p in posted.getlist("privilege") if isinstance(p, str)]
    return [p for p in PRIVILEGES if p in sent] + [p for p in sent if p not in PRIVILEGES]


@router.get("/portal/a/{account_id}/access_groups")
@html
async def access_groups(request: Request, account_id: Account) -> Response:
    ctx = await enter(request, account_id, _PERMISSION)
    return await _groups(ctx, account_id)


@router.post("/portal/a/{account_id}/access_groups")
@html
async def group_create(request: Request, account_id: Account) -> Response:
    ctx = await context(request)
    posted = await form(ctx)
    body = {"name": field(posted, "name"), "privileges": _privileges(posted)}
    return await act(
        data(routes.create_group(with_body(body), account_id, ctx.who, ctx.svc)),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/access_groups",
        "group_created",
    )


@router.post("/portal/a/{account_id}/access_groups/{group_id}")
@html
async def group_save(request: Request, account_id: Account, group_id: GroupId) -> Response:
    """The group's name and privileges (``PATCH``), then its whole membership (``PUT``)."""
    ctx = await context(request)
    posted = await form(ctx)
    body = {"name": field(posted, "name"), "privileges": _privileges(posted)}
    members = [m for m in posted.getlist("member") if isinstance(m, str)]
    async def work() -> None:
        await data(routes.patch_group(with_body(body), account_id, group_id, ctx.who, ctx.svc))
        await data(
            routes.put_members(
                with_body({"user_ids": members}), account_id, group_id, ctx.who, ctx.svc
            )
        )
    return await act(
        work(),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/access_groups",
        "group_saved",
    )


@router.post("/portal/a/{account_id}/access_groups/{group_id}/delete")
@html
async def group_delete(request: Request, account_id: Account, group_id: GroupId) -> Response:
    ctx = await context(request)
    await form(ctx)
    return await act(
        routes.delete_group(account_id, group_id, ctx.who, ctx.svc),
        partial(_groups, ctx, account_id),
        f"/portal/a/{account_id}/access_groups",
        "group_deleted",
    )


# --- API keys ------------------------------------------------------------------------------


async def _keys(ctx: Ctx, account_id: str, **extra: Any) -> Response:
    keys = await data(routes.list_keys(account_id, ctx.who, ctx.svc, MAX_LIMIT, None))
    users, _, more = await _all(ctx, account_id)
    return await account_page(
        ctx,
        account_id,
        "keys.html",
        "/keys",
        notices=NOTICES,
        keys=keys["data"],
        users=[u for u in users if not u["disabled_at"]],
        emails={u["id"]: u["email"] for u in users},
        more=more or keys["next_cursor"] is not None,
        **extra,
    )


@router.get("/portal/a/{account_id}/keys")
@html
async def keys(request: Request, account_id: Account) -> Response:
    ctx = await enter(request, account_id, _PERMISSION)
    return await _keys(ctx, account_id, created=None)


@router.post("/portal/a/{account_id}/keys")
@html
async def key_create(request: Request, account_id: Account) -> Response:
    """The new key, shown on this answer only (201, like the API's)."""
    ctx = await context(request)
    posted = await form(ctx)
    body = {"user_id": field(posted, "user_id"), "label": field(posted, "label")}
    try:
        made = await data(routes.create_key(with_body(body), account_id, ctx.who, ctx.svc))
    except ApiError as exc:
        if not shown_in_place(exc):
            raise
        return await _keys(ctx, account_id, created=None, error=exc, status=exc.status)
    return await _keys(ctx, account_id, created=made, status=201)


@router.post("/portal/a/{account_id}/keys/{key_id}/revoke")
@html
async def key_revoke(request: Request, account_id: Account, key_id: KeyId) -> Response:
    ctx = await context(request)
    await form(ctx)
    return await act(
        routes.revoke_key(account_id, key_id, ctx.who, ctx.svc),
        partial(_keys, ctx, account_id, created=None),
        f"/portal/a/{account_id}/keys",
        "key_revoked",
    )
