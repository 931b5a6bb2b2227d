"""Bodies of the people routes (``enforcement.http.people``): users, access groups, keys and
``GET /v1/me`` (pydantic v2; they are the OpenAPI schemas). Requests are strict and refuse
unknown fields (``infra.http.models.RequestBody``); every string has a bound."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from enforcement.people import (
    MAX_EMAIL,
    MAX_GROUP_NAME,
    MAX_MEMBERS,
    MAX_USER_NAME,
    AccessGroup,
    User,
    normalize_email,
)
from infra.http.api_keys import KeyInfo, Privilege
from infra.http.models import RequestBody

# No control characters: names and labels end up in logs, CSV exports and emails.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"

Email = Annotated[
    str,
    Field(max_length=MAX_EMAIL, examples=["ada@example.com"]),
    AfterValidator(normalize_email),
]
UserName = Annotated[str, Field(max_length=MAX_USER_NAME, pattern=_PRINTABLE)]
GroupName = Annotated[str, Field(min_length=1, max_length=MAX_GROUP_NAME, pattern=_PRINTABLE)]
Label = Annotated[str, Field(max_length=100, pattern=_PRINTABLE)]
#: The roles of an account's people; operators are made with the CLI only.
AccountRole = Literal["admin", "user"]
UserId = Annotated[str, Field(pattern=r"^usr_[a-z0-9]{16}$", examples=["usr_0123456789abcdef"])]
GroupId = Annotated[str, Field(pattern=r"^grp_[a-z0-9]{16}$")]
KeyId = Annotated[str, Field(pattern=r"^[a-z0-9]{16}$")]
Privileges = Annotated[
    list[Privilege],
    Field(max_length=10, description="What the group adds to its users' role"),
]


class UserIn(RequestBody):
    email: Email = Field(description="Unique across the platform; stored in lower case")
    name: UserName = ""
    role: AccountRole


class UserPatch(RequestBody):
    """Omitted (or null) fields stay as they are."""

    name: UserName | None = None
    role: AccountRole | None = Field(
        None, description="The user's keys act with the new role within seconds"
    )


class UserOut(BaseModel):
    id: str
    account_id: str
    email: str
    name: str
    role: AccountRole
    created_at: datetime
    disabled_at: datetime | None = Field(description="Set: the user's keys open nothing")

    @classmethod
    def of(cls, u: User) -> UserOut:
        assert u.account_id is not None and u.role != "operator"
        return cls(
            id=u.id,
            account_id=u.account_id,
            email=u.email,
            name=u.name,
            role=u.role,
            created_at=u.created_at,
            disabled_at=u.disabled_at,
        )


class UsersPage(BaseModel):
    data: list[UserOut]
    next_cursor: str | None


class GroupIn(RequestBody):
    name: GroupName
    privileges: Privileges = []


class GroupPatch(RequestBody):
    """Omitted (or null) fields stay as they are; ``privileges`` replaces the whole list."""

    name: GroupName | None = None
    privileges: Privileges | None = None


class MembersIn(RequestBody):
    user_ids: Annotated[
        list[UserId],
        Field(
            max_length=MAX_MEMBERS,
            description="The whole membership: users of the account (others: 422)",
        ),
    ]


class GroupOut(BaseModel):
    id: str
    account_id: str
    name: str
    privileges: list[Privilege]
    members: list[str] = Field(description="User ids")
    created_at: datetime

    @classmethod
    def of(cls, g: AccessGroup) -> GroupOut:
        return cls.model_validate(
            {
                "id": g.id,
                "account_id": g.account_id,
                "name": g.name,
                "privileges": list(g.privileges),
                "members": list(g.members),
                "created_at": g.created_at,
            }
        )


class GroupsPage(BaseModel):
    data: list[GroupOut]
    next_cursor: str | None


class KeyIn(RequestBody):
    """A key that acts as one user of the account, with its role and groups as they are at
    each request. Service and operator keys are the operator's, made with ``meter keys``."""

    user_id: UserId
    label: Label = ""


class KeyOut(BaseModel):
    key_id: str
    account_id: str
    role: str = Field(description="What the key acts with now (a user's key: the user's role)")
    user_id: str | None = Field(description="null: a service key, or a key of the account")
    label: str
    created_at: datetime
    revoked_at: datetime | None
    active: bool = Field(description="Not revoked, and its user not disabled")

    @classmethod
    def of(cls, k: KeyInfo) -> KeyOut:
        assert k.account_id is not None
        return cls(
            key_id=k.key_id,
            account_id=k.account_id,
            role=k.role,
            user_id=k.user_id,
            label=k.label,
            created_at=k.created_at,
            revoked_at=k.revoked_at,
            active=k.active,
        )


class KeyCreatedOut(KeyOut):
    key: str = Field(description="The key itself, shown this once: only its hash is kept")


class KeysPage(BaseModel):
    data: list[KeyOut]
    next_cursor: str | None


class MeOut(BaseModel):
    """Who the key is: what ``Authorization`` names, as the permission checks see it."""

    key_id: str
    kind: Literal["user", "service", "operator", "account"] = Field(
        description="user: acts as a person (user_id); service: switches and call-control; "
        "operator: the platform's staff, no account; account: a key of an account with a "
        "role of its own"
    )
    role: Literal["operator", "admin", "user", "service"]
    account_id: str | None
    user_id: str | None
    email: str | None
    name: str | None
    privileges: list[Privilege] = Field(description="From the user's access groups")
    managed: bool = Field(description="The account is managed by a manager account")
    is_manager: bool = Field(description="The account manages accounts")
