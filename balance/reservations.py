"""Calls' reservations in the balance store: reserve, extend on progress, release, sweep.

``ReservationStore`` is the part of ``balance.store.RedisBalances`` that holds the credit (and
minute-bucket seconds) a call in progress may spend; ``RedisBalances`` registers its scripts.
Every call is listed in ``keys.RESERVATION_EXPIRY`` for the sweep, which charges what a lost
hangup never closed, provisionally (or releases it when it held nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from balance import keys, replies
from balance.errors import call, mapped
from balance.pipeline import round_trip
from balance.values import (
    CallProgress,
    PlanPeriod,
    Progress,
    Provisional,
    Released,
    Reservation,
    ReservationRequest,
    Tariff,
)
from contracts.events import Direction
from infra.ledger import Unsettled
from infra.redisclient import RedisClient


class ReservationStore:
    """Reservations of calls (see the module docstring). Errors: ``balance.errors``."""

    _r: RedisClient
    _reserve: AsyncScript
    _progress: AsyncScript
    _release: AsyncScript

    async def reserve(
        self,
        account_id: str,
        call_id: str,
        direction: Direction,
        tariff: Tariff,
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plan: PlanPeriod | None = None,
    ) -> Reservation:
        """Authorize a call and reserve its first grant (idempotent per ``call_id``).

        ``plan``: the account's allowance for the current period, counted while debit.lua has
        not yet created its grant in the bucket."""
        (r,) = await self.reserve_many(
            [ReservationRequest(account_id, call_id, direction, tariff)],
            now_s=now_s,
            grant_s=grant_s,
            grace_s=grace_s,
            max_s=max_s,
            plans={account_id: plan} if plan else None,
        )
        return r

    async def reserve_many(
        self,
        calls: Sequence[ReservationRequest],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        force: bool = False,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Reservation]:
        """``reserve`` for many calls in one round trip, one answer each in their order.

        Each call is listed for the sweep *before* its script runs (same pipeline, in order),
        so a crash in between cannot leave a reservation nobody releases; a listing without a
        reservation is dropped by the sweep. ``force``: the calls are already up (answered
        without an authorization); a barred one gets an empty reservation, which the next
        progress update terminates. A grant holds the seconds the account's minute bucket can
        still give (its ``plans`` allowance included) before any money.
        """
        if not calls:
            return []
        plans = plans or {}
        first_expiry = now_s + grant_s + grace_s

        async def build(pipe: Pipeline) -> None:
            for c in calls:
                t = c.tariff
                pipe.zadd(
                    keys.RESERVATION_EXPIRY,
                    {f"{c.account_id}\x00{c.call_id}": first_expiry},
                    gt=True,
                )
                await self._reserve(
                    keys=[keys.account(c.account_id), keys.reservations(c.account_id)],
                    args=[
                        c.call_id,
                        c.direction,
                        now_s,
                        grant_s,
                        grace_s,
                        max_s,
                        t.rate_per_min,
                        t.connect_fee,
                        t.initial_s,
                        t.subsequent_s,
                        "1" if force else "0",
                        replies.plan_line(plans.get(c.account_id)),
                    ],
                    client=pipe,
                )

        raw = await round_trip(self._r, "reservation", build)
        out = [replies.decode_reservation(r) for r in raw[1::2]]
        fix = [
            (f"{c.account_id}\x00{c.call_id}", r.expires_at)
            for c, r in zip(calls, out, strict=True)
            if r.decision == "allow" and r.expires_at < first_expiry
        ]
        if fix:

            async def relist(pipe: Pipeline) -> None:
                for member, at in fix:
                    pipe.zadd(keys.RESERVATION_EXPIRY, {member: at})

            await round_trip(self._r, "reservation expiry", relist)
        return out

    async def progress(
        self,
        updates: Sequence[CallProgress],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Progress]:
        """Apply call.answered / call.progress updates in one round trip, one ``Progress`` each
        in their order (an unknown call's is ``none``).
        Extensions draw on the minute bucket (``plans`` as in ``reserve_many``) before money.

        Accounts whose update may queue a call.terminate are marked for the outbox relay
        first, for the same reason as in ``reserve``.
        """
        if not updates:
            return []
        accounts = {u.account_id for u in updates}
        with mapped("outbox mark"):
            await self._r.sadd(keys.OUTBOX_PENDING, *accounts)
        plans = plans or {}

        async def build(pipe: Pipeline) -> None:
            for u in updates:
                await self._progress(
                    keys=[
                        keys.account(u.account_id),
                        keys.reservations(u.account_id),
                        keys.outbox(u.account_id),
                    ],
                    args=[
                        u.call_id,
                        now_s,
                        u.started_at,
                        u.elapsed_s,
                        grant_s,
                        grace_s,
                        max_s,
                        replies.plan_line(plans.get(u.account_id)),
                    ],
                    client=pipe,
                )
                pipe.zadd(
                    keys.RESERVATION_EXPIRY,
                    {f"{u.account_id}\x00{u.call_id}": now_s + grant_s + grace_s},
                    gt=True,
                )

        raw = await round_trip(self._r, "progress batch", build)
        with mapped("outbox mark"):
            await self._r.sadd(keys.OUTBOX_PENDING, *accounts)
        return [replies.decode_progress(r) for r in raw[0::2]]

    async def release(self, account_id: str, call_id: str, *, now_s: int) -> int:
        """Close a reservation without charging it (the charge comes with the hangup).
        Returns the micro-units released (its bucket seconds are free again too). A call the
        sweep charged provisionally is left to its hangup and the sweep: 0."""
        n, *_ = await call(
            f"release {call_id}",
            lambda: self._release(
                keys=[keys.account(account_id), keys.reservations(account_id)],
                args=[call_id, now_s, "0", 0],
            ),
        )
        if int(n) >= 0:
            with mapped("reservation expiry"):
                await self._r.zrem(keys.RESERVATION_EXPIRY, f"{account_id}\x00{call_id}")
        return max(int(n), 0)

    async def sweep_expired(
        self,
        *,
        now_s: int,
        limit: int = 1000,
        keep_s: int = keys.PROVISIONAL_KEEP_S,
        record: Callable[[list[Provisional]], Awaitable[None]] | None = None,
    ) -> list[Released | Provisional]:
        """Close reservations whose call was never closed (hangup lost), at most ``limit``.

        Policy (docs/design/call-credit.md): one that held money or bucket seconds is charged
        what it held, provisionally, in the script that closes it (``Provisional``; a late
        hangup settles it, ``debit.lua``); one that held nothing is released. A provisional
        marker waits ``keep_s`` for its hangup. ``record`` writes the ledger rows of the
        provisional charges (idempotently): it is awaited before the sweep stops listing them,
        so a crash or a failure of ``record`` leaves them due, and the next sweep finds the
        same charges (``new`` False, nothing charged again) and records them again. Without
        ``record`` they stay due. Returns those released that held anything, and the
        provisional charges.
        """
        with mapped("sweep"):
            due = cast(
                list[bytes],
                await self._r.zrangebyscore(keys.RESERVATION_EXPIRY, "-inf", now_s, 0, limit),
            )
        if not due:
            return []
        pairs = [tuple(member.decode().split("\x00", 1)) for member in due]

        async def build(pipe: Pipeline) -> None:
            for account_id, call_id in pairs:
                await self._release(
                    keys=[keys.account(account_id), keys.reservations(account_id)],
                    args=[call_id, now_s, "1", keep_s],
                    client=pipe,
                )

        results: list[Any] = await round_trip(self._r, "sweep", build)
        done: list[Released | Provisional] = []
        charged: list[Provisional] = []
        for (account_id, call_id), (n, held, amount, at, new) in zip(pairs, results, strict=True):
            if int(at) > 0:
                p = Provisional(account_id, call_id, int(amount), int(held), int(at), new == 1)
                charged.append(p)
                done.append(p)
            elif int(n) >= 0 and (int(n) > 0 or int(held) > 0):
                done.append(Released(account_id, call_id, int(n), int(held)))
        if charged and record is not None:
            await record(charged)
        recorded = record is not None

        async def relist(pipe: Pipeline) -> None:
            for member, (n, _, _, at, _) in zip(due, results, strict=True):
                if int(at) > 0 and not recorded:
                    continue  # its ledger row is not written: stays due
                if int(n) < 0:  # not over yet (extended, or a provisional marker waiting)
                    pipe.zadd(keys.RESERVATION_EXPIRY, {member: -int(n)})
                else:
                    pipe.zrem(keys.RESERVATION_EXPIRY, member)

        await round_trip(self._r, "sweep expiry", relist)
        return done

    async def restore_provisional(
        self, charges: Sequence[Unsettled], *, now_s: int, keep_s: int = keys.PROVISIONAL_KEEP_S
    ) -> int:
        """Put back the sweep's provisional marker of each charge (the ledger has it and no
        settlement) where the call has no entry in the reservations hash: Redis dropped the
        marker (its time was up) or lost it (flushed). A late hangup then settles against it
        in ``debit.lua`` exactly as against the sweep's own. HSETNX: a live reservation, a
        marker still there or a hangup's closed marker is never touched. The marker holds no
        bucket seconds (those were free once the first one went) and lasts until the charge's
        ``keep_s`` is over, or an hour from now if that is sooner, listed for the sweep to
        drop. Its format is ``release.lua``'s. Returns how many were put back."""
        if not charges:
            return 0
        ends = [max(c.charged_at + keep_s, now_s + 3_600) for c in charges]

        async def build(pipe: Pipeline) -> None:
            for c, end in zip(charges, ends, strict=True):
                # Listed first (NX: a live reservation keeps its own expiry), so a crash cannot
                # leave a marker the sweep never drops; a stray listing is dropped harmlessly.
                pipe.zadd(keys.RESERVATION_EXPIRY, {f"{c.account_id}\x00{c.call_id}": end}, nx=True)
                marker = f"0|0|{end}|0|0|1|1|0|-1|0|p{c.charged}|{c.charged_at}"
                pipe.hsetnx(keys.reservations(c.account_id), c.call_id, marker)

        got = await round_trip(self._r, "provisional restore", build)
        return sum(1 for n in got[1::2] if n)

    async def reservations(self, account_id: str) -> dict[str, int]:
        """Live reservations of an account: call_id -> micro-units held."""
        with mapped("reservations"):
            raw = cast(dict[bytes, bytes], await self._r.hgetall(keys.reservations(account_id)))
        return {k.decode(): int(v.split(b"|", 1)[0]) for k, v in raw.items()}

    async def held_seconds(self, account_id: str) -> dict[str, int]:
        """Live reservations of an account: call_id -> seconds of the minute bucket held."""
        with mapped("reservations"):
            raw = cast(dict[bytes, bytes], await self._r.hgetall(keys.reservations(account_id)))
        out = {}
        for k, v in raw.items():
            f = v.split(b"|")
            out[k.decode()] = int(f[9]) if len(f) > 9 else 0
        return out
