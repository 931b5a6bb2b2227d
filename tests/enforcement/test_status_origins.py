"""Who may lift what (docs/design/status-origins.md), through the served API on the real Redis
and PostgreSQL: every suspension records its origin, a resume lifts only what its caller may
(a tenant its own, a manager its own and the tenant's, an operator everything, the recharge
cap's pin included), a payment lifts the pin and never a suspension, the signals telephony
gets (one suspend, one resume, in seq order), a Redis rebuilt after a flush, a suspend that
comes while a resume is under way, and the migration of the suspensions made before origins."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from balance.accounts import AccountSpec, create_accounts
from balance.errors import OutcomeUnknown
from balance.values import PendingSignal, StatusAction
from enforcement.account_admin import LiftNotPermitted, change_status
from infra.db import migrate
from tests.api import Api, assert_error
from tests.conftest import Services
from tests.helpers import database_before

Headers = dict[str, str]


async def operator(api: Api) -> Headers:
    _, secret = await api.svc.keys.create(None, "operator")
    return {"Authorization": f"Bearer {secret}"}


async def managed(api: Api) -> tuple[Headers, Headers]:
    """Account "sub", managed by "mgr": the keys of the manager's admin and of sub's own."""
    await api.seed("mgr")
    spec = AccountSpec.model_validate({"id": "sub", "manager_id": "mgr", "balance": "50.00"})
    await create_accounts(api.svc.pool, api.svc.balances, [spec])
    await api.svc.pool.execute("UPDATE accounts SET is_manager = true WHERE id = 'mgr'")
    return await api.key("mgr", "admin"), await api.key("sub", "admin")


async def post(
    api: Api, account: str, action: str, headers: Headers, **body: str
) -> httpx.Response:
    return await api.client.post(
        f"/v1/accounts/{account}/{action}", json=body or None, headers=headers
    )


async def pin_cap(api: Api, account: str) -> None:
    """The recharge cap's hold, as the payment service pins it: PostgreSQL, then Redis."""
    await api.svc.pool.execute(
        "UPDATE accounts SET hold_reason = 'recharge_cap' WHERE id = $1", account
    )
    await api.svc.balances.set_status(account, "hold", "recharge_cap")


async def signals(api: Api, account: str) -> list[tuple[str, str]]:
    """The account's queued signals (type, reason), checked to be in strictly increasing seq."""
    queued: list[PendingSignal] = await api.svc.balances.pending_outbox(account)
    seqs = [s.seq for s in queued]
    assert seqs == sorted(set(seqs)), seqs  # in order, none twice
    return [(s.type, s.reason) for s in queued]


async def recorded(api: Api, account: str) -> tuple[list[str], bool, str | None]:
    """What PostgreSQL has: the origins, the suspended flag and the pin."""
    origins = await api.svc.pool.fetch(
        "SELECT origin FROM account_suspensions WHERE account_id = $1 ORDER BY origin", account
    )
    row = await api.svc.pool.fetchrow(
        "SELECT suspended, hold_reason FROM accounts WHERE id = $1", account
    )
    assert row is not None
    return [r["origin"] for r in origins], row["suspended"], row["hold_reason"]


async def status(api: Api, account: str) -> str:
    st = await api.svc.balances.get(account)
    assert st is not None
    return st.status


async def test_a_tenant_admin_cannot_lift_an_operators_suspension(api: Api) -> None:
    await api.seed("acc")
    admin, op = await api.key("acc", "admin"), await operator(api)
    r = await post(api, "acc", "suspend", op, reason="fraud_review")
    assert r.json()["suspended_by"] == ["operator"]

    r = await post(api, "acc", "resume", admin)
    assert_error(r, 403, "lift_not_permitted")
    message = r.json()["error"]["message"]
    assert "suspended by operator" in message and "an operator" in message
    assert await status(api, "acc") == "suspended"
    assert await recorded(api, "acc") == (["operator"], True, None)
    assert await signals(api, "acc") == [("account.suspend", "fraud_review")]
    # the account's users fare no better: they may not even ask
    assert_error(await post(api, "acc", "resume", await api.key("acc", "user")), 403, "forbidden")


async def test_a_tenant_admin_cannot_lift_a_recharge_cap_hold(api: Api) -> None:
    await api.seed("acc")
    admin, service = await api.key("acc", "admin"), await api.key("acc", "service")
    await pin_cap(api, "acc")

    r = await post(api, "acc", "resume", admin)
    assert_error(r, 403, "lift_not_permitted")
    assert "on hold for recharge_cap" in r.json()["error"]["message"]
    assert await status(api, "acc") == "hold"
    assert (await api.svc.balances.recharge_state("acc")).hold_reason == "recharge_cap"
    assert await recorded(api, "acc") == ([], False, "recharge_cap")
    assert await signals(api, "acc") == [("account.hold", "recharge_cap")]
    assert (await api.authorize(service, account_id="acc")).json()["reason"] == "account_on_hold"


