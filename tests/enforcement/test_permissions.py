"""Who may do what, tested whole: every route of the OpenAPI document x every kind of principal,
against this file's own table (not the code's ``infra.http.access.RULES``: the two must agree).
A route added without a row here fails ``test_every_route_has_a_row``.

For a principal the table allows, the answer may be anything but 401 and a 403 ``forbidden``
(the empty body a route gets here is usually a 422: nothing moves); for one it does not, it is
403 ``forbidden``; a revoked key and no key are 401 everywhere.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import pytest

from balance.accounts import AccountSpec, create_accounts
from meter.apiserver import create_app
from tests.api import Api, assert_error, call

# The principals. Each acts on one target account (its own, unless its name says otherwise).
OPERATOR: Final = "operator"
SERVICE: Final = "service"
ADMIN: Final = "tenant_admin"
ACCOUNT_KEY: Final = "account_key_admin"  # an admin key made before users existed
USER: Final = "tenant_user"
EDIT_BILLING: Final = "user_edit_billing"
VIEW_UNIT: Final = "user_view_billing_unit"
EDIT_UNIT: Final = "user_edit_billing_unit"
MANAGER: Final = "manager_on_managed"
MANAGER_FOREIGN: Final = "manager_on_foreign"
MANAGED_ON_MANAGER: Final = "managed_on_its_manager"
REVOKED: Final = "revoked_key"
NO_KEY: Final = "no_key"
PRINCIPALS: Final = (
    OPERATOR,
    SERVICE,
    ADMIN,
    ACCOUNT_KEY,
    USER,
    EDIT_BILLING,
    VIEW_UNIT,
    EDIT_UNIT,
    MANAGER,
    MANAGER_FOREIGN,
    MANAGED_ON_MANAGER,
    REVOKED,
    NO_KEY,
)

PEOPLE = frozenset({USER, EDIT_BILLING, VIEW_UNIT, EDIT_UNIT})
ADMINS = frozenset({ADMIN, ACCOUNT_KEY})
OWN = ADMINS | PEOPLE
BILLING_READ = ADMINS | {EDIT_BILLING, MANAGER, OPERATOR}
BILLING_WRITE = ADMINS | {EDIT_BILLING, MANAGER}
MANAGERS = frozenset({MANAGER, MANAGER_FOREIGN})  # the same key: routes with no account
UNITS_READ = ADMINS | {VIEW_UNIT, EDIT_UNIT, MANAGER, OPERATOR}
UNITS_WRITE = ADMINS | {EDIT_UNIT, MANAGER}
PEOPLE_MANAGE = ADMINS | {MANAGER, OPERATOR}

#: (method, path) -> the principals allowed.
TABLE: Final[dict[tuple[str, str], frozenset[str]]] = {
    ("POST", "/v1/authorizations"): OWN | {SERVICE, MANAGER},
    ("GET", "/v1/accounts/{account_id}/balance"): OWN | {SERVICE, MANAGER, OPERATOR},
    ("POST", "/v1/accounts/{account_id}/suspend"): ADMINS | {MANAGER, OPERATOR},
    ("POST", "/v1/accounts/{account_id}/resume"): ADMINS | {MANAGER, OPERATOR},
    ("POST", "/v1/accounts"): MANAGERS | {OPERATOR},
    ("GET", "/v1/accounts"): MANAGERS | {OPERATOR},
    ("GET", "/v1/accounts/{account_id}"): OWN | {MANAGER, OPERATOR},
    ("PATCH", "/v1/accounts/{account_id}"): frozenset({OPERATOR}),
    ("POST", "/v1/accounts/{account_id}/bundles"): BILLING_WRITE,
    ("PUT", "/v1/accounts/{account_id}/auto_recharge"): BILLING_WRITE,
    ("GET", "/v1/accounts/{account_id}/auto_recharge"): BILLING_READ,
    ("PUT", "/v1/accounts/{account_id}/payment_method"): BILLING_WRITE,
    ("GET", "/v1/accounts/{account_id}/payment_method"): BILLING_READ,
    ("DELETE", "/v1/accounts/{account_id}/payment_method"): BILLING_WRITE,
    ("POST", "/v1/accounts/{account_id}/payments"): BILLING_WRITE,
    ("GET", "/v1/accounts/{account_id}/payments"): BILLING_READ,
    ("POST", "/v1/accounts/{account_id}/payments/{payment_id}/refunds"): frozenset({OPERATOR}),
    ("POST", "/v1/accounts/{account_id}/credits"): frozenset({OPERATOR}),
    ("POST", "/v1/accounts/{account_id}/billing_groups"): UNITS_WRITE,
    ("GET", "/v1/accounts/{account_id}/billing_groups"): UNITS_READ,
    ("PATCH", "/v1/accounts/{account_id}/billing_groups/{group_id}"): UNITS_WRITE,
    ("DELETE", "/v1/accounts/{account_id}/billing_groups/{group_id}"): UNITS_WRITE,
    ("PUT", "/v1/accounts/{account_id}/billing_groups/{group_id}/numbers"): UNITS_WRITE,
    ("PUT", "/v1/accounts/{account_id}/billing_groups/{group_id}/users"): UNITS_WRITE,
    ("GET", "/v1/accounts/{account_id}/outbound_profiles"): UNITS_READ,
    # an account's profiles, not one unit's: its admins' (and its manager's)
    ("PUT", "/v1/accounts/{account_id}/outbound_profiles/{profile_id}"): ADMINS | {MANAGER},
    ("DELETE", "/v1/accounts/{account_id}/outbound_profiles/{profile_id}"): ADMINS | {MANAGER},
    ("GET", "/v1/accounts/{account_id}/ledger_records"): BILLING_READ | UNITS_READ,
    ("GET", "/v1/accounts/{account_id}/usage"): BILLING_READ | UNITS_READ,
    ("GET", "/v1/accounts/{account_id}/numbers"): BILLING_READ,
    ("GET", "/v1/accounts/{account_id}/numbers/{number}"): BILLING_READ,
    ("PATCH", "/v1/accounts/{account_id}/numbers/{number}"): BILLING_WRITE,
    ("POST", "/v1/accounts/{account_id}/numbers/{number}/release"): BILLING_WRITE,
    ("GET", "/v1/accounts/{account_id}/subscription"): BILLING_READ,
    ("PATCH", "/v1/accounts/{account_id}/subscription"): BILLING_WRITE,
    ("GET", "/v1/plans"): frozenset(PRINCIPALS) - {SERVICE, REVOKED, NO_KEY},
    ("GET", "/v1/accounts/{account_id}/invoices"): BILLING_READ,
    ("GET", "/v1/accounts/{account_id}/invoices/{invoice_id}"): BILLING_READ,
    ("GET", "/v1/accounts/{account_id}/invoices/{invoice_id}.pdf"): BILLING_READ,
    ("POST", "/v1/accounts/{account_id}/invoices/{invoice_id}/payments"): BILLING_WRITE,
    ("POST", "/v1/accounts/{account_id}/invoices/{invoice_id}/cancel"): frozenset({OPERATOR}),
    ("GET", "/v1/accounts/{account_id}/invoice_settings"): BILLING_READ,
    ("PATCH", "/v1/accounts/{account_id}/invoice_settings"): BILLING_WRITE,
    ("POST", "/v1/accounts/{account_id}/users"): PEOPLE_MANAGE,
    ("GET", "/v1/accounts/{account_id}/users"): PEOPLE_MANAGE,
    ("GET", "/v1/accounts/{account_id}/users/{user_id}"): PEOPLE_MANAGE,
    ("PATCH", "/v1/accounts/{account_id}/users/{user_id}"): PEOPLE_MANAGE,
    ("DELETE", "/v1/accounts/{account_id}/users/{user_id}"): PEOPLE_MANAGE,
    ("POST", "/v1/accounts/{account_id}/access_groups"): PEOPLE_MANAGE,
    ("GET", "/v1/accounts/{account_id}/access_groups"): PEOPLE_MANAGE,
    ("GET", "/v1/accounts/{account_id}/access_groups/{group_id}"): PEOPLE_MANAGE,
    ("PATCH", "/v1/accounts/{account_id}/access_groups/{group_id}"): PEOPLE_MANAGE,
    ("DELETE", "/v1/accounts/{account_id}/access_groups/{group_id}"): PEOPLE_MANAGE,
    ("PUT", "/v1/accounts/{account_id}/access_groups/{group_id}/members"): PEOPLE_MANAGE,
    ("POST", "/v1/accounts/{account_id}/keys"): PEOPLE_MANAGE,
    ("GET", "/v1/accounts/{account_id}/keys"): PEOPLE_MANAGE,
    ("DELETE", "/v1/accounts/{account_id}/keys/{key_id}"): PEOPLE_MANAGE,
    ("GET", "/v1/me"): frozenset(PRINCIPALS) - {REVOKED, NO_KEY},
    ("POST", "/v1/events"): frozenset({SERVICE}),
}

#: Query parameters a route needs (else FastAPI answers 422 before the route runs).
QUERIES: Final = {"/v1/accounts/{account_id}/ledger_records": "?month=2026-11"}
#: Path parameters other than the account: well-formed ids nobody has.
PARAMS: Final = {
    "/billing_groups/{group_id}": "/billing_groups/bg_0000000000000000",
    "/access_groups/{group_id}": "/access_groups/grp_0000000000000000",
    "{profile_id}": "p_nobody",
    "{user_id}": "usr_0000000000000000",
    "{key_id}": "0000000000000000",
    "{number}": "+14155550100",
    "{invoice_id}": "inv_0000000000000000",
    "{payment_id}": "p_nobody",
}


@dataclass(frozen=True)
class Who:
    headers: dict[str, str]
    target: str  # the account it acts on


async def user_key(
    api: Api, account_id: str, role: str, privileges: tuple[str, ...] = ()
) -> dict[str, str]:
    """A user of ``account_id`` with ``role``, in a group with ``privileges``, and a key of it."""
    user_id = "usr_" + secrets.token_hex(8)
    pool = api.svc.pool
    await pool.execute(
        "INSERT INTO users (id, account_id, email, role) VALUES ($1, $2, $3, $4)",
        user_id,
        account_id,
        f"{user_id}@example.com",
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
    _, key = await api.svc.keys.create(account_id, role, user_id=user_id)  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {key}"}


async def world(api: Api) -> dict[str, Who]:
    """Accounts: ``ten`` (a tenant), ``mgr`` (a manager) and ``sub`` (managed by it), ``other``
    (a stranger), ``platform`` (whose service key call-control holds); a key of each kind."""
    await api.seed("ten", "mgr", "other", "platform")
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    await create_accounts(api.svc.pool, api.svc.balances, [AccountSpec(id="sub", manager_id="mgr")])
    _, op = await api.svc.keys.create(None, "operator")
    revoked, revoked_key = await api.svc.keys.create("ten", "admin")
    await api.svc.keys.revoke(revoked.key_id)
    mgr = await user_key(api, "mgr", "admin")
    return {
        OPERATOR: Who({"Authorization": f"Bearer {op}"}, "ten"),
        SERVICE: Who(await api.key("platform", "service"), "ten"),
        ADMIN: Who(await user_key(api, "ten", "admin"), "ten"),
        ACCOUNT_KEY: Who(await api.key("ten", "admin"), "ten"),
        USER: Who(await user_key(api, "ten", "user"), "ten"),
        EDIT_BILLING: Who(await user_key(api, "ten", "user", ("edit_billing",)), "ten"),
        VIEW_UNIT: Who(await user_key(api, "ten", "user", ("view_billing_unit",)), "ten"),
        EDIT_UNIT: Who(await user_key(api, "ten", "user", ("edit_billing_unit",)), "ten"),
        MANAGER: Who(mgr, "sub"),
        MANAGER_FOREIGN: Who(mgr, "other"),
        MANAGED_ON_MANAGER: Who(await user_key(api, "sub", "admin"), "mgr"),
        REVOKED: Who({"Authorization": f"Bearer {revoked_key}"}, "ten"),
        NO_KEY: Who({}, "ten"),
    }


def routes(api: Api) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document that needs a key."""
    app = create_app(api.settings, api.svc)
    return [
        (method.upper(), path)
        for path, ops in app.openapi()["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    ]


def fill(path: str, target: str) -> str:
    """The path with the target account, made-up ids for every other parameter, and the
    query a route needs."""
    url = path.replace("{account_id}", target)
    for name, value in PARAMS.items():
        url = url.replace(name, value)
    assert not re.search(r"\{[a-z_]+\}", url), f"give {path} a made-up id in PARAMS"
    return url + QUERIES.get(path, "")


async def send(api: Api, method: str, path: str, who: Who) -> httpx.Response:
    url = fill(path, who.target)
    if path == "/v1/authorizations":
        body: Mapping[str, Any] | None = call(who.target, "perm-" + secrets.token_hex(4))
    elif method in ("POST", "PUT", "PATCH"):
        body = {}
    else:
        body = None
    return await api.client.request(method, url, json=body, headers=who.headers)


def forbidden(r: httpx.Response) -> bool:
    return r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


async def test_every_route_has_a_row(api: Api) -> None:
    assert set(routes(api)) == set(TABLE), "a route without a row, or a row without a route"


async def test_every_route_x_every_principal(api: Api) -> None:
    who = await world(api)
    wrong: list[str] = []
    for method, path in routes(api):
        allowed = TABLE[(method, path)]
        for name in PRINCIPALS:
            r = await send(api, method, path, who[name])
            if name in (REVOKED, NO_KEY):
                ok = r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            elif name in allowed:
                ok = r.status_code != 401 and not forbidden(r)
            else:
                ok = forbidden(r)
            if not ok:
                want = "allowed" if name in allowed else "403 forbidden"
                wrong.append(f"{method} {path} as {name}: {r.status_code} {r.text[:120]} ({want})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", [ADMIN, USER, MANAGER_FOREIGN, MANAGED_ON_MANAGER])
async def test_another_account_answers_the_same_whether_or_not_it_exists(
    api: Api, name: str
) -> None:
    who = await world(api)
    foreign = who[name] if who[name].target != "ten" else Who(who[name].headers, "other")
    for method, path in routes(api):
        if "{account_id}" not in path:
            continue
        there = await send(api, method, path, foreign)
        nowhere = await send(api, method, path, Who(foreign.headers, "acc_" + secrets.token_hex(6)))
        assert forbidden(there), (method, path, there.text)
        assert (nowhere.status_code, nowhere.json()) == (there.status_code, there.json())


async def test_a_disabled_user_or_a_demoted_one_loses_what_its_keys_could_do(api: Api) -> None:
    who = await world(api)
    r = await api.client.get("/v1/accounts/ten/payments", headers=who[ADMIN].headers)
    assert not forbidden(r)
    user_id = await api.svc.pool.fetchval(
        "SELECT user_id FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE u.account_id = 'ten' AND u.role = 'admin' LIMIT 1"
    )
    await api.svc.pool.execute("UPDATE users SET role = 'user' WHERE id = $1", user_id)
    api.svc.keys.forget()
    r = await api.client.get("/v1/accounts/ten/payments", headers=who[ADMIN].headers)
    assert_error(r, 403, "forbidden")
    await api.svc.pool.execute("UPDATE users SET disabled_at = now() WHERE id = $1", user_id)
    api.svc.keys.forget()
    r = await api.client.get("/v1/accounts/ten/balance", headers=who[ADMIN].headers)
    assert_error(r, 401, "unauthorized")
