"""``meter pricelist import|export`` and ``meter estimate``: price lists and what things cost."""

from __future__ import annotations

import argparse
import json
import sys

from infra.settings import Settings


async def pricelist(settings: Settings, args: argparse.Namespace) -> int:
    """Import a CSV into a price list (every bad row on stderr as ``FILE:LINE: message``, 1) or
    export one as CSV on stdout."""
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


async def estimate(settings: Settings, args: argparse.Namespace) -> int:
    """The cost of a call or a message for an account now, as JSON; nothing is charged."""
    import enforcement.estimate
    from balance.store import RedisBalances
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
            est = await enforcement.estimate.estimate(
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