async def test_a_tenant_lifting_its_own_suspension_under_a_cap_hold_leaves_it_held(
    api: Api,
) -> None:
    await api.seed("acc")
    admin, service = await api.key("acc", "admin"), await api.key("acc", "service")
    await post(api, "acc", "suspend", admin)
    await pin_cap(api, "acc")  # the cap, reached while suspended: no signal of its own

    r = await post(api, "acc", "resume", admin)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "account_id": "acc",
        "status": "hold",
        "changed": True,
        "suspended_by": [],
        "hold_reason": "recharge_cap",
    }
    assert await recorded(api, "acc") == ([], False, "recharge_cap")
    # it was suspended, now it is held: inbound rings again, outbound stays barred
    assert await signals(api, "acc") == [
        ("account.suspend", "tenant"),
        ("account.resume", "tenant"),
        ("account.hold", "recharge_cap"),
    ]
    assert (await api.authorize(service, account_id="acc")).json()["reason"] == "account_on_hold"
    inbound = await api.authorize(service, account_id="acc", direction="inbound", call_id="in")
    assert inbound.json()["decision"] == "allow"
    # and a second resume has nothing it may lift
    assert_error(await post(api, "acc", "resume", admin), 403, "lift_not_permitted")


async def test_a_payment_lifts_a_cap_hold_but_never_a_suspension(api: Api) -> None:
    await api.seed("acc", "own")
    op = await operator(api)
    for account in ("acc", "own"):
        await pin_cap(api, account)
    await post(api, "acc", "suspend", op, reason="fraud_review")
    own_admin = await api.key("own", "admin")
    await post(api, "own", "suspend", own_admin)

    # a top-up through the API: the settlement clears hold_reason, the payment's credit "hr"
    for account in ("acc", "own"):
        admin = await api.key(account, "admin")
        r = await api.client.put(
            f"/v1/accounts/{account}/payment_method", json={"token": "pm_card_visa"}, headers=admin
        )
        assert r.status_code == 201, r.text
        r = await api.client.post(
            f"/v1/accounts/{account}/payments",
            json={"amount": "20.00", "payment_id": f"p-{account}"},
            headers=admin,
        )
        assert r.status_code in (200, 201), r.text
        assert (await api.svc.balances.recharge_state(account)).hold_reason is None
        assert await status(api, account) == "suspended"  # paid, and still suspended
    assert await recorded(api, "acc") == (["operator"], True, None)
    assert await recorded(api, "own") == (["tenant"], True, None)
    assert await signals(api, "acc") == [
        ("account.hold", "recharge_cap"),
        ("account.suspend", "fraud_review"),
    ]
    # the operator's suspension still answers 403 to the tenant; its own lifts, to active now
    assert_error(
        await post(api, "acc", "resume", await api.key("acc", "admin")), 403, "lift_not_permitted"
    )
    r = await post(api, "own", "resume", own_admin)
    assert (r.json()["status"], r.json()["hold_reason"]) == ("active", None)


async def test_an_operator_lifts_every_origin_and_the_pin(api: Api) -> None:
    await api.seed("acc")
    admin, op = await api.key("acc", "admin"), await operator(api)
    await post(api, "acc", "suspend", admin)
    await post(api, "acc", "suspend", op)
    # nothing sets past_due yet (the invoices issue will): the rules know it all the same
    await api.svc.pool.execute(
        "INSERT INTO account_suspensions (account_id, origin, reason)"
        " VALUES ('acc', 'past_due', 'invoice_overdue')"
    )
    await pin_cap(api, "acc")
    r = await post(api, "acc", "resume", admin)
    assert r.json()["suspended_by"] == ["operator", "past_due"]

    r = await post(api, "acc", "resume", op)
    assert r.json() == {
        "account_id": "acc",
        "status": "active",
        "changed": True,
        "suspended_by": [],
        "hold_reason": None,
    }
    assert await recorded(api, "acc") == ([], False, None)
    assert (await api.svc.balances.recharge_state("acc")).hold_reason is None
    assert await signals(api, "acc") == [
        ("account.suspend", "tenant"),
        ("account.resume", "operator"),
    ]
    # nothing left: idempotent, for anyone who may ask
    for headers in (op, admin):
        r = await post(api, "acc", "resume", headers)
        assert r.status_code == 200 and r.json()["changed"] is False
    assert len(await signals(api, "acc")) == 2


