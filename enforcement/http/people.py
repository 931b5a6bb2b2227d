"""The people of an account and their keys (docs/design/people.md): users, access groups and
API keys under ``/v1/accounts/{account_id}/``, and ``GET /v1/me``.

Every route but ``/v1/me`` needs ``people.manage`` on the path's account
(``infra.http.access``): its admins, a manager's admins on the accounts it manages, operators.
It is checked before the body is read, and a user, group or key of another account answers 404
exactly as one that does not exist. Keys made here act as one user of the account, never as a
service or an operator (those are made with ``meter keys``), so nobody mints a key stronger
than the account's own admins.

What a change does to keys shows in this process at the next request; in the API's other
processes within ``api_key_cache_s`` (5 s), as revocation does (``infra.http.api_keys``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from enforcement.http.people_models import (
    GroupId,
    GroupIn,
    GroupOut,
    GroupPatch,
    GroupsPage,
    KeyCreatedOut,
    KeyId,
    KeyIn,
    KeyOut,
    KeysPage,
    MembersIn,
    MeOut,
    UserId,
    UserIn,
    UserOut,
    UserPatch,
    UsersPage,
)
from enforcement.http.services import ApiServices, Services, known
from enforcement.people import (
    AccessGroup,
    AccountNotFound,
    EmailTaken,
    GroupNameTaken,
    NotFound,
    NotOfAccount,
    People,
    PeopleError,
    User,
    UserDisabled,
)
from infra.http import errors, pages
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import within_db
from infra.http.callers import Caller, Principal
from infra.http.errors import ApiError

router = APIRouter()

_USERS = "/v1/accounts/{account_id}/users"
_GROUPS = "/v1/accounts/{account_id}/access_groups"
_KEYS = "/v1/accounts/{account_id}/keys"
_READ = errors.responses(401, 403, 404, 422, 503)
_WRITE = errors.responses(400, 401, 403, 404, 409, 413, 422, 503)


def refused(exc: PeopleError, what: str) -> ApiError:
    """The one mapping of the people store's refusals to answers; ``what`` names the path's
    user or group for a ``NotFound``."""
    if isinstance(exc, NotFound):
        return ApiError(
            404, f"{what}_not_found", f"no {what} of that id in this account", f"{what}_id"
        )
    if isinstance(exc, AccountNotFound):
        return ApiError(404, "account_not_found", str(exc), "account_id")
    if isinstance(exc, EmailTaken):
        return ApiError(409, "email_taken", "a user with this email exists", "email")
    if isinstance(exc, GroupNameTaken):
        return ApiError(409, "group_name_taken", str(exc), "name")
    if isinstance(exc, NotOfAccount):
        return ApiError(422, "unknown_user", str(exc), "user_ids")
    if isinstance(exc, UserDisabled):
        return ApiError(409, "user_disabled", str(exc), "user_id")
    raise exc


async def _people(who: Principal, svc: ApiServices, account_id: str) -> People:
    """The account's people, once the caller may manage them and the account exists."""
    await who.on(account_id, "people.manage")
    await known(svc, account_id)
    return People(svc.pool)


def _not_found(what: str) -> ApiError:
    return refused(NotFound(what), what)


def _user_at(u: User) -> pages.Position:
    return u.created_at, u.id


def _group_at(g: AccessGroup) -> pages.Position:
    return g.created_at, g.id


# --- users ---------------------------------------------------------------------------------


