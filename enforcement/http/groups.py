"""Billing groups (billing units), outbound profiles and the month's ledger records by group
(``enforcement.groups``). Permissions (``infra.http.access``): ``billing_units.read`` /
``.write``; a user who holds them through its access groups sees and edits only the units it
belongs to (seed 002). The ledger records need ``billing.read``, or ``billing_units.read``
for a user's own units."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from contracts.events import E164_PATTERN
from contracts.money import format_money
from enforcement import groups
from enforcement import usage as usage_store
from enforcement.http.services import Services, known
from infra.http import errors, pages
from infra.http.access import Permission
from infra.http.bodies import AccountPath, body_doc, json_body
from infra.http.bounds import within_db
from infra.http.callers import Caller, Principal
from infra.http.errors import ApiError
from infra.http.models import Money, RequestBody

router = APIRouter()

_GROUP_ID: Final = r"^bg_[a-z0-9]{16}$"
_PROFILE_ID: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
GroupPath = Annotated[str, Path(pattern=_GROUP_ID)]
ProfilePath = Annotated[str, Path(pattern=_PROFILE_ID)]
_NAME = Annotated[str, Field(min_length=1, max_length=100)]
#: A group's numbers or users, replaced whole: bounded, so one request stays one statement.
MAX_MEMBERS: Final = 10_000


class GroupIn(RequestBody):
    name: _NAME


class NumbersIn(RequestBody):
    numbers: Annotated[
        list[Annotated[str, Field(pattern=E164_PATTERN)]], Field(max_length=MAX_MEMBERS)
    ]


class UsersIn(RequestBody):
    user_ids: Annotated[
        list[Annotated[str, Field(pattern=r"^usr_[a-z0-9]{16}$")]], Field(max_length=MAX_MEMBERS)
    ]


class ProfileIn(RequestBody):
    name: Annotated[str, Field(max_length=100)] = ""
    billing_group_id: Annotated[str, Field(pattern=_GROUP_ID)] | None = None


class GroupOut(BaseModel):
    id: str
    name: str
    numbers: list[str]
    users: list[str]
    outbound_profiles: list[str]
    created_at: datetime


class GroupsOut(BaseModel):
    data: list[GroupOut]


class ProfileOut(BaseModel):
    id: str
    name: str
    billing_group_id: str | None


class ProfilesOut(BaseModel):
    data: list[ProfileOut]


class LineOut(BaseModel):
    billing_group_id: str | None = Field(description="null: charges in no group")
    kind: str = Field(description="call, sms, fee, bundle, credit (payments), provisional, ...")
    direction: str | None = Field(description="inbound / outbound for calls")
    count: int
    quantity: int = Field(description="billed seconds, message parts, numbers, bundle seconds")
    included_s: int = Field(description="seconds taken from included minutes and bundles")
    amount: Money = Field(description="signed as in the ledger: charges negative")


class LedgerRecordsOut(BaseModel):
    account_id: str
    month: str
    lines: list[LineOut]
    total: Money = Field(description="the sum of the lines: the ledger's sum for the month")


def group_out(g: groups.Group) -> GroupOut:
    return GroupOut(
        id=g.id,
        name=g.name,
        numbers=g.numbers,
        users=g.users,
        outbound_profiles=g.outbound_profiles,
        created_at=g.created_at,
    )


def _refused(exc: groups.GroupError) -> ApiError:
    status = 409 if exc.code in ("billing_group_in_use", "name_taken") else 422
    return ApiError(status, exc.code, exc.message, exc.field)


def _no_group(group_id: str) -> ApiError:
    return ApiError(404, "billing_group_not_found", f"no billing group {group_id!r}", "group_id")


async def _scope(
    who: Principal, svc: Services, account_id: str, permission: Permission
) -> list[str] | None:
    """The groups the caller may see or edit: None for all of them (an admin, a manager, an
    operator), else those a user with the unit privileges belongs to."""
    relation = await who.on(account_id, permission)
    if relation == "own" and who.key.role == "user":
        if who.key.user_id is None:
            return []
        return await within_db(groups.groups_of_user(svc.pool, account_id, who.key.user_id))
    return None


async def _usage_scope(who: Principal, svc: Services, account_id: str) -> list[str] | None:
    """Whose charges the caller may read: all (``billing.read``: None), else the groups it
    belongs to (a user with the billing-unit privileges); 403 for anyone else."""
    try:
        await who.on(account_id, "billing.read")
        return None
    except ApiError as exc:
        if exc.status != 403:
            raise
    return await _scope(who, svc, account_id, "billing_units.read")


async def _editable(who: Principal, svc: Services, account_id: str, group_id: str) -> None:
    scope = await _scope(who, svc, account_id, "billing_units.write")
    if scope is not None and group_id not in scope:
        raise _no_group(group_id)  # the same answer as for a group that does not exist


@router.post(
    "/v1/accounts/{account_id}/billing_groups",
    status_code=201,
    response_model=GroupOut,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(GroupIn),
    summary="Create a billing group (billing unit)",
)
async def create(
    request: Request, account_id: AccountPath, who: Caller, svc: Services
) -> JSONResponse:
    """A user with Edit Billing unit who creates a unit belongs to it, so it can edit it."""
    scope = await _scope(who, svc, account_id, "billing_units.write")
    body = await json_body(request, GroupIn)
    await known(svc, account_id)
    try:
        g = await within_db(groups.create(svc.pool, account_id, body.name))
        if scope is not None and who.key.user_id is not None:
            got = await within_db(groups.set_users(svc.pool, account_id, g.id, [who.key.user_id]))
            g = got or g
    except groups.GroupError as exc:
        raise _refused(exc) from None
    return JSONResponse(group_out(g).model_dump(mode="json"), status_code=201)


@router.get(
    "/v1/accounts/{account_id}/billing_groups",
    response_model=GroupsOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The account's billing groups, with their numbers, users and outbound profiles",
)
async def list_(account_id: AccountPath, who: Caller, svc: Services) -> GroupsOut:
    scope = await _scope(who, svc, account_id, "billing_units.read")
    await known(svc, account_id)
    found = await within_db(groups.groups(svc.pool, account_id, only=scope))
    return GroupsOut(data=[group_out(g) for g in found])


@router.patch(
    "/v1/accounts/{account_id}/billing_groups/{group_id}",
    response_model=GroupOut,
    responses=errors.responses(400, 401, 403, 404, 409, 422, 503),
    openapi_extra=body_doc(GroupIn),
    summary="Rename a billing group",
)
async def rename(
    request: Request, account_id: AccountPath, group_id: GroupPath, who: Caller, svc: Services
) -> GroupOut:
    await _editable(who, svc, account_id, group_id)
    body = await json_body(request, GroupIn)
    try:
        g = await within_db(groups.rename(svc.pool, account_id, group_id, body.name))
    except groups.GroupError as exc:
        raise _refused(exc) from None
    if g is None:
        raise _no_group(group_id)
    return group_out(g)


@router.delete(
    "/v1/accounts/{account_id}/billing_groups/{group_id}",
    status_code=204,
    responses=errors.responses(401, 403, 404, 409, 422, 503),
    summary="Delete a billing group; one in use needs reassign_to (a group, or none)",
)
async def delete(
    account_id: AccountPath,
    group_id: GroupPath,
    who: Caller,
    svc: Services,
    reassign_to: Annotated[str | None, Query(pattern=r"^(none|bg_[a-z0-9]{16})$")] = None,
) -> Response:
    """Refused with 409 ``billing_group_in_use`` while numbers or outbound profiles are in
    it: ``reassign_to=<group id>`` moves them there, ``reassign_to=none`` leaves them in no
    group. Charges already rated keep this group in the ledger and in past reports."""
    await _editable(who, svc, account_id, group_id)
    to = None if reassign_to in (None, "none") else reassign_to
    try:
        done = await within_db(
            groups.delete(
                svc.pool, account_id, group_id, reassign_to=to, force=reassign_to == "none"
            )
        )
    except groups.GroupError as exc:
        raise _refused(exc) from None
    if not done:
        raise _no_group(group_id)
    return Response(status_code=204)


@router.put(
    "/v1/accounts/{account_id}/billing_groups/{group_id}/numbers",
    response_model=GroupOut,
    responses=errors.responses(400, 401, 403, 404, 413, 422, 503),
    openapi_extra=body_doc(NumbersIn),
    summary="The group's numbers, whole: listed numbers move here (one group per number)",
)
async def put_numbers(
    request: Request, account_id: AccountPath, group_id: GroupPath, who: Caller, svc: Services
) -> GroupOut:
    """Charges rated from now on take the new assignment; those already rated keep theirs."""
    await _editable(who, svc, account_id, group_id)
    body = await json_body(request, NumbersIn)
    g = await within_db(groups.set_numbers(svc.pool, account_id, group_id, body.numbers))
    if g is None:
        raise _no_group(group_id)
    return group_out(g)


@router.put(
    "/v1/accounts/{account_id}/billing_groups/{group_id}/users",
    response_model=GroupOut,
    responses=errors.responses(400, 401, 403, 404, 413, 422, 503),
    openapi_extra=body_doc(UsersIn),
    summary="The group's users, whole (a user may be in several groups)",
)
async def put_users(
    request: Request, account_id: AccountPath, group_id: GroupPath, who: Caller, svc: Services
) -> GroupOut:
    await _editable(who, svc, account_id, group_id)
    body = await json_body(request, UsersIn)
    try:
        g = await within_db(groups.set_users(svc.pool, account_id, group_id, body.user_ids))
    except groups.GroupError as exc:
        raise _refused(exc) from None
    if g is None:
        raise _no_group(group_id)
    return group_out(g)


@router.get(
    "/v1/accounts/{account_id}/outbound_profiles",
    response_model=ProfilesOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The account's outbound profiles and their billing groups",
)
async def list_profiles(account_id: AccountPath, who: Caller, svc: Services) -> ProfilesOut:
    await who.on(account_id, "billing_units.read")
    await known(svc, account_id)
    found = await within_db(groups.profiles(svc.pool, account_id))
    return ProfilesOut(data=[profile_out(p) for p in found])


def profile_out(p: groups.Profile) -> ProfileOut:
    return ProfileOut(id=p.id, name=p.name, billing_group_id=p.billing_group_id)


@router.put(
    "/v1/accounts/{account_id}/outbound_profiles/{profile_id}",
    response_model=ProfileOut,
    responses=errors.responses(400, 401, 403, 404, 422, 503),
    openapi_extra=body_doc(ProfileIn),
    summary="Create or replace an outbound profile: its calls go to its billing group",
)
async def put_profile(
    request: Request,
    account_id: AccountPath,
    profile_id: ProfilePath,
    who: Caller,
    svc: Services,
) -> ProfileOut:
    # Profiles are the account's, not one unit's: an admin's (or manager's) to change.
    if await _scope(who, svc, account_id, "billing_units.write") is not None:
        raise ApiError(403, "forbidden", "outbound profiles are changed by an admin")
    body = await json_body(request, ProfileIn)
    await known(svc, account_id)
    try:
        p = await within_db(
            groups.put_profile(svc.pool, account_id, profile_id, body.name, body.billing_group_id)
        )
    except groups.GroupError as exc:
        raise _refused(exc) from None
    return profile_out(p)


@router.delete(
    "/v1/accounts/{account_id}/outbound_profiles/{profile_id}",
    status_code=204,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="Delete an outbound profile (its calls then go to their from number's group)",
)
async def delete_profile(
    account_id: AccountPath,
    profile_id: ProfilePath,
    who: Caller,
    svc: Services,
) -> Response:
    if await _scope(who, svc, account_id, "billing_units.write") is not None:
        raise ApiError(403, "forbidden", "outbound profiles are changed by an admin")
    if not await within_db(groups.delete_profile(svc.pool, account_id, profile_id)):
        raise ApiError(
            404, "outbound_profile_not_found", f"no profile {profile_id!r}", "profile_id"
        )
    return Response(status_code=204)


@router.get(
    "/v1/accounts/{account_id}/ledger_records",
    response_model=LedgerRecordsOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The month's ledger records by billing group and kind, as JSON or CSV",
)
async def ledger_records(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    month: Annotated[str, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")],
    format: Literal["json", "csv"] = "json",
) -> Response:
    """Usage, fees, bundles, payments and credits of ``month`` (UTC, by each charge's own
    time), summed per billing group, kind and direction; ``total`` is the ledger's sum for the
    month. Amounts and quantities only, never a rate. A user with View Billing unit (and not
    Edit Billing) gets only the lines of the units it belongs to."""
    scope = await _usage_scope(who, svc, account_id)
    await known(svc, account_id)
    report = await within_db(groups.month_report(svc.pool, account_id, month, only_groups=scope))
    if format == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(
            ["billing_group_id", "kind", "direction", "count", "quantity", "included_s", "amount"]
        )
        for line in report.lines:
            w.writerow(
                [
                    line.billing_group_id,
                    line.kind,
                    line.direction,
                    line.count,
                    line.quantity,
                    line.included_s,
                    format_money(line.amount),
                ]
            )
        w.writerow(["", "total", "", "", "", "", format_money(report.total)])
        return Response(
            out.getvalue(),
            media_type="text/csv",
            headers={
                "Content-Disposition": f'attachment; filename="ledger-{account_id}-{month}.csv"'
            },
        )
    body = LedgerRecordsOut(
        account_id=account_id,
        month=month,
        lines=[
            LineOut(
                billing_group_id=line.billing_group_id or None,
                kind=line.kind,
                direction=line.direction or None,
                count=line.count,
                quantity=line.quantity,
                included_s=line.included_s,
                amount=format_money(line.amount),
            )
            for line in report.lines
        ],
        total=format_money(report.total),
    )
    return JSONResponse(body.model_dump(mode="json"))


class UsageRowOut(BaseModel):
    time: datetime
    type: str = Field(description="call, sms, fee (a number's), bundle, provisional")
    id: str = Field(description="the call id, the message id, the number, the purchase")
    from_: str | None = Field(alias="from")
    to: str | None
    direction: str | None = Field(description="inbound / outbound for calls")
    billed_s: int | None = Field(description="billed seconds of a call")
    quantity: int = Field(description="billed seconds, message parts, numbers, bundle seconds")
    included_s: int = Field(description="seconds taken from included minutes and bundles")
    amount: Money = Field(description="signed as in the ledger: charges negative")
    billing_group_id: str | None


class UsageOut(BaseModel):
    data: list[UsageRowOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: done")


def _usage_at(row: usage_store.UsageRow) -> pages.Position:
    # the ledger's own order: a row's time, then its entry id
    return row.time, str(row.entry_id)


@router.get(
    "/v1/accounts/{account_id}/usage",
    response_model=UsageOut,
    responses=errors.responses(401, 403, 404, 422, 503),
    summary="The usage history: charged calls, messages, number fees and bundles, newest first",
)
async def usage(
    account_id: AccountPath,
    who: Caller,
    svc: Services,
    since: Annotated[datetime | None, Query(description="from this time on (RFC 3339)")] = None,
    until: Annotated[datetime | None, Query(description="before this time")] = None,
    type: Annotated[
        Literal["call", "sms", "fee", "bundle", "provisional"] | None, Query()
    ] = None,
    billing_group_id: Annotated[str | None, Query(pattern=_GROUP_ID)] = None,
    number: Annotated[str | None, Query(pattern=E164_PATTERN)] = None,
    limit: pages.Limit = pages.DEFAULT_LIMIT,
    cursor: pages.Cursor = None,
) -> JSONResponse:
    """Quantities and amounts, never a rate. A user with View Billing unit (and not Edit
    Billing) sees the rows of its units only."""
    scope = await _usage_scope(who, svc, account_id)
    for t in (since, until):
        if t is not None and t.tzinfo is None:
            raise ApiError(422, "validation_error", "times need an offset (Z for UTC)", "since")
    if billing_group_id is not None:
        scope = [billing_group_id] if scope is None else [g for g in scope if g == billing_group_id]
    at = pages.decode("usage", cursor)
    before = None if at is None or not at[1].isdigit() else (at[0], int(at[1]))
    if at is not None and before is None:
        raise ApiError(422, "validation_error", "cursor: not a cursor of this list", "cursor")
    await known(svc, account_id)
    rows = await within_db(
        usage_store.usage(
            svc.pool,
            account_id,
            since=since,
            until=until,
            kinds=[type] if type else usage_store.USAGE_KINDS,
            groups=scope,
            number=number,
            before=before,
            limit=limit + 1,
        )
    )
    rows, next_cursor = pages.page("usage", rows, limit, _usage_at)
    out = UsageOut(
        data=[
            UsageRowOut.model_validate(
                {
                    "time": r.time,
                    "type": r.kind,
                    "id": r.ref,
                    "from": r.from_party or None,
                    "to": r.to_party or None,
                    "direction": r.direction or None,
                    "billed_s": r.quantity if r.kind == "call" else None,
                    "quantity": r.quantity,
                    "included_s": r.included_s,
                    "amount": format_money(r.amount),
                    "billing_group_id": r.billing_group_id or None,
                }
            )
            for r in rows
        ],
        next_cursor=next_cursor,
    )
    return JSONResponse(out.model_dump(mode="json", by_alias=True))
