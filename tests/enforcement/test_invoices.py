"""Invoices on an injected clock, against the real Redis, PostgreSQL and broker (the metering
processor charges the month's calls and messages; the payment service, on the sandbox gateway,
pays): the monthly run twice, in two workers at once and crashed midway (one invoice each,
lines equal to the ledger's month, numbers without gaps), tax and its rounding, a prepaid
statement, a partial payment then the rest, an overpayment refused, due -> overdue -> 14 days
-> suspended -> paid -> resumed, a cancellation credited back once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from balance.accounts import AccountSpec, PlanSpec, create_accounts, put_plan, put_price_list
from balance.store import RedisBalances
from balance.values import GrantOutcome, Tariff
from contracts import topics
from contracts.payments import Notification
from enforcement.invoices import (
    InvoiceError,
    InvoiceRules,
    Invoices,
    set_account_billing,
    set_tax_rate,
    tax_of,
    to_cents_half_up,
)
from enforcement.subscriptions import Subscriptions, period_bounds
from infra.clock import SettableClock, datetime_clock
from meter.traffic import call_hangup, demo_price_list, message_sent
from metering.worker import Connections
from ops.reconcile import reconcile
from rating.catalog import Catalog
from recharge.notify import LogNotifier
from recharge.sandbox import SandboxGateway
from recharge.service import PaymentService
from tests import harness
from tests.helpers import Rec, call_record

NOV = "2026-11"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


class Notes:
    def __init__(self) -> None:
        self.items: list[Notification] = []

    async def notify(self, n: Notification) -> None:
        self.items.append(n)

    def of(self, account: str) -> list[str]:
        return [n.type for n in self.items if n.subject == account]


@dataclass
class World:
    conns: Connections
    clock: SettableClock
    notes: Notes
    payments: PaymentService
    invoices: Invoices

    def at(self, text: str) -> datetime:
        self.clock.set(utc(text))
        return utc(text)

    def other(self, balances: Any = None) -> Invoices:
        return Invoices(
            self.conns.pool,
            balances or self.conns.balances,
            payments=self.payments,
            notify=self.notes,
            clock=self.clock,
        )

    async def accounts(self, *ids: str, balance: str = "50.00") -> None:
        await create_accounts(
            self.conns.pool,
            self.conns.balances,
            [
                AccountSpec.model_validate(
                    {
                        "id": a,
                        "price_list_id": "standard",
                        "balance": balance,
                    }
                )
                for a in ids
            ],
            clock=self.clock,
        )
        # Past the new-account payment limits: these tests pay invoices, not test the limits.
        await self.conns.pool.execute(
            "UPDATE accounts SET verification_level = 2 WHERE id = ANY($1::text[])", list(ids)
        )

    async def usage(self, account: str, *, calls: int = 2, sms: int = 1, seconds: int = 61) -> None:
        """Calls and messages of ``account`` charged by the real processor at the clock."""
        catalog = Catalog(self.conns.pool)
        await catalog.refresh()
        processor = harness.processor(self.conns, catalog, clock=self.clock)
        at = datetime.fromtimestamp(self.clock(), UTC)
        recs = [
            call_record(
                call_hangup(account, f"{account}-c{i}", "+447911123456", seconds + i, at=at), i
            )
            for i in range(calls)
        ]
        recs += [
            Rec(
                topics.MESSAGE_EVENTS,
                0,
                100 + i,
                account.encode(),
                orjson.dumps(message_sent(account, f"{account}-m{i}", "+442071234567", 2, at=at)),
            )
            for i in range(sms)
        ]
        out = await processor.process(recs)
        assert out.charged == calls + sms

    async def ledger_month(self, account: str, period: str) -> int:
        start, end = period_bounds(period)
        return -int(
            await self.conns.pool.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1"
                " AND event_time >= $2 AND event_time < $3"
                " AND kind NOT IN ('opening', 'credit', 'tax')",
                account,
                start,
                end,
            )
        )

    async def card(self, account: str) -> None:
        await self.payments.save_method(account, "pm_card_visa")


@pytest.fixture
async def world(conns: Connections) -> AsyncIterator[World]:
    clock = SettableClock(utc("2026-11-10T12:00:00+00:00"))
    conns.balances._clock = clock  # type: ignore[attr-defined]  # the store reads the test's clock
    await put_price_list(conns.pool, demo_price_list())
    notes = Notes()
    payments = PaymentService(
        conns.pool,
        conns.balances,
        SandboxGateway(),
        LogNotifier(),
        clock=datetime_clock(clock),
    )
    invoices = Invoices(
        conns.pool,
        conns.balances,
        payments=payments,  # type: ignore[arg-type]  # a Payment is a PaidLike
        notify=notes,
        rules=InvoiceRules(due_days=15, suspend_after_days=14, warn_days=3),
        clock=clock,
    )
    yield World(conns, clock, notes, payments, invoices)


def test_tax_and_cents_round_half_up_by_hand() -> None:
    assert tax_of(10_000_000, 82_500) == 825_000  # 10.00 at 8.25 %
    assert tax_of(1_234_567, 82_500) == 101_852  # 101851.7775 -> up
    assert tax_of(1_000_002, 250_000) == 250_001  # 250000.5 -> half up
    assert tax_of(1_000_001, 250_000) == 250_000  # 250000.25 -> down
    assert tax_of(-5_000_000, 82_500) == 0 and tax_of(5_000_000, 0) == 0
    assert to_cents_half_up(1_234_567) == 1_230_000
    assert to_cents_half_up(1_235_000) == 1_240_000  # half a cent: up
    assert to_cents_half_up(1_234_999) == 1_230_000
    assert to_cents_half_up(-1_235_000) == -1_240_000


class CrashAfterRedis(RedisBalances):
    """The balance store of a worker that dies right after Redis took the invoice's charge:
    the script runs, then the step raises (its transaction never commits)."""

    def __init__(self, inner: RedisBalances) -> None:
        super().__init__(inner._r, clock=inner._clock)  # type: ignore[attr-defined]
        self.crashes = 1

    async def plan_step(self, *args: Any, **kw: Any) -> GrantOutcome:
        out = await super().plan_step(*args, **kw)
        if self.crashes:
            self.crashes -= 1
            raise OSError("the worker died here")
        return out


async def test_the_monthly_run_twice_in_two_workers_and_crashed_midway(world: World) -> None:
    pool = world.conns.pool
    await world.accounts("a1", "a2", "a3")
    await put_plan(
        pool,
        PlanSpec(
            id="basic",
            monthly_fee="10.00",
            included_minutes=1,
            included_dids=1,
            did_rate="1.50",
            extension_rate="2.00",
        ),
    )
    subs = Subscriptions(pool, world.conns.balances, clock=world.clock)
    await subs.change("a1", "basic", extensions=3)
    for n in ("+14155550101", "+14155550102", "+14155550103"):
        await pool.execute(
            "INSERT INTO numbers (account_id, number, status, monthly_fee, activated_at,"
            " paid_through, updated_at) VALUES ('a1', $1, 'active', 0, $2, $3, $2)",
            n,
            utc("2026-11-10T12:00:00+00:00"),
            NOV,
        )
    await set_tax_rate(
        pool, "US-CA", "California", 82_500, now=world.at("2026-11-10T12:00:00+00:00")
    )
    await set_account_billing(pool, "a2", tax_jurisdiction="US-CA")
    for a in ("a1", "a2", "a3"):
        await world.usage(a)
    world.at("2026-11-30T23:59:59+00:00")
    with pytest.raises(InvoiceError):
        await world.invoices.run(NOV)  # the month is not over
    world.at("2026-12-01T00:05:00+00:00")

    crashing = world.other(CrashAfterRedis(world.conns.balances))
    assert await crashing.run(NOV) == {"failed": 1, "issued": 2}  # a1's Redis step, then died
    results = await asyncio.gather(world.invoices.run(NOV), world.other().run(NOV))
    assert sum(r.get("issued", 0) for r in results) == 1
    assert await world.invoices.run(NOV) == {}

    rows = await pool.fetch("SELECT account_id, seq, number FROM invoices ORDER BY seq")
    assert [r["seq"] for r in rows] == [1, 2, 3]  # no gap for the crashed one
    assert sorted(r["account_id"] for r in rows) == ["a1", "a2", "a3"]
    for a in ("a1", "a2", "a3"):
        [inv] = await world.invoices.listed(a)
        inv = await world.invoices.get(a, inv.id)
        assert inv is not None
        assert (
            sum(ln.amount for ln in inv.lines) == inv.subtotal == await world.ledger_month(a, NOV)
        )
        tax_rows = await pool.fetchval(
            "SELECT coalesce(-sum(amount), 0) FROM ledger WHERE account_id = $1 AND kind = 'tax'", a
        )
        assert inv.tax == tax_rows and inv.total == inv.subtotal + inv.tax
        assert inv.status == "paid" and inv.paid == inv.amount_due  # prepaid: a statement
    a1 = await world.invoices.get("a1", (await world.invoices.listed("a1"))[0].id)
    assert a1 is not None
    kinds = {ln.kind: ln for ln in a1.lines}
    assert (kinds["dids"].quantity, kinds["dids"].amount) == (2, 3_000_000)
    assert (kinds["extensions"].quantity, kinds["extensions"].amount) == (3, 6_000_000)
    assert kinds["subscription"].amount >= 10_000_000  # the plan's fee, and what the run added
    a2 = await world.invoices.get("a2", (await world.invoices.listed("a2"))[0].id)
    assert a2 is not None and a2.tax == tax_of(a2.subtotal, 82_500) > 0
    assert (await reconcile(pool, world.conns.balances)).ok  # the crashed step charged once


async def test_an_invoiced_account_pays_in_part_then_the_rest(world: World) -> None:
    pool = world.conns.pool
    await world.accounts("inv", balance="0.00")
    await pool.execute("UPDATE accounts SET credit_limit = 100000000 WHERE id = 'inv'")
    await world.conns.balances.set_limits("inv", credit_limit=100_000_000, low_threshold=0)
    await set_account_billing(pool, "inv", billing_mode="invoiced")
    await world.card("inv")
    await world.usage("inv", calls=3, sms=2, seconds=1_200)
    world.at("2026-12-01T00:05:00+00:00")
    assert await world.invoices.run(NOV) == {"issued": 1}
    [inv] = await world.invoices.listed("inv")
    assert inv.status == "sent" and inv.due_at == utc("2026-12-16T00:05:00+00:00")
    due = inv.balance_due
    assert due == to_cents_half_up(inv.total) > 0
    with pytest.raises(InvoiceError) as e:
        await world.invoices.pay("inv", inv.id, "too-much", due + 10_000)
    assert e.value.code == "overpayment"
    part = 10_000 * (due // 20_000)
    half = await world.invoices.pay("inv", inv.id, "p1", part)
    assert half.status == "partially_paid" and half.paid == part
    again = await world.invoices.pay("inv", inv.id, "p1", part)  # a retry: one payment
    assert again.paid == part and len(again.payments) == 1
    rest = await world.invoices.pay("inv", inv.id, "p2")  # default: what is left
    assert rest.status == "paid" and rest.paid == due and rest.balance_due == 0
    with pytest.raises(InvoiceError) as e:
        await world.invoices.pay("inv", inv.id, "p3")
    assert e.value.code == "invoice_paid"
    assert world.notes.of("inv") == ["invoice.issued", "invoice.paid"]
    assert (await reconcile(pool, world.conns.balances)).ok


async def test_past_due_suspends_at_14_days_and_paying_resumes(world: World) -> None:
    pool = world.conns.pool
    await world.accounts("late", balance="0.00")
    await pool.execute("UPDATE accounts SET credit_limit = 100000000 WHERE id = 'late'")
    await world.conns.balances.set_limits("late", credit_limit=100_000_000, low_threshold=0)
    await set_account_billing(pool, "late", billing_mode="invoiced")
    await world.card("late")
    await world.usage("late", seconds=1_200)
    world.at("2026-12-01T00:05:00+00:00")
    await world.invoices.run(NOV)
    [inv] = await world.invoices.listed("late")
    before = len(await world.conns.balances.pending_outbox("late"))
    world.clock.set(inv.due_at - timedelta(seconds=1))
    assert await world.invoices.past_due() == {}
    world.clock.set(inv.due_at)
    assert await world.invoices.past_due() == {"overdue": 1}
    world.clock.set(inv.due_at + timedelta(days=11))
    assert await world.invoices.past_due() == {"warned": 1}
    world.clock.set(inv.due_at + timedelta(days=14) - timedelta(seconds=1))
    assert await world.invoices.past_due() == {}
    world.clock.set(inv.due_at + timedelta(days=14))
    assert await world.invoices.past_due() == {"suspended": 1}
    assert await world.invoices.past_due() == {}  # once
    st = await world.conns.balances.get("late")
    assert st is not None and st.status == "suspended"
    now = int(world.clock())
    inbound = await world.conns.balances.reserve(
        "late",
        "in-1",
        "inbound",
        Tariff(rate_per_min=0),
        now_s=now,
        grant_s=300,
        grace_s=60,
        max_s=14_400,
    )
    assert (inbound.decision, inbound.reason) == ("deny", "account_suspended")
    paid = await world.invoices.pay("late", inv.id, "late-1")
    assert paid.status == "paid"
    st = await world.conns.balances.get("late")
    assert st is not None and st.status != "suspended"
    signals = [
        (s.type, s.reason) for s in (await world.conns.balances.pending_outbox("late"))[before:]
    ]
    assert signals[:2] == [("account.suspend", "past_due"), ("account.resume", "invoice_paid")]
    seqs = [s.seq for s in await world.conns.balances.pending_outbox("late")]
    assert seqs == sorted(set(seqs))
    assert world.notes.of("late") == [
        "invoice.issued",
        "invoice.overdue",
        "invoice.past_due_warning",
        "invoice.paid",
    ]


async def test_a_cancelled_invoice_is_credited_back_once_and_shows_on_the_next(
    world: World,
) -> None:
    pool = world.conns.pool
    await world.accounts("acc")
    await world.usage("acc")
    world.at("2026-12-01T00:05:00+00:00")
    await world.invoices.run(NOV)
    [inv] = await world.invoices.listed("acc")
    before = (await world.conns.balances.get("acc")).balance  # type: ignore[union-attr]
    out = await world.invoices.cancel("acc", inv.id, "billing error")
    assert out.status == "cancelled" and out.cancel_reason == "billing error"
    await world.invoices.cancel("acc", inv.id, "billing error")  # again: nothing more
    assert (await world.conns.balances.get("acc")).balance == before + inv.total  # type: ignore[union-attr]
    world.at("2027-01-01T00:05:00+00:00")
    await world.invoices.run("2026-12")
    [dec, _] = await world.invoices.listed("acc")
    dec = await world.invoices.get("acc", dec.id)
    assert dec is not None
    assert [(ln.kind, ln.amount) for ln in dec.lines] == [("correction", -inv.total)]
    assert (await reconcile(pool, world.conns.balances)).ok


async def test_invoice_auto_pay_charges_the_saved_card_when_the_invoice_is_issued(
    world: World,
) -> None:
    pool = world.conns.pool
    await world.accounts("auto", "nocard", balance="0.00")
    for a in ("auto", "nocard"):
        await pool.execute("UPDATE accounts SET credit_limit = 100000000 WHERE id = $1", a)
        await world.conns.balances.set_limits(a, credit_limit=100_000_000, low_threshold=0)
        await set_account_billing(pool, a, billing_mode="invoiced", auto_pay=True)
        await world.usage(a, seconds=1_200)
    await world.card("auto")  # "nocard" has none: its invoice stays due
    world.at("2026-12-01T00:05:00+00:00")
    assert await world.invoices.run(NOV) == {"issued": 2}
    [paid] = await world.invoices.listed("auto")
    [due] = await world.invoices.listed("nocard")
    assert (paid.status, paid.balance_due) == ("paid", 0)
    assert due.status == "sent" and due.balance_due > 0
    got = await world.invoices.get("auto", paid.id)
    assert got is not None and [p.payment_id for p in got.payments] == [f"inv:{paid.id}"]
    assert world.notes.of("auto") == ["invoice.issued", "invoice.paid"]
    assert world.notes.of("nocard") == ["invoice.issued"]
    assert (await reconcile(pool, world.conns.balances)).ok


class DiesAfterCharging:
    """The payment service of a process that dies right after the card was charged: the
    payment is made (and credited), then the call raises."""

    def __init__(self, inner: PaymentService) -> None:
        self.inner = inner

    async def pay_invoice(self, account_id: str, amount: int, payment_id: str) -> Any:
        await self.inner.pay_invoice(account_id, amount, payment_id)
        raise OSError("the process died here")


async def test_a_payment_cut_off_after_the_charge_is_applied_once_it_is_known(
    world: World,
) -> None:
    pool = world.conns.pool
    await world.accounts("cut", balance="0.00")
    await pool.execute("UPDATE accounts SET credit_limit = 100000000 WHERE id = 'cut'")
    await world.conns.balances.set_limits("cut", credit_limit=100_000_000, low_threshold=0)
    await set_account_billing(pool, "cut", billing_mode="invoiced")
    await world.card("cut")
    await world.usage("cut", seconds=1_200)
    world.at("2026-12-01T00:05:00+00:00")
    await world.invoices.run(NOV)
    [inv] = await world.invoices.listed("cut")
    dying = Invoices(
        pool, world.conns.balances, payments=DiesAfterCharging(world.payments), clock=world.clock
    )
    with pytest.raises(OSError):
        await dying.pay("cut", inv.id, "cut-1")
    pending = await world.invoices.get("cut", inv.id)
    assert pending is not None and pending.status == "sent"
    assert [(p.payment_id, p.state) for p in pending.payments] == [("cut-1", "pending")]
    assert await world.invoices.settle_pending() == 1  # the charge is known now: applied
    paid = await world.invoices.get("cut", inv.id)
    assert paid is not None and paid.status == "paid" and paid.balance_due == 0
    assert await world.invoices.settle_pending() == 0  # once
    assert (await reconcile(pool, world.conns.balances)).ok


async def test_the_billing_clock_issues_a_month_only_after_its_late_events_had_time(
    world: World,
) -> None:
    await world.accounts("acc")
    await world.usage("acc")
    world.at("2026-12-01T05:59:59+00:00")  # within the 6 h the rules give late events
    assert "issued" not in await world.invoices.tick()
    assert await world.invoices.listed("acc") == []
    world.at("2026-12-01T06:00:00+00:00")
    assert (await world.invoices.tick())["issued"] == 1


async def test_a_charge_that_reaches_the_ledger_after_its_months_invoice_is_on_the_next(
    world: World,
) -> None:
    """Late charges: a call of November processed after November's invoice is on December's,
    as a line naming November; one later still, on the account's next invoice (March's: it had
    no charge in January or February, so no invoice); each once. Over all invoices a month's
    lines sum to the ledger's month. A month with no invoice of its own (the account's months
    before invoicing) is never charged as late."""
    pool = world.conns.pool
    await world.accounts("acc", "old")
    await world.usage("acc")  # November, at the clock

    async def late_call(account: str, call_id: str, at: str, seconds: int) -> None:
        processor = harness.processor(world.conns, await _catalog(world), clock=world.clock)
        rec = call_record(call_hangup(account, call_id, "+447911123456", seconds, at=utc(at)), 7)
        assert (await processor.process([rec])).charged == 1

    await late_call("old", "old-c", "2026-10-20T10:00:00+00:00", 120)  # October: no invoice
    world.at("2026-12-01T06:05:00+00:00")
    await world.invoices.run(NOV)
    nov = await world.invoices.get("acc", (await world.invoices.listed("acc"))[0].id)
    assert nov is not None and all(ln.late_for == "" for ln in nov.lines)
    world.at("2026-12-02T09:00:00+00:00")
    await late_call("acc", "late-1", "2026-11-30T23:58:00+00:00", 90)  # after November's invoice
    await late_call("acc", "dec-1", "2026-12-02T08:00:00+00:00", 61)  # December's own
    world.at("2027-01-01T06:05:00+00:00")
    await world.invoices.run("2026-12")
    dec = await world.invoices.get("acc", (await world.invoices.listed("acc"))[0].id)
    assert dec is not None and dec.period == "2026-12"
    late = [ln for ln in dec.lines if ln.late_for]
    [one] = late
    assert (one.kind, one.late_for, one.quantity) == ("call_outbound", NOV, 90)
    assert one.description == "Outbound minutes, late from 2026-11"
    world.at("2027-01-05T09:00:00+00:00")
    await late_call("acc", "late-2", "2026-11-15T08:00:00+00:00", 30)  # later still
    world.at("2027-02-01T06:05:00+00:00")
    assert await world.invoices.run("2027-01") == {}  # nothing of January: no invoice
    world.at("2027-03-03T09:00:00+00:00")
    await late_call("acc", "mar-1", "2027-03-03T08:00:00+00:00", 61)
    world.at("2027-04-01T06:05:00+00:00")
    await world.invoices.run("2027-03")
    mar = await world.invoices.get("acc", (await world.invoices.listed("acc"))[0].id)
    assert mar is not None and mar.period == "2027-03"
    billed, charged = await pool.fetchrow(
        "SELECT quantity, -amount FROM ledger WHERE account_id = 'acc' AND ref = 'late-2'"
    )
    assert [(ln.late_for, ln.quantity, ln.amount) for ln in mar.lines if ln.late_for] == [
        (NOV, billed, charged)
    ]
    # invoiced once: November's lines over all invoices are the ledger's November
    invoiced_nov = await pool.fetchval(
        "SELECT sum(l.amount) FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id"
        " WHERE i.account_id = 'acc' AND (l.late_for = $1 OR (l.late_for = '' AND i.period = $1))",
        NOV,
    )
    assert invoiced_nov == await world.ledger_month("acc", NOV)
    world.at("2027-04-02T09:00:00+00:00")
    await late_call("acc", "apr-1", "2027-04-02T08:00:00+00:00", 61)
    world.at("2027-05-01T06:05:00+00:00")
    await world.invoices.run("2027-04")
    apr = await world.invoices.get("acc", (await world.invoices.listed("acc"))[0].id)
    assert apr is not None and apr.period == "2027-04"
    assert not any(ln.late_for for ln in apr.lines)  # nothing late twice
    # the account whose October has no invoice: its first (November's) has no late line
    for inv in await world.invoices.listed("old"):
        got = await world.invoices.get("old", inv.id)
        assert got is not None and not any(ln.late_for for ln in got.lines)
    assert (await reconcile(pool, world.conns.balances)).ok


async def _catalog(world: World) -> Catalog:
    catalog = Catalog(world.conns.pool)
    await catalog.refresh()
    return catalog