@router.post(
    _USERS,
    status_code=201,
    response_model=UserOut,
    responses=_WRITE,
    openapi_extra=body_doc(UserIn),
    summary="Add a person to the account (admin or user); 409 email_taken",
)
async def create_user(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> UserOut:
    """The email is unique across the platform. The user has no key yet: make one with
    ``POST .../keys``."""
    await who.on(account_id, "people.manage")
    body = await json_body(request, UserIn)
    await known(svc, account_id)
    try:
        u = await within_db(
            People(svc.pool).create_user(account_id, body.email, body.role, body.name)
        )
    except PeopleError as exc:
        raise refused(exc, "user") from None
    return UserOut.of(u)


@router.get(
    _USERS, response_model=UsersPage, responses=_READ, summary="The account's users, newest first"
)
async def list_users(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> UsersPage:
    """Disabled users too (``disabled_at`` set)."""
    people = await _people(who, svc, account_id)
    before = pages.decode("users", cursor)
    rows = await within_db(people.users(account_id, limit=limit + 1, before=before))
    shown, next_cursor = pages.page("users", rows, limit, _user_at)
    return UsersPage(data=[UserOut.of(u) for u in shown], next_cursor=next_cursor)


@router.get(_USERS + "/{user_id}", response_model=UserOut, responses=_READ, summary="One user")
async def get_user(account_id: AccountPath, user_id: UserId, who: Caller, svc: Services) -> UserOut:
    people = await _people(who, svc, account_id)
    u = await within_db(people.user(user_id, account_id=account_id))
    if u is None:
        raise _not_found("user")
    return UserOut.of(u)


@router.patch(
    _USERS + "/{user_id}",
    response_model=UserOut,
    responses=_WRITE,
    openapi_extra=body_doc(UserPatch),
    summary="Rename a user or change its role; its keys follow",
)
async def patch_user(
    request: Request, account_id: AccountPath, user_id: UserId, who: Caller, svc: Services
) -> UserOut:
    await who.on(account_id, "people.manage")
    body = await json_body(request, UserPatch)
    await known(svc, account_id)
    try:
        u = await within_db(
            People(svc.pool).update_user(account_id, user_id, name=body.name, role=body.role)
        )
    except PeopleError as exc:
        raise refused(exc, "user") from None
    svc.keys.drop_users([u.id])
    return UserOut.of(u)


@router.delete(
    _USERS + "/{user_id}",
    response_model=UserOut,
    responses=_READ,
    summary="Disable a user: its keys stop working; nothing is deleted",
)
async def disable_user(
    account_id: AccountPath, user_id: UserId, who: Caller, svc: Services
) -> UserOut:
    """Idempotent: a disabled user keeps its first ``disabled_at``."""
    people = await _people(who, svc, account_id)
    try:
        u = await within_db(people.disable_user(user_id, account_id=account_id))
    except PeopleError as exc:
        raise refused(exc, "user") from None
    svc.keys.drop_users([u.id])
    return UserOut.of(u)


# --- access groups -------------------------------------------------------------------------


@router.post(
    _GROUPS,
    status_code=201,
    response_model=GroupOut,
    responses=_WRITE,
    openapi_extra=body_doc(GroupIn),
    summary="Create an access group: privileges its members get on top of their role",
)
async def create_group(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> GroupOut:
    await who.on(account_id, "people.manage")
    body = await json_body(request, GroupIn)
    await known(svc, account_id)
    try:
        g = await within_db(People(svc.pool).create_group(account_id, body.name, body.privileges))
    except PeopleError as exc:
        raise refused(exc, "group") from None
    return GroupOut.of(g)


@router.get(
    _GROUPS, response_model=GroupsPage, responses=_READ, summary="The account's access groups"
)
async def list_groups(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> GroupsPage:
    people = await _people(who, svc, account_id)
    before = pages.decode("access_groups", cursor)
    rows = await within_db(people.groups(account_id, limit=limit + 1, before=before))
    shown, next_cursor = pages.page("access_groups", rows, limit, _group_at)
    return GroupsPage(data=[GroupOut.of(g) for g in shown], next_cursor=next_cursor)


@router.get(
    _GROUPS + "/{group_id}", response_model=GroupOut, responses=_READ, summary="One access group"
)
async def get_group(
    account_id: AccountPath, group_id: GroupId, who: Caller, svc: Services
) -> GroupOut:
    people = await _people(who, svc, account_id)
    g = await within_db(people.group(account_id, group_id))
    if g is None:
        raise _not_found("group")
    return GroupOut.of(g)


@router.patch(
    _GROUPS + "/{group_id}",
    response_model=GroupOut,
    responses=_WRITE,
    openapi_extra=body_doc(GroupPatch),
    summary="Rename a group or replace its privileges; its members' keys follow",
)
async def patch_group(
    request: Request, account_id: AccountPath, group_id: GroupId, who: Caller, svc: Services
) -> GroupOut:
    await who.on(account_id, "people.manage")
    body = await json_body(request, GroupPatch)
    await known(svc, account_id)
    try:
        g = await within_db(
            People(svc.pool).update_group(
                account_id, group_id, name=body.name, privileges=body.privileges
            )
        )
    except PeopleError as exc:
        raise refused(exc, "group") from None
    svc.keys.drop_users(g.members)
    return GroupOut.of(g)


@router.delete(
    _GROUPS + "/{group_id}",
    status_code=204,
    response_class=Response,
    responses=_READ,
    summary="Delete an access group: its members lose its privileges",
)
async def delete_group(
    account_id: AccountPath, group_id: GroupId, who: Caller, svc: Services
) -> Response:
    people = await _people(who, svc, account_id)
    try:
        g = await within_db(people.delete_group(account_id, group_id))
    except PeopleError as exc:
        raise refused(exc, "group") from None
    svc.keys.drop_users(g.members)
    return Response(status_code=204)


@router.put(
    _GROUPS + "/{group_id}/members",
    response_model=GroupOut,
    responses=_WRITE,
    openapi_extra=body_doc(MembersIn),
    summary="Set a group's whole membership (users of the account; others: 422)",
)
async def put_members(
    request: Request, account_id: AccountPath, group_id: GroupId, who: Caller, svc: Services
) -> GroupOut:
    await who.on(account_id, "people.manage")
    body = await json_body(request, MembersIn)
    await known(svc, account_id)
    try:
        g, touched = await within_db(
            People(svc.pool).set_members(account_id, group_id, body.user_ids)
        )
    except PeopleError as exc:
        raise refused(exc, "group") from None
    svc.keys.drop_users(touched)
    return GroupOut.of(g)


# --- keys ----------------------------------------------------------------------------------


@router.post(
    _KEYS,
    status_code=201,
    response_model=KeyCreatedOut,
    responses=_WRITE,
    openapi_extra=body_doc(KeyIn),
    summary="Make an API key that acts as a user of the account; the key is shown once",
)
async def create_key(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> KeyCreatedOut:
    """The key acts with the user's role and access groups as they are at each request, and
    opens nothing once the user is disabled. 422 ``unknown_user`` for a user that is not
    the account's; 409 ``user_disabled``."""
    await who.on(account_id, "people.manage")
    body = await json_body(request, KeyIn)
    await known(svc, account_id)
    u = await within_db(People(svc.pool).user(body.user_id, account_id=account_id))
    if u is None:
        raise ApiError(422, "unknown_user", "no user of that id in this account", "user_id")
    if u.disabled_at is not None:
        raise refused(UserDisabled("the user is disabled"), "user")
    # The user's role, never the caller's: a user of an account is an admin or a user of it
    # (the schema keeps operators out of accounts), so no key made here outranks its admins.
    assert u.role in ("admin", "user")
    made, secret = await within_db(
        svc.keys.create(account_id, u.role, user_id=u.id, label=body.label)
    )
    info = await within_db(svc.keys.get(made.key_id, account_id=account_id))
    assert info is not None
    return KeyCreatedOut(**KeyOut.of(info).model_dump(), key=secret)


@router.get(
    _KEYS,
    response_model=KeysPage,
    responses=_READ,
    summary="The account's API keys (never the secret)",
)
async def list_keys(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> KeysPage:
    """Every key of the account, its users', service keys and revoked ones, newest first."""
    await _people(who, svc, account_id)
    before = pages.decode("keys", cursor)
    rows = await within_db(svc.keys.list(account_id, limit=limit + 1, before=before))
    shown, next_cursor = pages.page("keys", rows, limit, lambda k: (k.created_at, k.key_id))
    return KeysPage(data=[KeyOut.of(k) for k in shown], next_cursor=next_cursor)


@router.delete(
    _KEYS + "/{key_id}",
    status_code=204,
    response_class=Response,
    responses=_READ,
    summary="Revoke a key (idempotent); the API's processes refuse it within seconds",
)
async def revoke_key(
    account_id: AccountPath, key_id: KeyId, who: Caller, svc: Services
) -> Response:
    await _people(who, svc, account_id)
    if await within_db(svc.keys.get(key_id, account_id=account_id)) is None:
        raise ApiError(404, "key_not_found", "no key of that id in this account", "key_id")
    await within_db(svc.keys.revoke(key_id, account_id=account_id))
    return Response(status_code=204)


# --- who am I ------------------------------------------------------------------------------


@router.get(
    "/v1/me",
    response_model=MeOut,
    responses=errors.responses(401, 503),
    summary="Who the key is: its kind, role, account, user and privileges",
)
async def me(who: Caller, svc: Services) -> MeOut:
    """Any valid key may ask, service and operator keys too: it tells the caller only
    about itself."""
    k = who.key
    u = None if k.user_id is None else await within_db(People(svc.pool).user(k.user_id))
    if k.user_id is not None:
        kind = "user"
    elif k.role in ("service", "operator"):
        kind = k.role
    else:
        kind = "account"
    return MeOut.model_validate(
        {
            "key_id": k.key_id,
            "kind": kind,
            "role": k.role,
            "account_id": k.account_id,
            "user_id": k.user_id,
            "email": None if u is None else u.email,
            "name": None if u is None else u.name,
            "privileges": sorted(k.privileges),
            "managed": k.manager_id is not None,
            "is_manager": k.is_manager,
        }
    )
