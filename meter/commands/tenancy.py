"""``meter accounts``: the operator's command line for accounts (create, list, verify, suspend,
resume), the same rules as the API's (``enforcement.tenants``, ``enforcement.account_admin``)
with the operator's rights: the command line is run by the platform's staff."""

from __future__ import annotations

import argparse
import json
import sys

from infra.settings import Settings


async def accounts(settings: Settings, args: argparse.Namespace) -> int:
    """2 for a missing or bad option, 1 for an account that is not there or cannot be so."""
    from balance.store import RedisBalances
    from contracts.money import format_money, parse_money
    from enforcement import tenants
    from infra.db import create_pool
    from metering.worker import redis_client

    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    balances = RedisBalances(r)
    try:
        if args.action == "list":
            rows = await tenants.list_accounts(
                pool, manager_id=args.manager, before=None, limit=1_000_000
            )
            for p in rows:
                print(
                    json.dumps(
                        {
                            "id": p.id,
                            "name": p.name,
                            "manager_id": p.manager_id,
                            "is_manager": p.is_manager,
                            "price_list_id": p.price_list_id,
                            "credit_limit": format_money(p.credit_limit),
                            "verification_level": p.verification_level,
                        }
                    )
                )
            return 0
        if not args.account and args.action != "create":
            print(f"meter: accounts {args.action} needs --account", file=sys.stderr)
            return 2
        if args.action == "create":
            if not args.price_list and not args.manager:
                print("meter: accounts create needs --price-list or --manager", file=sys.stderr)
                return 2
            try:
                p = await tenants.create_account(
                    pool,
                    balances,
                    account_id=args.account,
                    name=args.name or "",
                    manager_id=args.manager,
                    price_list_id=args.price_list,
                    credit_limit=parse_money(args.credit_limit) if args.credit_limit else 0,
                )
            except (tenants.AccountConflict, ValueError) as exc:
                print(f"meter: {exc}", file=sys.stderr)
                return 1
            print(p.id)
            return 0
        if args.action in ("suspend", "resume"):
            from enforcement.account_admin import StatusError, change_status

            try:
                outcome = await change_status(
                    pool,
                    balances,
                    args.account,
                    args.action,
                    "operator",
                    reason=args.reason,
                    set_by="meter accounts",
                )
            except (StatusError, ValueError) as exc:
                print(f"meter: {exc}", file=sys.stderr)
                return 1
            print(
                json.dumps(
                    {
                        "account_id": outcome.account_id,
                        "status": outcome.status,
                        "changed": outcome.changed,
                        "suspended_by": list(outcome.suspended_by),
                        "hold_reason": outcome.hold_reason,
                    }
                )
            )
            return 0
        if args.action == "verify":
            got = await tenants.update_settings(
                pool, balances, args.account, verification_level=args.level
            )
            if got is None:
                print(f"meter: no account {args.account!r}", file=sys.stderr)
                return 1
            print(f"{got.id}: verification level {got.verification_level}", file=sys.stderr)
            return 0
        return 2
    finally:
        await r.aclose()
        await pool.close()


async def ledger(settings: Settings, args: argparse.Namespace) -> int:
    """``meter ledger report``: the month's ledger records of an account by billing group, kind
    and direction (``enforcement.groups.month_report``), as JSON lines or CSV; 2 for a bad
    month, 1 for an unknown account."""
    import csv
    import re

    from contracts.money import format_money
    from enforcement import groups
    from infra.db import create_pool

    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", args.month):
        print(f"meter: --month must be YYYY-MM, not {args.month!r}", file=sys.stderr)
        return 2
    pool = await create_pool(settings.database_url)
    try:
        if not await pool.fetchval("SELECT 1 FROM accounts WHERE id = $1", args.account):
            print(f"meter: no account {args.account!r}", file=sys.stderr)
            return 1
        report = await groups.month_report(pool, args.account, args.month)
    finally:
        await pool.close()
    fields = ["billing_group_id", "kind", "direction", "count", "quantity", "included_s"]
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow([*fields, "amount"])
        for line in report.lines:
            w.writerow([*(getattr(line, f) for f in fields), format_money(line.amount)])
        w.writerow(["", "total", "", "", "", "", format_money(report.total)])
    else:
        for line in report.lines:
            row = {f: getattr(line, f) for f in fields} | {"amount": format_money(line.amount)}
            print(json.dumps(row))
        print(json.dumps({"total": format_money(report.total), "month": args.month}))
    return 0
