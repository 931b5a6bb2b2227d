"""Invoices and statements (docs/design/invoices.md): the monthly run, line items from the
ledger, tax, numbering without gaps, payments applied, past due and its suspension,
cancellation. The only writer of ``invoices``, ``invoice_lines``, ``invoice_payments``,
``invoice_counters`` and ``tax_rates``.

Every charge is already in the ledger when the month ends, but for two the invoice itself
adds: the plan's DIDs and extensions beyond what it includes, and the tax. The run takes them
off the balance (``plan.lua``, once per account and month), writes their ledger rows and the
invoice in one transaction, under a lock of the account and month: two runs, two workers or a
run killed midway still leave one invoice per account and month, and one charge. An invoice's
number is taken from its issuer's counter in the same transaction, so numbers have no gaps.

Money is in micro-units throughout: the lines are the ledger's sums to the micro-unit, the tax
is rounded half up to the micro-unit, and only the amount due is rounded to the cent (half
up), as the last step, because a card is charged in cents.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, Protocol

import asyncpg

from balance.errors import BalanceStoreError
from balance.protocol import BalanceStore
from contracts.money import format_money
from contracts.payments import Notification, NotificationData, NotificationType
from enforcement import account_admin
from enforcement.numbers import month_of
from enforcement.subscriptions import period_bounds
from infra.clock import Clock, system_clock
from infra.ledger import Conn, Ledger, PostgresLedger, UsageRow, credit_key
from infra.metrics import INVOICE_STEPS

log = logging.getLogger(__name__)

INVOICES_SOURCE: Final = "urn:meter:invoices"
MICROS_PER_CENT: Final = 10_000
InvoiceStatus = Literal["sent", "paid", "partially_paid", "overdue", "cancelled"]
INVOICE_STATUSES: Final[tuple[InvoiceStatus, ...]] = (
    "sent",
    "paid",
    "partially_paid",
    "overdue",
    "cancelled",
)
BillingMode = Literal["prepaid", "invoiced"]

#: Ledger kinds an invoice shows as lines (charges > 0 on the invoice, credits < 0); the rest
#: are not charges: ``opening`` balances, ``credit`` (payments: what paid), ``tax`` (the tax
#: line itself, from the invoice's own figures).
_LINE_KINDS: Final = {
    "subscription": ("Plan fees", "count"),
    "fee": ("Number fees (setup and monthly)", "numbers"),
    "sms": ("Messages", "parts"),
    "bundle": ("Minute bundles", "seconds"),
    "provisional": ("Calls charged provisionally (hangup lost)", "seconds"),
    "correction": ("Corrections and credits", "count"),
    "refund": ("Refunds credited", "count"),
}


class InvoiceError(Exception):
    """A request that was not done: ``code`` for the API, ``field`` it is about."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(frozen=True, slots=True)
class InvoiceRules:
    """``due_days``: an invoiced account's invoice is due this long after it is issued;
    ``suspend_after_days``: past due this long, the account is suspended (origin past_due);
    ``warn_days``: the notice before that, this long before it; ``run_delay_s``: how long after
    a month's end the billing clock issues its invoices, so that the month's late events
    (switches publishing after an outage) are in the ledger first."""

    due_days: int = 15
    suspend_after_days: int = 14
    warn_days: int = 3
    run_delay_s: int = 6 * 3600


