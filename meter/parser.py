"""The ``meter`` command line: every subcommand, option and help text, and nothing it does.

``meter.cli.main`` parses with ``build_parser`` and hands each subcommand to its module under
``meter.commands``; tests read the parser itself (the processes ``meter run`` knows).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

DESCRIPTION: Final = (
    "The ``meter`` command: run the service's processes, the demo, the benchmark, admin tasks."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meter", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="run the whole service on embedded defaults with simulated "
        "switch traffic, then reconcile",
    )
    d.add_argument("--accounts", type=int, default=300)
    d.add_argument("--seconds", type=float, default=20.0)
    d.add_argument("--rate", type=int, default=4000, help="events per second to publish")
    d.add_argument("--keep", action="store_true", help="keep the embedded data folder")
    d.add_argument(
        "--sip",
        action="store_true",
        help="instead: real SIP calls through Kamailio and SIPp (Debian packages) into the service",
    )

    r = sub.add_parser("run", help="run one of the service's processes")
    r.add_argument(
        "process",
        choices=["metering", "ops", "api", "recharge", "bridge", "billing"],
        help="metering: the usage stream worker; ops: consumer lag, accounts by state and "
        "reconciliation drift for Prometheus (one per deployment); api: the HTTP API "
        "(METER_API_HOST, METER_API_PORT); recharge: the auto-recharge worker (faust; "
        "METER_PAYMENT_GATEWAY); bridge: enforces billing.control-signals on Kamailio "
        "(METER_BRIDGE_RPC_URL, METER_KAFKA_BOOTSTRAP); billing: the billing clock: the "
        "numbers inventory, renewals, holds and releases, plan fees (needs the three "
        "endpoints set)",
    )

    b = sub.add_parser("bench", help="measure a target of ARCHITECTURE.md")
    b.add_argument("target", choices=["metering", "authorize", "rating", "ledger"])
    b.add_argument("--events", type=int, default=300_000, help="metering: events to process")
    b.add_argument("--accounts", type=int, default=10_000)
    b.add_argument(
        "--rebuild",
        action="store_true",
        help="metering: then FLUSHALL the bench's own Redis and time rebuilding every account "
        "from the ledger",
    )
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="metering: 2 or more: one worker process, then this many in one consumer group "
        "(aggregate events/s of each), instead of the baseline and the in-process hot path",
    )
    b.add_argument(
        "--rate", type=int, default=5_000, help="authorize: the rate to report p50/p99/p99.9 at"
    )
    b.add_argument(
        "--seconds", type=float, default=60.0, help="authorize: load time in all, at most"
    )
    b.add_argument("--json", type=Path, help="also write the figures to this file")
    b.add_argument("--prefixes", type=int, default=100_000, help="rating: prefixes loaded")
    b.add_argument("--lookups", type=int, default=1_000_000, help="rating: lookups timed")
    b.add_argument("--rows", type=int, default=10_000_000, help="ledger: rows in the book")
    b.add_argument("--queries", type=int, default=200, help="ledger: accounts queried")

    s = sub.add_parser("seed", help="create price lists and accounts from a JSON file")
    s.add_argument("file", type=Path)

    k = sub.add_parser(
        "keys",
        help="API keys: create one (printed once) or revoke one (docs/design/people.md)",
    )
    k.add_argument("action", choices=["create", "revoke"])
    k.add_argument("--account", help="create: the account the key belongs to (not operator's)")
    k.add_argument(
        "--role",
        choices=["admin", "user", "service", "operator"],
        help="create: admin or user of --account (a key with a role of its own), service "
        "(call-control, any account; on the platform's account), operator (the platform's "
        "staff, every account; no --account)",
    )
    k.add_argument(
        "--user",
        help="create: a key acting as this user (usr_...), with its account, role and access "
        "groups as they are at each request (no --account, --role)",
    )
    k.add_argument("--label", default="", help="create: what the key is for (at most 100 chars)")
    k.add_argument("--key-id", help="revoke: the key's id (mk_<key id>_...)")

    u = sub.add_parser(
        "users",
        help="people: create an account's first admin, list, disable, set a portal password"
        " (docs/design/people.md, docs/design/portal.md)",
    )
    u.add_argument(
        "action",
        choices=["create", "list", "disable", "passwd"],
        help="passwd: set the portal password of --user or --email (read from stdin, or asked"
        " twice on a terminal); lifts a sign-in lockout and ends the user's portal sessions",
    )
    u.add_argument(
        "--account", help="create, list: the account (without: the platform's operators)"
    )
    u.add_argument("--email", help="create: the person's email (unique); disable, passwd: who")
    u.add_argument("--name", default="", help="create: the person's name")
    u.add_argument(
        "--role",
        choices=["admin", "user", "operator"],
        help="create: admin or user of --account, or operator (no --account)",
    )
    u.add_argument("--user", help="disable, passwd: the user's id (usr_...)")

    pl = sub.add_parser(
        "pricelist", help="price list rates as CSV (docs/design/rating.md): import, export"
    )
    pl.add_argument("action", choices=["import", "export"])
    pl.add_argument("price_list", help="the price list's id (created by meter seed)")
    pl.add_argument("file", type=Path, nargs="?", help="import: the CSV file")
    pl.add_argument("--at", help="export: only the versions in force at this RFC 3339 time")

    e = sub.add_parser("estimate", help="what a call or a message would cost an account now")
    e.add_argument("--account", required=True)
    e.add_argument("--to", help="the destination, E.164 (+44...)")
    e.add_argument("--seconds", type=int, help="the call's duration in seconds")
    e.add_argument("--direction", choices=["outbound", "inbound"], default="outbound")
    e.add_argument("--sms-parts", type=int, help="a message of this many parts instead")

    bu = sub.add_parser("bundle", help="buy a minute bundle from an account's balance")
    bu.add_argument("action", choices=["buy"])
    bu.add_argument("--account", required=True)
    bu.add_argument("--bundle", required=True, help="the bundle's id (see the seed file)")
    bu.add_argument("--purchase-id", required=True, help="idempotency key: retry with the same one")

    ac = sub.add_parser(
        "accounts", help="accounts, for operators: create, list, verify, suspend, resume"
    )
    ac.add_argument("action", choices=["create", "list", "verify", "suspend", "resume"])
    ac.add_argument(
        "--reason", help="suspend: a short code (default operator); resume lifts every origin"
    )
    ac.add_argument("--account", help="the account's id (create: default a fresh one)")
    ac.add_argument("--name", help="create: a display name")
    ac.add_argument("--price-list", help="create: a top-level account's price list")
    ac.add_argument("--manager", help="create: the manager of a managed account; list: filter")
    ac.add_argument("--credit-limit", help="create: a decimal amount, e.g. 50.00")
    ac.add_argument(
        "--level", type=int, choices=[1, 2], default=2, help="verify: 2 lifts new-account limits"
    )

    lg = sub.add_parser("ledger", help="an account's month of ledger records, by billing group")
    lg.add_argument("action", choices=["report"])
    lg.add_argument("--account", required=True)
    lg.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    lg.add_argument("--csv", action="store_true", help="CSV instead of JSON lines")

    iv = sub.add_parser("invoices", help="the monthly invoice run; an account's billing")
    iv.add_argument("action", choices=["run", "settings"])
    iv.add_argument("--month", help="run: the month to invoice, YYYY-MM (UTC), once it is over")
    iv.add_argument("--account", help="settings: the account")
    iv.add_argument("--mode", choices=["prepaid", "invoiced"], help="settings: how it is billed")
    iv.add_argument("--tax", help="settings: its tax jurisdiction (US, US-CA, ...)")
    iv.add_argument("--auto-pay", choices=["on", "off"], help="settings: invoice auto-pay")

    tx = sub.add_parser("tax", help="tax rates by jurisdiction, for the invoices")
    tx.add_argument("action", choices=["set", "list"])
    tx.add_argument("jurisdiction", nargs="?", help="set: US, US-CA, ...")
    tx.add_argument("name", nargs="?", help="set: its name on invoices")
    tx.add_argument("percent", nargs="?", help="set: e.g. 8.25")

    sub.add_parser("migrate", help="apply pending database migrations")
    rc = sub.add_parser("reconcile", help="compare every Redis balance with the ledger")
    rc.add_argument(
        "--settle-provisional",
        action="store_true",
        help="give back the provisional charge of every call charged twice (listed first)",
    )

    c = sub.add_parser("contracts", help="the public contract")
    c.add_argument("action", choices=["export-schema"])
    c.add_argument("out", type=Path)
    return p
