"""``meter seed``, ``meter keys`` and ``meter bundle buy``: accounts, their API keys, bundles."""

from __future__ import annotations

import argparse
import json
import sys

from infra.settings import Settings


async def seed(settings: Settings, raw: bytes) -> int:
    """Create the price lists, plans, bundles and accounts of a seed file (JSON bytes)."""
    from balance.accounts import SeedFile, create_accounts, put_bundle, put_plan, put_price_list
    from balance.store import RedisBalances
    from infra.db import create_pool
    from metering.worker import redis_client

    spec = SeedFile.model_validate_json(raw)
    pool = await create_pool(settings.database_url)
    r = redis_client(settings)
    try:
        for pl in spec.price_lists:
            await put_price_list(pool, pl)
        for plan in spec.plans:
            await put_plan(pool, plan)
        for bundle in spec.bundles:
            await put_bundle(pool, bundle)
        n = await create_accounts(pool, RedisBalances(r), spec.accounts)
        print(
            f"price lists: {len(spec.price_lists)}, plans: {len(spec.plans)}, "
            f"bundles: {len(spec.bundles)}, accounts created: {n}"
        )
    finally:
        await r.aclose()
        await pool.close()
    return 0


async def keys(settings: Settings, args: argparse.Namespace) -> int:
    """Create a key (its secret alone on stdout) or revoke one: 2 for a missing option, 1 for
    an unknown account or key."""
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


async def bundle(settings: Settings, args: argparse.Namespace) -> int:
    """Buy a bundle, idempotent by ``--purchase-id``; the purchase as JSON, 1 if refused."""
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
