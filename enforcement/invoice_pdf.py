"""An invoice as a PDF (fpdf2, a maintained pure-Python PDF library): the service provider's
name and logo (settings ``invoice_issuer_name``, ``invoice_logo_path``), the header (number,
dates, period), every line item, and the totals. Money is printed as the contract's decimal
strings (``contracts.money.format_money``), so what the PDF says is what the API says."""

from __future__ import annotations

from pathlib import Path

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from contracts.money import format_money
from enforcement.invoices import Invoice

_STATUS = {
    "sent": "Sent",
    "paid": "Paid",
    "partially_paid": "Partially Paid",
    "overdue": "Overdue",
    "cancelled": "Cancelled",
}


def _date(d: object) -> str:
    return d.strftime("%Y-%m-%d") if hasattr(d, "strftime") else str(d)


def _latin(text: str) -> str:
    """The core fonts are Latin-1: anything else is shown as ``?`` rather than failing."""
    return text.encode("latin-1", "replace").decode("latin-1")


def render(invoice: Invoice, *, issuer_name: str, logo: Path | None = None) -> bytes:
    """The invoice's PDF. ``logo``: a PNG or JPEG printed top left (left out when missing)."""
    pdf = FPDF(format="A4")
    pdf.set_title(f"Invoice {invoice.number}")
    pdf.set_author(_latin(issuer_name))
    pdf.set_creator("meter")
    pdf.add_page()
    if logo is not None and logo.is_file():
        pdf.image(str(logo), x=10, y=10, h=16)
        pdf.set_xy(40, 12)
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 8, _latin(issuer_name), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_y(max(pdf.get_y(), 30))
    pdf.set_font("Helvetica", "B", 13)
    pdf.cell(0, 8, f"Invoice {invoice.number}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", "", 10)
    for label, value in (
        ("Account", invoice.account_id),
        ("Billing period", f"{_date(invoice.period_start)} to {_date(invoice.period_end)}"),
        ("Issue date", _date(invoice.issued_at)),
        ("Due date", _date(invoice.due_at)),
        ("Status", _STATUS.get(invoice.status, invoice.status)),
        ("Billing", "Prepaid statement" if invoice.billing_mode == "prepaid" else "Invoiced"),
    ):
        pdf.cell(40, 6, label)
        pdf.cell(0, 6, _latin(value), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)
    widths = (80, 30, 25, 20, 35)
    pdf.set_font("Helvetica", "B", 10)
    for w, head in zip(widths, ("Description", "Group", "Quantity", "Unit", "Amount"), strict=True):
        pdf.cell(w, 7, head, border="B", align="R" if head in ("Quantity", "Amount") else "L")
    pdf.ln()
    pdf.set_font("Helvetica", "", 10)
    for line in invoice.lines:
        cells = (
            line.description,
            line.billing_group_id or "-",
            str(line.quantity),
            line.unit,
            format_money(line.amount),
        )
        for w, text, right in zip(widths, cells, (False, False, True, False, True), strict=True):
            pdf.cell(w, 6, _latin(text), align="R" if right else "L")
        pdf.ln()
    pdf.ln(3)
    rate = f" ({invoice.tax_rate_ppm / 10_000:g} %)" if invoice.tax_rate_ppm else ""
    totals = [
        ("Subtotal", invoice.subtotal),
        (f"Tax{rate}", invoice.tax),
        ("Total", invoice.total),
        ("Amount due (rounded to the cent)", invoice.amount_due),
        ("Paid", invoice.paid),
        ("Balance due", invoice.balance_due),
    ]
    for label, amount in totals:
        pdf.set_font("Helvetica", "B" if label in ("Total", "Balance due") else "", 10)
        pdf.cell(sum(widths[:4]), 6, label, align="R")
        pdf.cell(widths[4], 6, f"{format_money(amount)} {invoice.currency}", align="R")
        pdf.ln()
    if invoice.status == "cancelled":
        pdf.ln(4)
        pdf.set_font("Helvetica", "I", 10)
        pdf.cell(0, 6, _latin(f"Cancelled: {invoice.cancel_reason or ''}"))
    return bytes(pdf.output())