class PaidLike(Protocol):
    """What a card payment answers (``recharge.payments.Payment`` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def captured(self) -> int: ...
    @property
    def message(self) -> str: ...


class CardPayments(Protocol):
    """Charging the account's saved card and crediting what it captured to the balance:
    ``recharge.service.PaymentService`` is one (the roof, ``meter``, hands it over). A refusal
    (nothing charged) is an exception with a ``code`` (and a ``message``); any other exception
    means the card may have been charged."""

    async def pay_invoice(self, account_id: str, amount: int, payment_id: str) -> PaidLike: ...


class Notify(Protocol):
    async def notify(self, notification: Notification) -> None: ...


@dataclass(frozen=True, slots=True)
class Line:
    kind: str
    description: str
    billing_group_id: str
    quantity: int
    unit: str
    amount: int
    late_for: str = ""  # a late charge's own month, "YYYY-MM" (see ``late_lines``)


@dataclass(frozen=True, slots=True)
class Applied:
    payment_id: str
    amount: int
    state: str
    applied: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Invoice:
    id: str
    account_id: str
    period: str
    issuer: str
    seq: int
    number: str
    billing_mode: BillingMode
    currency: str
    status: InvoiceStatus
    issued_at: datetime
    due_at: datetime
    subtotal: int
    tax: int
    tax_rate_ppm: int
    total: int
    paid: int
    cancelled_at: datetime | None
    cancel_reason: str | None
    lines: list[Line] = field(default_factory=list)
    payments: list[Applied] = field(default_factory=list)

    @property
    def amount_due(self) -> int:
        """The total rounded to the cent (half up): the last step of the arithmetic."""
        return to_cents_half_up(self.total)

    @property
    def balance_due(self) -> int:
        if self.status == "cancelled":
            return 0
        return max(0, self.amount_due - self.paid)

    @property
    def period_start(self) -> datetime:
        return period_bounds(self.period)[0]

    @property
    def period_end(self) -> datetime:
        return period_bounds(self.period)[1]


def to_cents_half_up(micros: int) -> int:
    """Micro-units rounded to a whole cent, half away from zero (integers only)."""
    sign = -1 if micros < 0 else 1
    cents, rest = divmod(abs(micros), MICROS_PER_CENT)
    if rest * 2 >= MICROS_PER_CENT:
        cents += 1
    return sign * cents * MICROS_PER_CENT


def tax_of(subtotal: int, rate_ppm: int) -> int:
    """Tax on a subtotal in micro-units at ``rate_ppm`` parts per million, rounded half up to
    the micro-unit; none on a subtotal of zero or less."""
    if subtotal <= 0 or rate_ppm <= 0:
        return 0
    q, r = divmod(subtotal * rate_ppm, 1_000_000)
    return q + (1 if r * 2 >= 1_000_000 else 0)


def status_for(total_due: int, paid: int, due_at: datetime, now: datetime) -> InvoiceStatus:
    if paid >= total_due:
        return "paid"
    if now >= due_at:
        return "overdue"
    return "partially_paid" if paid > 0 else "sent"


def new_invoice_id() -> str:
    return "inv_" + secrets.token_hex(8)


def invoice_number(issuer: str, seq: int) -> str:
    return f"INV-{seq:06d}" if issuer == "platform" else f"{issuer}-INV-{seq:06d}"


def _row(
    account_id: str, kind: str, event_id: str, amount: int, ref: str, at: datetime
) -> UsageRow:
    return (
        credit_key(account_id, event_id),
        account_id,
        kind,
        amount,
        1,
        ref,
        event_id,
        at,
        INVOICES_SOURCE,
        event_id,
        None,
        0,
        "",
        "",
        "",
        "",
    )


#: The ledger rows an invoice shows as lines: not ``opening``, ``credit`` (payments), ``tax``
#: (the invoice's own figure), a refund to the card (what paid, given back), nor the invoice's
#: own charge of DIDs and extensions (its ``subscription`` row: on the invoice as its plan lines).
_LINE_ROWS: Final = (
    " kind NOT IN ('opening', 'credit', 'tax') AND NOT (kind = 'refund' AND amount < 0)"
    f" AND NOT (kind = 'subscription' AND source = '{INVOICES_SOURCE}')"
)
#: Kinds of the lines the invoice itself charges (``_plan_lines``): not from the ledger.
_PLAN_KINDS: Final = ("dids", "extensions")
#: How many of the account's invoices before this one a run looks at for late charges of
#: their months (docs/design/invoices.md "Late charges").
LATE_INVOICES: Final = 3


async def ledger_lines(conn: Conn, account_id: str, period: str) -> list[Line]:
    """The month's charges and credits from the ledger (by each row's own time), as invoice
    lines: calls by direction and billing group, the rest by kind (and group). Amounts are the
    ledger's sums, sign turned (a charge is positive on an invoice)."""
    start, end = period_bounds(period)
    rows = await conn.fetch(
        "SELECT kind, direction, billing_group_id, count(*) AS n,"
        " sum(quantity)::bigint AS quantity, sum(amount)::bigint AS amount"
        " FROM ledger WHERE account_id = $1 AND event_time >= $2 AND event_time < $3"
        f" AND {_LINE_ROWS}"
        " GROUP BY kind, direction, billing_group_id ORDER BY kind, direction, billing_group_id",
        account_id,
        start,
        end,
    )
    return _lines_of(rows)


