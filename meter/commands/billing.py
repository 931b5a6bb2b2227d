"""``meter invoices`` and ``meter tax``: the operator's command line for invoices (the monthly
run, an account's billing mode and tax jurisdiction) and tax rates, the same rules as the
billing worker's and the API's (``enforcement.invoices``)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from infra.settings import Settings

_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
_JURISDICTION = re.compile(r"[A-Z]{2}(-[A-Z0-9]{1,3})?")


async def invoices(settings: Settings, args: argparse.Namespace) -> int:
    """``run --month``: issue every invoice the month still lacks (idempotent; a month not over
    yet is refused); ``settings --account``: billing mode, tax jurisdiction, auto-pay. 2 for a
    bad option, 1 for what cannot be done."""
    from balance.store import RedisBalances
    from enforcement.invoices import InvoiceError, Invoices, set_account_billing
    from infra.db import create_pool
    from metering.worker import redis_client

    if args.action == "run" and not (args.month and _MONTH.fullmatch(args.month)):
        print("meter: invoices run needs --month YYYY-MM", file=sys.stderr)
        return 2
    if args.action == "settings" and not args.account:
        print("meter: invoices settings needs --account", file=sys.stderr)
        return 2
    if args.tax and not _JURISDICTION.fullmatch(args.tax):
        print("meter: --tax is a jurisdiction such as US or US-CA", file=sys.stderr)
        return 2
    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        if args.action == "settings":
            auto = None if args.auto_pay is None else args.auto_pay == "on"
            if not await set_account_billing(
                pool, args.account, billing_mode=args.mode, auto_pay=auto, tax_jurisdiction=args.tax
            ):
                print(f"meter: no account {args.account!r}", file=sys.stderr)
                return 1
            row = await pool.fetchrow(
                "SELECT billing_mode, invoice_auto_pay, tax_jurisdiction FROM accounts"
                " WHERE id = $1",
                args.account,
            )
            assert row is not None
            print(json.dumps({"account_id": args.account, **dict(row)}))
            return 0
        try:
            counts = await Invoices(pool, RedisBalances(r)).run(args.month)
        except InvoiceError as exc:
            print(f"meter: {exc.message}", file=sys.stderr)
            return 1
        print(json.dumps({"month": args.month, **counts}))
        return 1 if counts.get("failed") else 0
    finally:
        await r.aclose()
        await pool.close()


async def tax(settings: Settings, args: argparse.Namespace) -> int:
    """``meter tax set JURISDICTION NAME PERCENT``: a tax rate (e.g. ``US-CA California 8.25``),
    for the invoices issued from now on; ``meter tax list``."""
    from enforcement.invoices import set_tax_rate
    from infra.db import create_pool

    pool = await create_pool(settings.database_url)
    try:
        if args.action == "list":
            for r in await pool.fetch("SELECT * FROM tax_rates ORDER BY jurisdiction"):
                print(
                    json.dumps(
                        {
                            "jurisdiction": r["jurisdiction"],
                            "name": r["name"],
                            "percent": str(Decimal(r["rate_ppm"]) / 10_000),
                        }
                    )
                )
            return 0
        if not (args.jurisdiction and _JURISDICTION.fullmatch(args.jurisdiction) and args.name):
            print(
                "meter: tax set JURISDICTION NAME PERCENT (e.g. US-CA California 8.25)",
                file=sys.stderr,
            )
            return 2
        try:
            ppm = Decimal(args.percent) * 10_000
        except (InvalidOperation, TypeError):
            ppm = Decimal(-1)
        if ppm != ppm.to_integral_value() or not 0 <= ppm <= 1_000_000:
            print("meter: PERCENT is 0 to 100 with at most 4 decimals", file=sys.stderr)
            return 2
        await set_tax_rate(pool, args.jurisdiction, args.name, int(ppm), now=datetime.now(UTC))
        print(json.dumps({"jurisdiction": args.jurisdiction, "rate_ppm": int(ppm)}))
        return 0
    finally:
        await pool.close()