async def test_only_an_operator_lifts_a_past_due_suspension(api: Api) -> None:
    await api.seed("acc")
    admin = await api.key("acc", "admin")
    await post(api, "acc", "suspend", admin)
    await api.svc.pool.execute(
        "INSERT INTO account_suspensions (account_id, origin, reason)"
        " VALUES ('acc', 'past_due', 'invoice_overdue')"
    )
    r = await post(api, "acc", "resume", admin)  # its own goes, past_due stays
    assert (r.status_code, r.json()["suspended_by"]) == (200, ["past_due"])
    r = await post(api, "acc", "resume", admin)
    assert_error(r, 403, "lift_not_permitted")
    assert "overdue invoice" in r.json()["error"]["message"]
    assert await status(api, "acc") == "suspended"


async def test_a_manager_lifts_its_own_and_the_tenants_suspension_not_the_operators(
    api: Api,
) -> None:
    manager, tenant = await managed(api)
    op = await operator(api)
    r = await post(api, "sub", "suspend", manager, reason="unpaid_reseller_bill")
    assert (r.json()["status"], r.json()["suspended_by"]) == ("suspended", ["manager"])
    assert_error(await post(api, "sub", "resume", tenant), 403, "lift_not_permitted")
    r = await post(api, "sub", "suspend", tenant)  # a second origin: no second signal
    assert (r.json()["changed"], r.json()["suspended_by"]) == (True, ["manager", "tenant"])
    r = await post(api, "sub", "resume", manager)  # both are the manager's to lift
    assert (r.json()["status"], r.json()["suspended_by"]) == ("active", [])
    assert await signals(api, "sub") == [
        ("account.suspend", "unpaid_reseller_bill"),
        ("account.resume", "manager"),
    ]

    await post(api, "sub", "suspend", op)
    assert_error(await post(api, "sub", "resume", manager), 403, "lift_not_permitted")
    assert await recorded(api, "sub") == (["operator"], True, None)
    assert await status(api, "sub") == "suspended"


async def test_a_managers_own_suspension_leaves_its_managed_accounts_alone(api: Api) -> None:
    manager, _ = await managed(api)
    r = await post(api, "mgr", "suspend", manager)
    # on its own account the manager's admin is that account's tenant
    assert r.json()["suspended_by"] == ["tenant"]
    assert await status(api, "sub") == "active"
    assert await recorded(api, "sub") == ([], False, None)
    assert await signals(api, "sub") == []


async def test_two_origins_queue_one_suspend_and_one_resume(api: Api) -> None:
    await api.seed("acc")
    admin, op = await api.key("acc", "admin"), await operator(api)
    await post(api, "acc", "suspend", op, reason="fraud_review")
    r = await post(api, "acc", "suspend", admin, reason="going_away")
    assert (r.json()["changed"], r.json()["suspended_by"]) == (True, ["operator", "tenant"])

    # the tenant lifts its own: changed (its origin is gone), still suspended by the operator
    r = await post(api, "acc", "resume", admin)
    assert r.json() == {
        "account_id": "acc",
        "status": "suspended",
        "changed": True,
        "suspended_by": ["operator"],
        "hold_reason": None,
    }
    assert await signals(api, "acc") == [("account.suspend", "fraud_review")]
    r = await post(api, "acc", "resume", op)
    assert (r.json()["status"], r.json()["suspended_by"]) == ("active", [])
    assert await signals(api, "acc") == [
        ("account.suspend", "fraud_review"),
        ("account.resume", "operator"),
    ]
    pending = await api.svc.balances.pending_outboxes()
    assert [s.type for s in pending["acc"]] == ["account.suspend", "account.resume"]


async def test_a_rebuild_after_a_flush_keeps_what_origins_remain(api: Api) -> None:
    await api.seed("kept", "held")
    op = await operator(api)
    kept, held = await api.key("kept", "admin"), await api.key("held", "admin")
    await post(api, "kept", "suspend", op)
    await post(api, "kept", "suspend", kept)
    await pin_cap(api, "kept")
    await post(api, "kept", "resume", kept)  # the operator's stays
    await post(api, "held", "suspend", held)
    await pin_cap(api, "held")
    await post(api, "held", "resume", held)  # the pin stays

    await api.svc.balances._r.flushall()
    for account, expected in (("kept", "suspended"), ("held", "hold")):
        r = await api.client.get(f"/v1/accounts/{account}/balance", headers=op)
        assert r.json()["status"] == expected
        assert (await api.svc.balances.recharge_state(account)).hold_reason == "recharge_cap"
    # and the rules still hold over the rebuilt state
    assert_error(await post(api, "kept", "resume", kept), 403, "lift_not_permitted")
    assert_error(await post(api, "held", "resume", held), 403, "lift_not_permitted")
    r = await post(api, "kept", "resume", op)
    assert (r.json()["status"], r.json()["hold_reason"]) == ("active", None)


