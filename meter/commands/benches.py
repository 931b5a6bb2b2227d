"""``meter demo`` and ``meter bench``: the whole service on embedded defaults, and its targets."""

from __future__ import annotations

import argparse
import asyncio

from infra.settings import Settings


def demo(settings: Settings, args: argparse.Namespace) -> int:
    """The whole service with simulated traffic for ``--seconds``, then a reconciliation;
    with ``--sip``, real SIP calls through Kamailio and SIPp instead."""
    if args.sip:
        from meter.demo_sip import run_sip_demo

        return asyncio.run(run_sip_demo(settings, args.keep))
    from meter.demo import run_demo

    return asyncio.run(run_demo(settings, args.accounts, args.seconds, args.rate, args.keep))


def bench(settings: Settings, args: argparse.Namespace) -> int:
    """The benchmark of ``args.target``; its options are shared, each target reads its own."""
    if args.target == "authorize":
        from meter.bench_authorize import run_bench_authorize

        return asyncio.run(
            run_bench_authorize(settings, args.accounts, args.rate, args.seconds, args.json)
        )
    if args.target == "ledger":
        from meter.bench_ledger import run_bench_ledger

        return asyncio.run(
            run_bench_ledger(settings, args.rows, args.accounts, args.queries, args.json)
        )
    if args.target == "rating":
        from meter.bench_rating import run_bench_rating

        return run_bench_rating(args.prefixes, args.lookups, args.json)
    from meter.bench import run_bench

    return asyncio.run(
        run_bench(
            settings,
            args.events,
            args.accounts,
            args.json,
            rebuild=args.rebuild,
            workers=args.workers,
        )
    )
