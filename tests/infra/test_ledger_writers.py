"""One writer per table: the ledger, the payments' tables, the people's and the suspensions each
have one module that writes them, so an invariant about a table (the Redis balance equals the
sum of the ledger; a card is charged once per payment; a user of one account is never touched
through another; only what may lift an origin lifts it) is checked in one place. Found by
reading the packages' source for SQL that writes the table (tests set their scenes by hand and
are not counted)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: every package of the service (the list mypy checks)
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["packages"]

#: table -> the one module that may write it
OWNERS = {
    "ledger": "infra/ledger.py",
    "payments": "recharge/store.py",
    "payment_methods": "recharge/store.py",
    "auto_recharge": "recharge/store.py",
    "recharge_triggers": "recharge/store.py",
    "users": "enforcement/people.py",
    "access_groups": "enforcement/people.py",
    "access_group_members": "enforcement/people.py",
    "api_keys": "infra/http/api_keys.py",
    "account_suspensions": "enforcement/account_admin.py",
    "billing_groups": "enforcement/groups.py",
    "number_groups": "enforcement/groups.py",
    "billing_group_users": "enforcement/groups.py",
    "outbound_profiles": "enforcement/groups.py",
    "numbers": "enforcement/numbers.py",
    "subscriptions": "enforcement/subscriptions.py",
    "subscription_periods": "enforcement/subscriptions.py",
    "invoices": "enforcement/invoices.py",
    "invoice_lines": "enforcement/invoices.py",
    "invoice_payments": "enforcement/invoices.py",
    "invoice_counters": "enforcement/invoices.py",
    "tax_rates": "enforcement/invoices.py",
    "refunds": "recharge/refund_store.py",
    "user_passwords": "portal/sessions.py",
    "portal_sessions": "portal/sessions.py",
}


def writes(table: str) -> re.Pattern[str]:
    t = re.escape(table)
    return re.compile(
        rf"""\b(?:insert\s+into|update|delete\s+from|truncate(?:\s+table)?|merge\s+into)\s+"?{t}"?\b"""
        rf"""|copy_records_to_table\(\s*["']{t}["']|copy_to_table\(\s*["']{t}["']""",
        re.IGNORECASE,
    )


def writers(table: str) -> set[str]:
    pattern = writes(table)
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if pattern.search(path.read_text()):
                found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("table", sorted(OWNERS))
def test_one_module_writes_the_table(table: str) -> None:
    assert "recharge" in PACKAGES and "meter" in PACKAGES
    # Equal, not a subset: if the owner stops matching, the pattern has gone stale.
    assert writers(table) == {OWNERS[table]}


@pytest.mark.parametrize(
    "sql",
    [
        '"INSERT INTO ledger (event_key, account_id"',
        "'update ledger set amount = 0'",
        '"DELETE FROM  ledger WHERE"',
        'await conn.copy_records_to_table("ledger", records=rows)',
    ],
)
def test_the_pattern_sees_each_way_of_writing(sql: str) -> None:
    assert writes("ledger").search(sql)


def test_the_pattern_ignores_reads_and_other_tables() -> None:
    for sql in ("SELECT sum(amount) FROM ledger", "INSERT INTO ledger_archive", "the ledger"):
        assert not writes("ledger").search(sql), sql