async def test_a_suspend_during_a_resume_waits_for_it_and_stands(api: Api) -> None:
    await api.seed("acc")
    admin, op = await api.key("acc", "admin"), await operator(api)
    await post(api, "acc", "suspend", admin)
    # the tenant's resume is slow to reach Redis, after PostgreSQL committed it
    balances = api.svc.balances
    set_status, reached = balances.set_status, asyncio.Event()

    async def slow(account_id: str, action: StatusAction, reason: str, **kw: Any) -> Any:
        if action == "resume":
            reached.set()
            await asyncio.sleep(0.3)
        return await set_status(account_id, action, reason, **kw)

    balances.set_status = slow  # type: ignore[method-assign]
    resuming = asyncio.create_task(post(api, "acc", "resume", admin))
    await reached.wait()
    # had the operator's suspension reached Redis first, the resume would land after it and
    # leave Redis active under it: it waits for the resume to be done instead
    r = await post(api, "acc", "suspend", op, reason="fraud_review")
    assert (r.status_code, r.json()["status"]) == (200, "suspended")
    assert (await resuming).json()["status"] == "active"
    assert await recorded(api, "acc") == (["operator"], True, None)
    assert await status(api, "acc") == "suspended"
    assert await signals(api, "acc") == [
        ("account.suspend", "tenant"),
        ("account.resume", "tenant"),
        ("account.suspend", "fraud_review"),
    ]


async def test_a_retry_after_redis_failed_brings_it_in_step(api: Api) -> None:
    await api.seed("acc")
    admin, op = await api.key("acc", "admin"), await operator(api)
    await post(api, "acc", "suspend", op)
    await post(api, "acc", "suspend", admin)
    balances = api.svc.balances
    set_status = balances.set_status

    async def lost(*_: Any, **__: Any) -> Any:
        raise OutcomeUnknown("connection lost after send")

    balances.set_status = lost  # type: ignore[method-assign]
    r = await post(api, "acc", "resume", op)
    assert_error(r, 503, "balance_store_unavailable")
    # PostgreSQL has it, Redis does not
    assert await recorded(api, "acc") == ([], False, None)
    assert await status(api, "acc") == "suspended"
    balances.set_status = set_status  # type: ignore[method-assign]
    # any later resume puts Redis right, even one that has nothing left to lift: the tenant's
    r = await post(api, "acc", "resume", admin)
    assert (r.status_code, r.json()["status"], r.json()["changed"]) == (200, "active", True)
    assert await signals(api, "acc") == [
        ("account.suspend", "operator"),
        ("account.resume", "tenant"),
    ]


async def test_the_operators_cli_changes_status_as_the_api_does(api: Api) -> None:
    await api.seed("acc")
    pool, balances = api.svc.pool, api.svc.balances
    out = await change_status(
        pool, balances, "acc", "suspend", "operator", reason="fraud_review", set_by="cli"
    )
    assert (out.status, out.changed, out.suspended_by) == ("suspended", True, ("operator",))
    assert await pool.fetchval("SELECT set_by FROM account_suspensions") == "cli"
    with pytest.raises(LiftNotPermitted) as refused:
        await change_status(pool, balances, "acc", "resume", "tenant")
    assert refused.value.remaining == ("operator",)
    with pytest.raises(ValueError, match="reason"):
        await change_status(pool, balances, "acc", "resume", "operator", reason="No|pe")
    out = await change_status(pool, balances, "acc", "resume", "operator")
    assert (out.status, out.suspended_by, out.hold_reason) == ("active", (), None)
    service = await api.key("acc", "service")
    assert (await api.authorize(service, account_id="acc")).json()["decision"] == "allow"
    # Redis lost the account: rebuilt before the change, so the suspension is still heard
    await balances._r.flushall()
    out = await change_status(pool, balances, "acc", "suspend", "operator", set_by="cli")
    assert (out.status, out.changed) == ("suspended", True)
    assert await signals(api, "acc") == [("account.suspend", "operator")]


async def test_migration_0010_makes_the_suspensions_before_it_the_operators(
    services: Services,
) -> None:
    async with database_before(services.admin_dsn, 10) as db:
        conn = db.conn
        await conn.execute(
            "INSERT INTO price_lists (id, inbound_per_min, sms_per_part) VALUES ('p', 1, 1);"
            "INSERT INTO accounts (id, price_list_id, suspended) VALUES"
            " ('quiet', 'p', true), ('named', 'p', true), ('free', 'p', false);"
            "INSERT INTO signals (account_id, seq, type, reason) VALUES"
            " ('named', 1, 'account.suspend', 'old_reason'),"
            " ('named', 2, 'account.resume', 'operator'),"
            " ('named', 3, 'account.suspend', 'fraud_review')"
        )
        assert "0010_status_origins.sql" in await migrate(conn)
        rows = await conn.fetch(
            "SELECT account_id, origin, reason, set_by FROM account_suspensions ORDER BY account_id"
        )
        assert [tuple(r) for r in rows] == [
            ("named", "operator", "fraud_review", None),
            ("quiet", "operator", "operator", None),
        ]