async def late_lines(conn: Conn, account_id: str, period: str) -> list[Line]:
    """Charges of the months of the account's ``LATE_INVOICES`` invoices before ``period``
    that reached the ledger after their month's invoice was issued: for each such month, what
    the ledger holds of it less what its lines over all invoices already hold (its own
    invoice's lines from the ledger, and late lines of it on later ones), by line; a line for
    each difference, ``late_for`` that month. Exact whenever the late row arrived, without the
    ledger's time of arrival: what was invoiced is what the invoices say."""
    months = sorted(
        r["period"]
        for r in await conn.fetch(
            "SELECT period FROM invoices WHERE account_id = $1 AND period < $2"
            " ORDER BY period DESC LIMIT $3",
            account_id,
            period,
            LATE_INVOICES,
        )
    )
    if not months:
        return []
    invoiced: dict[tuple[str, str, str], tuple[int, int]] = {
        (r["month"], r["kind"], r["billing_group_id"]): (r["quantity"], r["amount"])
        for r in await conn.fetch(
            "SELECT CASE WHEN l.late_for = '' THEN i.period ELSE l.late_for END AS month,"
            " l.kind, l.billing_group_id, sum(l.quantity)::bigint AS quantity,"
            " sum(l.amount)::bigint AS amount"
            " FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id"
            " WHERE i.account_id = $1 AND l.kind <> ALL($2::text[])"
            " AND CASE WHEN l.late_for = '' THEN i.period ELSE l.late_for END = ANY($3::text[])"
            " GROUP BY 1, 2, 3",
            account_id,
            list(_PLAN_KINDS),
            months,
        )
    }
    out = []
    for month in months:
        for ln in await ledger_lines(conn, account_id, month):
            had_q, had_a = invoiced.get((month, ln.kind, ln.billing_group_id), (0, 0))
            if ln.amount != had_a or ln.quantity != had_q:
                out.append(
                    Line(
                        ln.kind,
                        f"{ln.description}, late from {month}",
                        ln.billing_group_id,
                        ln.quantity - had_q,
                        ln.unit,
                        ln.amount - had_a,
                        month,
                    )
                )
    return out


