"""The invoice routes through the served API on the real Redis and PostgreSQL: the list by
status and date, one invoice with its lines, the PDF whose text holds every line item and
total, the invoice settings, the refusals, and a cancellation (operators only)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal

from pypdf import PdfReader

from balance.accounts import PlanSpec, put_plan
from enforcement.invoices import Invoices, set_account_billing, set_tax_rate
from enforcement.subscriptions import Subscriptions
from infra.clock import SettableClock
from tests.api import Api, assert_error
from tests.helpers import run_meter


async def issued(api: Api) -> tuple[dict[str, str], str]:
    """Account "acc" on a plan since November (its fee, its DIDs beyond the plan and 8.25 %
    tax on its November invoice), the invoice issued on 1 December."""
    clock = SettableClock(datetime(2026, 11, 3, 9, tzinfo=UTC))
    await api.seed("acc", balance="100.00")
    pool = api.svc.pool
    await put_plan(
        pool,
        PlanSpec(id="team", name="Team", monthly_fee="25.00", included_dids=0, did_rate="1.25"),
    )
    await Subscriptions(pool, api.svc.balances, clock=clock).change("acc", "team")
    await pool.execute(
        "INSERT INTO numbers (account_id, number, status, monthly_fee, activated_at,"
        " paid_through, updated_at) VALUES ('acc', '+14155550101', 'active', 0, $1, '2026-11', $1)",
        datetime(2026, 11, 3, 9, tzinfo=UTC),
    )
    await set_tax_rate(pool, "US-NY", "New York", 88_750, now=datetime(2026, 11, 3, tzinfo=UTC))
    await set_account_billing(pool, "acc", tax_jurisdiction="US-NY")
    clock.set(datetime(2026, 12, 1, 0, 5, tzinfo=UTC))
    assert await Invoices(pool, api.svc.balances, clock=clock).run("2026-11") == {"issued": 1}
    invoice_id = await pool.fetchval("SELECT id FROM invoices WHERE account_id = 'acc'")
    return await api.key("acc", "admin"), invoice_id


async def test_list_read_and_the_pdf(api: Api) -> None:
    admin, invoice_id = await issued(api)
    r = await api.client.get("/v1/accounts/acc/invoices?status=paid", headers=admin)
    assert r.status_code == 200, r.text
    [row] = r.json()["data"]
    assert (row["id"], row["number"], row["status"]) == (invoice_id, "INV-000001", "paid")
    assert row["lines"] is None  # the list is light: lines in one invoice's answer
    sent = await api.client.get("/v1/accounts/acc/invoices?status=sent", headers=admin)
    assert sent.json()["data"] == []
    assert_error(
        await api.client.get("/v1/accounts/acc/invoices?status=lost", headers=admin),
        422,
        "validation_error",
        "status",
    )
    inv = (await api.client.get(f"/v1/accounts/acc/invoices/{invoice_id}", headers=admin)).json()
    assert (inv["subtotal"], inv["tax_rate"], inv["tax"]) == ("26.25", "8.875", "2.329688")
    assert (inv["total"], inv["amount_due"], inv["balance_due"]) == ("28.579688", "28.58", "0.00")
    assert [(ln["kind"], ln["amount"]) for ln in inv["lines"]] == [
        ("dids", "1.25"),
        ("subscription", "25.00"),
    ]

    pdf = await api.client.get(f"/v1/accounts/acc/invoices/{invoice_id}.pdf", headers=admin)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    for ln in inv["lines"]:
        assert ln["description"] in text and ln["amount"] in text, ln
    for figure in ("26.25", "2.329688", "28.579688", "28.58", "INV-000001", "Meter"):
        assert figure in text, figure
    assert "2026-11-01 to 2026-12-01" in text

    assert_error(
        await api.client.get("/v1/accounts/acc/invoices/inv_0000000000000000", headers=admin),
        404,
        "invoice_not_found",
        "invoice_id",
    )


async def test_settings_payments_refused_and_the_operators_cancel(api: Api) -> None:
    admin, invoice_id = await issued(api)
    r = await api.client.patch(
        "/v1/accounts/acc/invoice_settings", json={"auto_pay": True}, headers=admin
    )
    assert r.status_code == 200
    assert r.json() == {"billing_mode": "prepaid", "auto_pay": True, "tax_jurisdiction": "US-NY"}
    url = f"/v1/accounts/acc/invoices/{invoice_id}"
    paid = await api.client.post(f"{url}/payments", json={"payment_id": "p1"}, headers=admin)
    assert_error(paid, 409, "invoice_paid")  # a prepaid statement is paid already
    bad = await api.client.post(f"{url}/payments", json={"amount": "1.00"}, headers=admin)
    assert_error(bad, 422, "validation_error", "payment_id")
    assert_error(
        await api.client.post(f"{url}/cancel", json={"reason": "x"}, headers=admin),
        403,
        "forbidden",
    )
    _, secret = await api.svc.keys.create(None, "operator")
    operator = {"Authorization": f"Bearer {secret}"}
    before = (await api.client.get("/v1/accounts/acc/balance", headers=admin)).json()["balance"]
    r = await api.client.post(f"{url}/cancel", json={"reason": "billing error"}, headers=operator)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = await api.client.post(f"{url}/cancel", json={"reason": "again"}, headers=operator)
    assert again.json()["cancel_reason"] == "billing error"  # once
    after = (await api.client.get("/v1/accounts/acc/balance", headers=admin)).json()["balance"]
    assert Decimal(after) - Decimal(before) == Decimal("28.579688")  # the total, credited back


async def test_meter_invoices_and_tax_on_the_command_line(api: Api) -> None:
    import json

    await api.seed("cli")

    async def meter(*args: str) -> tuple[int, str, str]:
        return await run_meter(api.settings.redis_url, api.settings.database_url, *args)

    assert await meter("tax", "set", "US-CA", "California", "8.25") == (
        0,
        '{"jurisdiction": "US-CA", "rate_ppm": 82500}\n',
        "",
    )
    assert (await meter("tax", "set", "US-CA", "California", "8.123456"))[0] == 2
    assert (await meter("tax", "set", "usca", "x", "1"))[0] == 2
    code, out, _ = await meter("tax", "list")
    assert code == 0 and json.loads(out)["percent"] == "8.25"
    code, out, err = await meter(
        "invoices", "settings", "--account", "cli", "--mode", "invoiced", "--tax", "US-CA"
    )
    assert code == 0, err
    assert json.loads(out) == {
        "account_id": "cli",
        "billing_mode": "invoiced",
        "invoice_auto_pay": False,
        "tax_jurisdiction": "US-CA",
    }
    assert (await meter("invoices", "settings", "--account", "nope", "--mode", "prepaid"))[0] == 1
    assert (await meter("invoices", "run", "--month", "2026-13"))[0] == 2
    this_month = datetime.now(UTC).strftime("%Y-%m")
    code, _, err = await meter("invoices", "run", "--month", this_month)
    assert code == 1 and "has not ended" in err
    code, out, err = await meter("invoices", "run", "--month", "2020-01")
    assert (code, json.loads(out)) == (0, {"month": "2020-01"}), err


async def test_pay_now_through_the_api_and_the_payment_history_names_the_invoice(api: Api) -> None:
    clock = SettableClock(datetime(2026, 11, 3, 9, tzinfo=UTC))
    await api.seed("inv", balance="0.00", credit_limit="100.00")
    pool = api.svc.pool
    await set_account_billing(pool, "inv", billing_mode="invoiced")
    await put_plan(pool, PlanSpec(id="biz", name="Business", monthly_fee="12.00"))
    await Subscriptions(pool, api.svc.balances, clock=clock).change("inv", "biz")
    clock.set(datetime(2026, 12, 1, 0, 5, tzinfo=UTC))
    await Invoices(pool, api.svc.balances, clock=clock).run("2026-11")
    invoice_id = await pool.fetchval("SELECT id FROM invoices WHERE account_id = 'inv'")
    admin = await api.key("inv", "admin")
    r = await api.client.put(
        "/v1/accounts/inv/payment_method", json={"token": "pm_card_visa"}, headers=admin
    )
    assert r.status_code == 201, r.text
    url = f"/v1/accounts/inv/invoices/{invoice_id}/payments"
    part = await api.client.post(url, json={"payment_id": "n1", "amount": "5.00"}, headers=admin)
    assert part.status_code == 200, part.text
    assert (part.json()["status"], part.json()["balance_due"]) == ("partially_paid", "7.00")
    over = await api.client.post(url, json={"payment_id": "n2", "amount": "9.00"}, headers=admin)
    assert_error(over, 409, "overpayment", "amount")
    rest = await api.client.post(url, json={"payment_id": "n3"}, headers=admin)
    assert rest.json()["status"] == "paid"
    assert [p["payment_id"] for p in rest.json()["payments"]] == ["n1", "n3"]  # n2: refused
    history = (await api.client.get("/v1/accounts/inv/payments", headers=admin)).json()
    paid = {p["id"]: (p["paid_for"], p["invoice_id"], p["status"]) for p in history["payments"]}
    assert paid["n1"] == ("invoice", invoice_id, "succeeded")
    assert paid["n3"] == ("invoice", invoice_id, "succeeded")
    balance = (await api.client.get("/v1/accounts/inv/balance", headers=admin)).json()
    assert balance["balance"] == "0.00"  # -12.00 charged, 12.00 paid
