"""``meter seed``, ``meter keys``, ``meter users`` and ``meter bundle buy``: accounts, their
people and API keys, bundles."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from infra.settings import Settings

if TYPE_CHECKING:
    from datetime import datetime

    import asyncpg

    from enforcement.people import People, User


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
    """Create a key (its secret alone on stdout) or revoke one: 2 for missing or clashing
    options, 1 for an unknown account, user or key."""
    from enforcement.people import People
    from infra.db import create_pool
    from infra.http.api_keys import ApiKeys

    if args.action == "create":
        if args.user and (args.account or args.role):
            return _usage("keys create --user takes the user's account and role, not theirs")
        if args.role == "operator" and args.account:
            return _usage("an operator's key has no --account: it acts on every account")
        if not args.user and not args.role:
            return _usage("keys create needs --account and --role, --role operator, or --user")
        if args.role not in (None, "operator") and not args.account:
            return _usage("keys create needs --account and --role")
    elif not args.key_id:
        return _usage("keys revoke needs --key-id")
    pool = await create_pool(settings.database_url)
    try:
        keys = ApiKeys(pool)
        if args.action == "revoke":
            if not await keys.revoke(args.key_id):
                print(f"meter: no live key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}", file=sys.stderr)
            return 0
        if args.user:
            user = await People(pool).user(args.user)
            if user is None or user.disabled_at is not None:
                print(f"meter: no user {args.user} (or it is disabled)", file=sys.stderr)
                return 1
            account, role = user.account_id, user.role
        else:
            account, role = args.account, args.role
        try:
            key, secret = await keys.create(account, role, user_id=args.user, label=args.label)
        except LookupError as exc:
            print(f"meter: {exc}", file=sys.stderr)
            return 1
    finally:
        await pool.close()
    # The key alone on stdout (for scripts); it is stored only as a hash, so this is the
    # one time anybody sees it.
    owner = key.account_id or "every account"
    acting = f", as {key.user_id}" if key.user_id else ""
    print(f"key {key.key_id} for {owner} ({key.role}{acting}); shown once:", file=sys.stderr)
    print(secret)
    return 0


async def users(settings: Settings, args: argparse.Namespace) -> int:
    """``meter users create|list|disable``: how an operator makes an account's first admin
    (no API key needed: whoever runs this reaches the database). Users as JSON on stdout; 2
    for missing or bad options, 1 for an unknown account or user, or a taken email."""
    from enforcement.people import People, PeopleError
    from infra.db import create_pool

    if args.action == "create":
        if not args.email or not args.role:
            return _usage("users create needs --email, --role and (but for operators) --account")
        if (args.role == "operator") != (args.account is None):
            return _usage("an operator has no --account; an admin or a user needs one")
    if args.action in ("disable", "passwd") and not (args.user or args.email):
        return _usage(f"users {args.action} needs --user or --email")
    password = ""
    if args.action == "passwd":
        try:
            password = _read_password()
        except ValueError as exc:
            return _usage(str(exc))
    pool = await create_pool(settings.database_url)
    try:
        people = People(pool)
        if args.action == "list":
            found: list[User] = []
            before: tuple[datetime, str] | None = None
            while page := await people.users(args.account, limit=200, before=before):
                found += page
                before = page[-1].created_at, page[-1].id
            print(json.dumps([_user_json(u) for u in found], indent=2))
            return 0
        try:
            if args.action == "create":
                user = await people.create_user(args.account, args.email, args.role, args.name)
            else:
                user_id = args.user
                if user_id is None:
                    by_email = await people.user_by_email(args.email)
                    if by_email is None:
                        print(f"meter: no user with email {args.email!r}", file=sys.stderr)
                        return 1
                    user_id = by_email.id
                if args.action == "passwd":
                    return await _passwd(pool, people, user_id, password)
                user = await people.disable_user(user_id)
        except ValueError as exc:
            return _usage(str(exc))
        except PeopleError as exc:
            print(f"meter: {exc}", file=sys.stderr)
            return 1
    finally:
        await pool.close()
    print(json.dumps(_user_json(user), indent=2))
    return 0


def _read_password() -> str:
    """The new password: stdin's first line when piped, else asked twice on the terminal."""
    import getpass

    from portal.passwords import valid

    if sys.stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the two passwords differ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    return valid(first)


async def _passwd(
    pool: asyncpg.Pool, people: People, user_id: str, password: str
) -> int:
    from portal.sessions import Sessions

    user = await people.user(user_id)
    if user is None or user.disabled_at is not None:
        print(f"meter: no user {user_id!r}, or it is disabled", file=sys.stderr)
        return 1
    await Sessions(pool).set_password(user.id, password)
    print(f"password set for {user.email} ({user.id}); its portal sessions ended", file=sys.stderr)
    return 0


def _usage(message: str) -> int:
    print(f"meter: {message}", file=sys.stderr)
    return 2


def _user_json(u: User) -> dict[str, object]:
    return {
        "id": u.id,
        "account_id": u.account_id,
        "email": u.email,
        "name": u.name,
        "role": u.role,
        "created_at": u.created_at.isoformat(),
        "disabled_at": None if u.disabled_at is None else u.disabled_at.isoformat(),
    }


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