def _month_before(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def _lines_of(rows: list[asyncpg.Record]) -> list[Line]:
    lines = []
    for r in rows:
        kind, group = r["kind"], r["billing_group_id"]
        if kind == "call":
            what = "Outbound minutes" if r["direction"] == "outbound" else "Inbound minutes"
            lines.append(
                Line(
                    f"call_{r['direction'] or 'outbound'}",
                    what,
                    group,
                    r["quantity"],
                    "seconds",
                    -r["amount"],
                )
            )
            continue
        description, unit = _LINE_KINDS.get(kind, (kind.capitalize(), "count"))
        quantity = r["quantity"] if unit in ("seconds", "parts", "numbers") else r["n"]
        lines.append(Line(kind, description, group, quantity, unit, -r["amount"]))
    return lines


class Invoices:
    """The invoices on PostgreSQL, the ledger and the balance store, at ``clock``'s time.
    ``payments``: the card payments an invoice's Pay Now and auto-pay use (None: refused with
    ``payments_unavailable``); ``notify``: where notices go (None: logged)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        balances: BalanceStore,
        *,
        payments: CardPayments | None = None,
        notify: Notify | None = None,
        rules: InvoiceRules = InvoiceRules(),
        clock: Clock = system_clock,
        ledger: Ledger | None = None,
    ) -> None:
        self._pool = pool
        self._balances = balances
        self._payments = payments
        self._notify = notify
        self._rules = rules
        self._clock = clock
        self._ledger = ledger or PostgresLedger(pool)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)

    # -- reading --------------------------------------------------------------------------------

    async def get(self, account_id: str, invoice_id: str) -> Invoice | None:
        async with self._pool.acquire() as conn:
            return await _load(conn, account_id, invoice_id)

    async def listed(
        self,
        account_id: str,
        *,
        status: InvoiceStatus | None = None,
        oldest_first: bool = False,
        before: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[Invoice]:
        """The account's invoices by issue date (newest first unless ``oldest_first``), without
        their lines; ``before``: the ``(issued_at, id)`` the page before ended at."""
        op, order = (">", "ASC") if oldest_first else ("<", "DESC")
        rows = await self._pool.fetch(
            "SELECT * FROM invoices WHERE account_id = $1 AND ($2::text IS NULL OR status = $2)"
            f" AND ($3::timestamptz IS NULL OR (issued_at, id) {op} ($3, $4))"
            f" ORDER BY issued_at {order}, id {order} LIMIT $5",
            account_id,
            status,
            None if before is None else before[0],
            None if before is None else before[1],
            limit,
        )
        return [_invoice(r) for r in rows]

    # -- the monthly run --------------------------------------------------------------------

    async def due_accounts(self, period: str, *, after: str = "", limit: int = 1000) -> list[str]:
        """Accounts that have an invoice to get for ``period`` and none yet: with ledger rows
        in it (an opening balance aside), or a subscription started before its end."""
        start, end = period_bounds(period)
        rows = await self._pool.fetch(
            "SELECT a.id FROM accounts a WHERE a.id > $3"
            " AND NOT EXISTS (SELECT 1 FROM invoices i WHERE i.account_id = a.id AND i.period = $4)"
            " AND (EXISTS (SELECT 1 FROM ledger l WHERE l.account_id = a.id"
            "   AND l.event_time >= $1 AND l.event_time < $2 AND l.kind <> 'opening')"
            "  OR EXISTS (SELECT 1 FROM subscriptions s WHERE s.account_id = a.id"
            "   AND s.started_at < $2))"
            " ORDER BY a.id LIMIT $5",
            start,
            end,
            after,
            period,
            limit,
        )
        return [r[0] for r in rows]

    async def run(self, period: str, *, batch: int = 500) -> dict[str, int]:
        """Issue ``period``'s invoice of every account that has none yet (a finished month
        only); the count of outcomes."""
        if period_bounds(period)[1] > self._now():
            raise InvoiceError("month_not_over", f"{period} has not ended yet", "month")
        counts: dict[str, int] = {}
        after = ""
        while True:
            todo = await self.due_accounts(period, after=after, limit=batch)
            for account_id in todo:
                try:
                    outcome = await self.issue(account_id, period)
                except (asyncpg.PostgresError, OSError, TimeoutError, BalanceStoreError) as exc:
                    log.warning("invoices: %s %s not issued: %r", account_id, period, exc)
                    outcome = "failed"
                INVOICE_STEPS.labels(outcome).inc()
                counts[outcome] = counts.get(outcome, 0) + 1
            if len(todo) < batch:
                return counts
            after = todo[-1]

    async def issue(self, account_id: str, period: str) -> str:
        """Issue the account's invoice of ``period`` (see the module docstring): ``issued``,
        ``current`` (it had one), ``ignored`` (no such account). Auto-pay follows."""
        now = self._now()
        start, end = period_bounds(period)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"invoice:{account_id}:{period}",
            )
            if await conn.fetchval(
                "SELECT 1 FROM invoices WHERE account_id = $1 AND period = $2", account_id, period
            ):
                return "current"
            acct = await conn.fetchrow(
                "SELECT a.currency, a.manager_id, a.billing_mode, a.tax_jurisdiction,"
                " coalesce(t.rate_ppm, 0) AS rate_ppm FROM accounts a"
                " LEFT JOIN tax_rates t ON t.jurisdiction = a.tax_jurisdiction WHERE a.id = $1",
                account_id,
            )
            if acct is None:
                return "ignored"
            lines = await _plan_lines(conn, account_id, period)
            extra = sum(ln.amount for ln in lines)  # beyond the plan: charged by the invoice
            lines += await ledger_lines(conn, account_id, period)
            lines += await late_lines(conn, account_id, period)
            subtotal = sum(ln.amount for ln in lines)
            rate = acct["rate_ppm"]
            tax = tax_of(subtotal, rate)
            last_second = end - timedelta(seconds=1)
            rows = []
            if extra > 0:
                rows.append(
                    _row(
                        account_id, "subscription", f"overage:{period}", -extra, period, last_second
                    )
                )
            if tax > 0:
                rows.append(_row(account_id, "tax", f"tax:{period}", -tax, period, last_second))
            charge = extra + tax
            if charge > 0:
                done = await self._ledger.existing([r[0] for r in rows])
                if len(done) < len(rows):
                    out = await self._balances.plan_step(
                        account_id,
                        f"i{period}",
                        fee=charge,
                        included_s=0,
                        period=(int(start.timestamp()), int(end.timestamp())),
                        now_s=int(now.timestamp()),
                    )
                    if out.result == "unknown_account":
                        return "ignored"
                for r in rows:
                    await self._ledger.record_fee(conn, r)
            issuer = acct["manager_id"] or "platform"
            seq = await conn.fetchval(
                "INSERT INTO invoice_counters AS c (issuer, last) VALUES ($1, 1)"
                " ON CONFLICT (issuer) DO UPDATE SET last = c.last + 1 RETURNING last",
                issuer,
            )
            total = subtotal + tax
            mode: BillingMode = acct["billing_mode"]
            due_at = now if mode == "prepaid" else now + timedelta(days=self._rules.due_days)
            amount_due = to_cents_half_up(total)
            # A prepaid statement is paid by what the balance already took.
            paid = max(0, amount_due) if mode == "prepaid" else 0
            status = status_for(max(0, amount_due), paid, due_at, now)
            invoice_id = new_invoice_id()
            await conn.execute(
                "INSERT INTO invoices (id, account_id, period, issuer, seq, number, billing_mode,"
                " currency, status, issued_at, due_at, subtotal, tax, tax_rate_ppm, total, paid)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                invoice_id,
                account_id,
                period,
                issuer,
                seq,
                invoice_number(issuer, seq),
                mode,
                acct["currency"],
                status,
                now,
                due_at,
                subtotal,
                tax,
                rate,
                total,
                paid,
            )
            await conn.executemany(
                "INSERT INTO invoice_lines (invoice_id, line, kind, description,"
                " billing_group_id, quantity, unit, amount, late_for)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                [
                    (
                        invoice_id,
                        i,
                        ln.kind,
                        ln.description,
                        ln.billing_group_id,
                        ln.quantity,
                        ln.unit,
                        ln.amount,
                        ln.late_for,
                    )
                    for i, ln in enumerate(lines, 1)
                ],
            )
            auto_pay = (
                mode == "invoiced"
                and amount_due > 0
                and await conn.fetchval(
                    "SELECT invoice_auto_pay FROM accounts WHERE id = $1", account_id
                )
            )
        await self._tell("invoice.issued", account_id, invoice_id, amount_due, "issued", now)
        if auto_pay and self._payments is not None:
            try:
                await self.pay(account_id, invoice_id, f"inv:{invoice_id}")
            except InvoiceError as exc:  # a decline, no card: the invoice stays due
                log.info("invoices: auto-pay of %s: %s", invoice_id, exc.message)
            except Exception as exc:  # the payment's outcome is unknown: settle_pending ends it
                log.warning("invoices: auto-pay of %s left pending: %r", invoice_id, exc)
        return "issued"

    # -- paying -------------------------------------------------------------------------------

    async def pay(
        self, account_id: str, invoice_id: str, payment_id: str, amount: int | None = None
    ) -> Invoice:
        """Pay ``amount`` (default: the balance due; partial allowed, never more) of an invoice
        with the saved card, once per ``payment_id``. A payment still pending is applied when
        it succeeds (``settle_pending``). Raises ``InvoiceError``."""
        if self._payments is None:
            raise InvoiceError("payments_unavailable", "card payments are not configured here")
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            inv = await _load(conn, account_id, invoice_id, lock=True)
            if inv is None:
                raise InvoiceError("invoice_not_found", f"no invoice {invoice_id!r}", "invoice_id")
            prior = await conn.fetchrow(
                "SELECT invoice_id, amount FROM invoice_payments WHERE account_id = $1"
                " AND payment_id = $2",
                account_id,
                payment_id,
            )
            if prior is not None:
                if prior["invoice_id"] != invoice_id or (
                    amount is not None and amount != prior["amount"]
                ):
                    raise InvoiceError(
                        "payment_id_reused",
                        f"payment {payment_id!r} paid something else",
                        "payment_id",
                    )
                amount = prior["amount"]
            else:
                if inv.status == "cancelled":
                    raise InvoiceError("invoice_cancelled", "the invoice was cancelled")
                due = inv.balance_due
                amount = due if amount is None else amount
                if due <= 0:
                    raise InvoiceError("invoice_paid", "nothing is due on this invoice")
                if amount <= 0 or amount % MICROS_PER_CENT:
                    raise InvoiceError("validation_error", "amount: whole cents above 0", "amount")
                if amount > due:
                    raise InvoiceError(
                        "overpayment",
                        f"at most {format_money(due)} is due; an overpayment is refused",
                        "amount",
                    )
                await conn.execute(
                    "INSERT INTO invoice_payments (invoice_id, account_id, payment_id, amount,"
                    " state, created_at) VALUES ($1, $2, $3, $4, 'pending', $5)",
                    invoice_id,
                    account_id,
                    payment_id,
                    amount,
                    now,
                )
        try:
            p = await self._payments.pay_invoice(account_id, amount, payment_id)
        except Exception as exc:
            code = getattr(exc, "code", None)
            if not isinstance(code, str):
                # Not a refusal: the card may have been charged. The invoice's payment stays
                # pending, and settle_pending applies it (or closes it) once the payment ends.
                raise
            await self._end_payment(account_id, payment_id, p=None)  # refused: nothing charged
            raise InvoiceError(code, str(getattr(exc, "message", exc))) from exc
        await self._end_payment(account_id, payment_id, p)
        if p.status in ("declined", "failed"):
            raise InvoiceError(f"payment_{p.status}", p.message or f"the payment {p.status}")
        got = await self.get(account_id, invoice_id)
        assert got is not None
        return got

    async def _end_payment(self, account_id: str, payment_id: str, p: PaidLike | None) -> None:
        """Apply a succeeded payment to its invoice (once), or close one that will not
        succeed; a pending one stays for ``settle_pending``."""
        if p is not None and p.status not in ("succeeded", "declined", "failed"):
            return
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM invoice_payments WHERE account_id = $1 AND payment_id = $2"
                " FOR UPDATE",
                account_id,
                payment_id,
            )
            if row is None or row["state"] != "pending":
                return
            if p is None or p.status != "succeeded":
                await conn.execute(
                    "UPDATE invoice_payments SET state = 'failed' WHERE account_id = $1"
                    " AND payment_id = $2",
                    account_id,
                    payment_id,
                )
                return
            inv = await _load(conn, account_id, row["invoice_id"], lock=True)
            assert inv is not None
            await conn.execute(
                "UPDATE invoice_payments SET state = 'applied', applied = $3, applied_at = $4"
                " WHERE account_id = $1 AND payment_id = $2",
                account_id,
                payment_id,
                p.captured,
                now,
            )
            paid = inv.paid + p.captured
            status = (
                inv.status
                if inv.status == "cancelled"
                else status_for(inv.amount_due, paid, inv.due_at, now)
            )
            await conn.execute(
                "UPDATE invoices SET paid = $2, status = $3 WHERE id = $1", inv.id, paid, status
            )
        if status == "paid":
            await self._tell("invoice.paid", account_id, inv.id, paid, "paid", now)
        await self._lift_past_due(account_id)

    async def settle_pending(self, limit: int = 200) -> int:
        """Apply the invoice payments whose card payment has ended since (the payment service
        settles them: ``recharge``'s recovery); the number that ended."""
        rows = await self._pool.fetch(
            "SELECT ip.account_id, ip.payment_id, p.status, p.captured FROM invoice_payments ip"
            " JOIN payments p ON p.account_id = ip.account_id AND p.id = ip.payment_id"
            " WHERE ip.state = 'pending' AND p.status <> 'pending' ORDER BY ip.created_at LIMIT $1",
            limit,
        )
        for r in rows:
            await self._end_payment(
                r["account_id"],
                r["payment_id"],
                _Ended(r["payment_id"], r["status"], r["captured"]),
            )
        return len(rows)

    # -- past due -----------------------------------------------------------------------------

    async def _lift_past_due(self, account_id: str) -> None:
        """Resume an account suspended for past due once none of its invoices is past the
        suspension point any more (its other origins stay)."""
        now = self._now()
        held = await self._pool.fetchval(
            "SELECT 1 FROM account_suspensions WHERE account_id = $1 AND origin = 'past_due'",
            account_id,
        )
        if not held or await self._overdue_to_suspend(account_id, now):
            return
        await account_admin.change_status(
            self._pool,
            self._balances,
            account_id,
            "resume",
            "past_due",
            reason="invoice_paid",
            set_by="invoices",
            clock=self._clock,
        )

    async def _overdue_to_suspend(self, account_id: str, now: datetime) -> bool:
        limit = now - timedelta(days=self._rules.suspend_after_days)
        return bool(
            await self._pool.fetchval(
                "SELECT 1 FROM invoices WHERE account_id = $1 AND status = 'overdue'"
                " AND due_at <= $2 LIMIT 1",
                account_id,
                limit,
            )
        )

    async def past_due(self) -> dict[str, int]:
        """Invoices past their due date turn overdue (a notice); a notice before the
        suspension; at ``suspend_after_days`` past due the account is suspended (origin
        past_due). Each once."""
        now = self._now()
        counts: dict[str, int] = {}
        for r in await self._pool.fetch(
            "UPDATE invoices SET status = 'overdue' WHERE status IN ('sent', 'partially_paid')"
            " AND due_at <= $1 RETURNING id, account_id, total, paid",
            now,
        ):
            counts["overdue"] = counts.get("overdue", 0) + 1
            await self._tell(
                "invoice.overdue",
                r["account_id"],
                r["id"],
                to_cents_half_up(r["total"]) - r["paid"],
                "overdue",
                now,
            )
        warn_at = now - timedelta(days=self._rules.suspend_after_days - self._rules.warn_days)
        for r in await self._pool.fetch(
            "UPDATE invoices SET notified = 'warned' WHERE status = 'overdue' AND due_at <= $1"
            " AND notified <> 'warned' RETURNING id, account_id, total, paid",
            warn_at,
        ):
            counts["warned"] = counts.get("warned", 0) + 1
            await self._tell(
                "invoice.past_due_warning",
                r["account_id"],
                r["id"],
                to_cents_half_up(r["total"]) - r["paid"],
                "suspension_soon",
                now,
            )
        limit = now - timedelta(days=self._rules.suspend_after_days)
        for r in await self._pool.fetch(
            "SELECT DISTINCT i.account_id FROM invoices i WHERE i.status = 'overdue'"
            " AND i.due_at <= $1 AND NOT EXISTS (SELECT 1 FROM account_suspensions s"
            "  WHERE s.account_id = i.account_id AND s.origin = 'past_due')",
            limit,
        ):
            await account_admin.change_status(
                self._pool,
                self._balances,
                r["account_id"],
                "suspend",
                "past_due",
                reason="past_due",
                set_by="invoices",
                clock=self._clock,
            )
            counts["suspended"] = counts.get("suspended", 0) + 1
        return counts

    async def tick(self) -> dict[str, int]:
        """The billing clock's invoice work: last month's run (``run_delay_s`` after its end),
        pending payments applied, past due."""
        last = _last_month(self._now())
        late_enough = period_bounds(last)[1] + timedelta(seconds=self._rules.run_delay_s)
        counts = await self.run(last) if self._now() >= late_enough else {}
        settled = await self.settle_pending()
        if settled:
            counts["payments_settled"] = settled
        for k, v in (await self.past_due()).items():
            counts[k] = counts.get(k, 0) + v
        return counts

    # -- cancelling ---------------------------------------------------------------------------

    async def cancel(self, account_id: str, invoice_id: str, reason: str) -> Invoice:
        """The operator's cancellation: the invoice's charges credited back to the balance once
        (a ``correction`` row, shown as a credit on the next invoice); payments stay credited.
        Raises ``InvoiceError``."""
        now = self._now()
        async with self._pool.acquire() as conn, conn.transaction():
            inv = await _load(conn, account_id, invoice_id, lock=True)
            if inv is None:
                raise InvoiceError("invoice_not_found", f"no invoice {invoice_id!r}", "invoice_id")
            if inv.status == "cancelled":
                return inv
            event_id = f"cancel:{invoice_id}"
            if inv.total > 0 and not await self._ledger.existing(
                [credit_key(account_id, event_id)]
            ):
                await self._balances.credit(account_id, event_id, inv.total)
                await self._ledger.record_fee(
                    conn, _row(account_id, "correction", event_id, inv.total, invoice_id, now)
                )
            await conn.execute(
                "UPDATE invoices SET status = 'cancelled', cancelled_at = $2, cancel_reason = $3"
                " WHERE id = $1",
                invoice_id,
                now,
                reason,
            )
        await self._lift_past_due(account_id)
        got = await self.get(account_id, invoice_id)
        assert got is not None
        return got

    async def _tell(
        self,
        type_: NotificationType,
        account_id: str,
        invoice_id: str,
        amount: int,
        reason: str,
        at: datetime,
    ) -> None:
        n = Notification(
            id=f"{account_id}:{type_}:{invoice_id}",
            source=INVOICES_SOURCE,
            type=type_,
            time=at,
            subject=account_id,
            data=NotificationData(
                account_id=account_id,
                invoice_id=invoice_id,
                amount=format_money(max(amount, 0)),  # type: ignore[arg-type]
                reason=reason,
                message=f"invoice {invoice_id}: {reason.replace('_', ' ')}",
            ),
        )
        if self._notify is None:
            log.info("%s %s %s", type_, account_id, invoice_id)
            return
        try:
            await self._notify.notify(n)
        except Exception as exc:  # best effort: the invoice row is the record
            log.warning("invoices: notice %s for %s not sent: %r", type_, invoice_id, exc)


@dataclass(frozen=True, slots=True)
class _Ended:
    id: str
    status: str
    captured: int
    message: str = ""


def _last_month(now: datetime) -> str:
    return _month_before(month_of(now))


async def _plan_lines(conn: Conn, account_id: str, period: str) -> list[Line]:
    """DIDs and extensions beyond what the period's plan includes (under PAYG: all of them),
    at the plan's rates: charged by the invoice itself."""
    r = await conn.fetchrow(
        "SELECT p.billing_model, p.included_dids, p.included_extensions, p.did_rate,"
        " p.extension_rate, s.extensions FROM subscription_periods sp"
        " JOIN plans p ON p.id = sp.plan_id JOIN subscriptions s ON s.account_id = sp.account_id"
        " WHERE sp.account_id = $1 AND sp.period = $2",
        account_id,
        period,
    )
    if r is None:
        return []
    dids = await conn.fetchval(
        "SELECT count(*) FROM numbers WHERE account_id = $1 AND status <> 'released'"
        " AND activated_at < $2",
        account_id,
        period_bounds(period)[1],
    )
    payg = r["billing_model"] == "payg"
    extra_dids = dids if payg else max(0, dids - r["included_dids"])
    extra_ext = r["extensions"] if payg else max(0, r["extensions"] - r["included_extensions"])
    lines = []
    if extra_dids and r["did_rate"]:
        lines.append(
            Line(
                "dids",
                "DIDs beyond the plan",
                "",
                extra_dids,
                "numbers",
                extra_dids * r["did_rate"],
            )
        )
    if extra_ext and r["extension_rate"]:
        lines.append(
            Line(
                "extensions",
                "Extensions beyond the plan",
                "",
                extra_ext,
                "extensions",
                extra_ext * r["extension_rate"],
            )
        )
    return lines


def _invoice(r: asyncpg.Record) -> Invoice:
    return Invoice(
        **{
            k: r[k]
            for k in (
                "id",
                "account_id",
                "period",
                "issuer",
                "seq",
                "number",
                "billing_mode",
                "currency",
                "status",
                "issued_at",
                "due_at",
                "subtotal",
                "tax",
                "tax_rate_ppm",
                "total",
                "paid",
                "cancelled_at",
                "cancel_reason",
            )
        }
    )


async def _load(
    conn: Conn, account_id: str, invoice_id: str, *, lock: bool = False
) -> Invoice | None:
    r = await conn.fetchrow(
        "SELECT * FROM invoices WHERE id = $1 AND account_id = $2"
        + (" FOR UPDATE" if lock else ""),
        invoice_id,
        account_id,
    )
    if r is None:
        return None
    inv = _invoice(r)
    inv.lines.extend(
        Line(
            x["kind"],
            x["description"],
            x["billing_group_id"],
            x["quantity"],
            x["unit"],
            x["amount"],
            x["late_for"],
        )
        for x in await conn.fetch(
            "SELECT * FROM invoice_lines WHERE invoice_id = $1 ORDER BY line", invoice_id
        )
    )
    inv.payments.extend(
        Applied(x["payment_id"], x["amount"], x["state"], x["applied"], x["created_at"])
        for x in await conn.fetch(
            "SELECT * FROM invoice_payments WHERE invoice_id = $1 ORDER BY created_at, payment_id",
            invoice_id,
        )
    )
    return inv


async def set_tax_rate(
    pool: asyncpg.Pool, jurisdiction: str, name: str, rate_ppm: int, *, now: datetime
) -> None:
    """The operator's rate for a jurisdiction (parts per million); applies to invoices issued
    from now on."""
    await pool.execute(
        "INSERT INTO tax_rates (jurisdiction, name, rate_ppm, updated_at) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (jurisdiction) DO UPDATE SET name = $2, rate_ppm = $3, updated_at = $4",
        jurisdiction,
        name,
        rate_ppm,
        now,
    )


async def set_account_billing(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    billing_mode: BillingMode | None = None,
    auto_pay: bool | None = None,
    tax_jurisdiction: str | None = None,
) -> bool:
    """An account's billing mode and tax jurisdiction (the operator's) and invoice auto-pay
    (the account's admin's); None leaves one as it is. False: no such account. A mode applies
    from the next invoice on."""
    done = await pool.fetchval(
        "UPDATE accounts SET billing_mode = coalesce($2, billing_mode),"
        " invoice_auto_pay = coalesce($3, invoice_auto_pay),"
        " tax_jurisdiction = coalesce($4, tax_jurisdiction) WHERE id = $1 RETURNING 1",
        account_id,
        billing_mode,
        auto_pay,
        tax_jurisdiction,
    )
    return done is not None
