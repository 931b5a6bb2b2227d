"""The balance store: typed wrappers around the Lua scripts in ``balance/lua``.

Errors (httpx-style tree)::

    BalanceStoreError
    └── OutcomeUnknown   the call may or may not have been applied (timeout, connection lost
                         after send). Never retry blindly: a retried debit is only safe because
                         debits are idempotent on their event key; a credit is idempotent on its
                         credit id. Resolve by re-sending the same ids, never new ones.

Scripts are loaded once (``register_script``); redis-py re-loads them on ``NOSCRIPT`` only.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balance import keys, scripts
from infra.clock import Clock, system_clock

ACCOUNT_STATES: Final = ("active", "low", "hold", "suspended")
#: The outbox entry type of an auto-recharge trigger (not a signal: it goes to the worker).
RECHARGE_REQUESTED: Final = "recharge.requested"


class BalanceStoreError(Exception):
    """Base class of balance-store failures."""


class OutcomeUnknown(BalanceStoreError):
    """The request may have been applied. Re-send the same idempotency keys to resolve it."""


def _lua(name: str) -> str:
    return scripts.source(name)


#: A call's draw on included minutes: (billed_s, rate_per_min, connect_fee, answered_at).
Draw = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Debit:
    """One charge. ``event_key`` (16 bytes) and ``fingerprint`` (8 bytes) come from the event."""

    def __post_init__(self) -> None:
        if len(self.event_key) != 16 or len(self.fingerprint) != 8 or self.amount < 0:
            raise ValueError("a debit needs a 16-byte key, an 8-byte fingerprint, amount >= 0")

    event_key: bytes
    fingerprint: bytes
    amount: int  # micro-units >= 0
    day: int  # UTC day number of the event's own time (unix seconds // 86400)
    call_id: str = ""  # a hangup's call: its reservation is released with the charge
    #: a call that may draw included seconds (then ``amount`` is what it costs with nothing
    #: drawn); None for a final amount
    draw: Draw | None = None


@dataclass(frozen=True, slots=True)
class PendingSignal:
    seq: int
    type: str
    reason: str
    call_id: str | None = None
    terminate_at: int | None = None  # unix seconds, for call.terminate


@dataclass(slots=True)
class AccountOutcome:
    """What one account's debits did. ``codes[i]`` is ``n`` new, ``d`` duplicate, ``c`` conflict."""

    account_id: str
    found: bool
    balance: int = 0
    status: str = ""
    codes: str = ""
    dup_amounts: list[int] = field(default_factory=list)
    outbox: list[PendingSignal] = field(default_factory=list)
    #: event index -> (amount debited, seconds drawn from the minute bucket), for the events
    #: (new or duplicate) that drew any; the others were debited their own ``amount``
    draws: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    """``result``: applied, repeat (bought before: nothing changed), unknown_account,
    insufficient_credit. ``balance`` in micro-units after it."""

    result: str
    balance: int
    status: str


@dataclass(frozen=True, slots=True)
class CreditOutcome:
    applied: bool
    balance: int
    status: str
    found: bool = True


@dataclass(frozen=True, slots=True)
class AccountState:
    balance: int
    reserved: int
    credit_limit: int
    low_threshold: int
    status: str
    seq: int

    @property
    def available(self) -> int:
        return self.balance + self.credit_limit - self.reserved


class DebitLike(Protocol):
    """What ``apply_debits`` reads of a debit (``Debit``, or the processor's own charges)."""

    @property
    def event_key(self) -> bytes: ...
    @property
    def fingerprint(self) -> bytes: ...
    @property
    def amount(self) -> int: ...
    @property
    def day(self) -> int: ...
    @property
    def call_id(self) -> str: ...
    @property
    def draw(self) -> Draw | None: ...


#: An account's plan allowance for the current period: ``(included_s, period_start,
#: period_end)``, unix seconds.
PlanPeriod = tuple[int, int, int]


class Balances(Protocol):
    """The seam before Redis. A fake implements the same calls for pure unit tests."""

    async def apply_debits(
        self,
        batch: Sequence[tuple[str, Sequence[DebitLike]]],
        now_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[AccountOutcome]: ...

    async def ack_outbox(self, acks: dict[str, int]) -> None: ...

    async def credit(
        self, account_id: str, credit_id: str, amount: int, *, now_s: int | None = None
    ) -> CreditOutcome: ...

    async def credit_many(
        self, credits: Sequence[tuple[str, str, int]], *, now_s: int | None = None
    ) -> list[CreditOutcome]: ...

    async def undraw_many(self, draws: Sequence[tuple[str, bytes, int, int, int]]) -> list[int]: ...

    async def reserve_many(
        self,
        calls: Sequence[tuple[str, str, str, Tariff]],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        force: bool = False,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Reservation]: ...

    async def progress(
        self,
        updates: Sequence[tuple[str, str, int, int]],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Progress]: ...

    async def pending_outboxes(self, limit: int = 1000) -> dict[str, list[PendingSignal]]: ...

    async def clear_outbox_pending(self, account_ids: Sequence[str]) -> None: ...

    async def sweep_expired(
        self, *, now_s: int, limit: int = 1000
    ) -> list[tuple[str, str, int, int]]: ...


async def _execute(pipe: Pipeline) -> list[Any]:
    """``pipe.execute()``, always giving the connection back: redis-py checks scripts
    (SCRIPT EXISTS) before its own cleanup, so an error or a cancellation there (a deadline)
    would otherwise leak the connection, and a few hundred leaks empty the pool."""
    try:
        return await pipe.execute()
    finally:
        await pipe.reset()  # type: ignore[no-untyped-call]


def _decode_draws(raw: bytes) -> dict[int, tuple[int, int]]:
    """``index:amount:drawn`` entries, ``,`` separated."""
    out = {}
    for part in raw.split(b","):
        i, amount, drawn = part.split(b":")
        out[int(i)] = (int(amount), int(drawn))
    return out


#: debit.lua's binary argument records (big-endian, as its EVENT and ACCOUNT formats):
#: event_key, fingerprint, amount, day, billed_s (-1: no draw), rate_per_min, connect_fee,
#: answered_at, len(call_id) -- the call id's bytes follow; and per account: its number of
#: events, included_s (0: no plan), period_start, period_end.
_DEBIT_EVENT: Final = struct.Struct(">16s8sqiiqqqH")
_DEBIT_ACCOUNT: Final = struct.Struct(">Iqqq")
_NO_DRAW: Final = (-1, 0, 0, 0)


def _plan_line(plan: PlanPeriod | None) -> str:
    """A plan allowance as the scripts read it: ``included_s,period_start,period_end``."""
    return "{},{},{}".format(*plan) if plan else ""


def _decode_outbox(entries: list[bytes]) -> list[PendingSignal]:
    """``seq|type|reason`` or, for call.terminate, ``seq|type|reason|call_id|terminate_at``."""
    out = []
    for raw in entries:
        seq, type_, rest = raw.decode().split("|", 2)
        if type_ == "call.terminate":
            # The call id is percent-escaped by progress.lua (it may hold any character).
            reason, tail = rest.split("|", 1)
            call_id, at = tail.rsplit("|", 1)
            out.append(PendingSignal(int(seq), type_, reason, unquote(call_id), int(at)))
        else:
            out.append(PendingSignal(int(seq), type_, rest))
    return out


@dataclass(frozen=True, slots=True)
class Tariff:
    """The price of a call's time, as a reservation needs it (from ``rating.rating``)."""

    rate_per_min: int
    connect_fee: int = 0
    initial_s: int = 6
    subsequent_s: int = 6


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to an authorization. ``max_duration_s``: what the available credit buys at
    this rate; ``granted_s``: what is reserved now (``reserved`` micro-units)."""

    decision: str  # "allow" | "deny"
    reason: str  # "ok" or a contract deny reason
    max_duration_s: int
    reserved: int
    granted_s: int
    expires_at: int  # unix seconds; the sweep releases it after this
    #: of ``granted_s``, the seconds held in the minute bucket (``reserved`` covers the rest)
    held_s: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    """What a call.answered / call.progress did to the call's reservation."""

    outcome: str  # none | ok | extended | terminate | terminating
    until: int  # seconds covered after the answer, or terminate_at (unix s) when terminating
    outbox: list[PendingSignal]


class RedisBalances:
    """Balances in Redis. ``max_accounts_per_call`` bounds how long one script holds Redis.

    On a single Redis node one script may carry many accounts; on a cluster pass
    ``max_accounts_per_call=1`` (keys of one script must share a slot) and use a cluster client.
    ``clock``: the time of the calls that take no ``now_s`` (see ``infra.clock``); the scripts
    never read Redis's own clock.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_accounts_per_call: int = 256,
        clock: Clock = system_clock,
    ) -> None:
        self._r = client
        self._max = max_accounts_per_call
        self._clock = clock
        self._debit: AsyncScript = client.register_script(_lua("debit.lua"))
        self._ack: AsyncScript = client.register_script(_lua("outbox_ack.lua"))
        self._credit: AsyncScript = client.register_script(_lua("credit.lua"))
        self._load: AsyncScript = client.register_script(_lua("load_account.lua"))
        self._reserve: AsyncScript = client.register_script(_lua("reserve.lua"))
        self._progress: AsyncScript = client.register_script(_lua("progress.lua"))
        self._release: AsyncScript = client.register_script(_lua("release.lua"))
        self._status: AsyncScript = client.register_script(_lua("set_status.lua"))
        self._grant: AsyncScript = client.register_script(_lua("grant.lua"))
        self._undraw: AsyncScript = client.register_script(_lua("undraw.lua"))
        self._recharge: AsyncScript = client.register_script(_lua("recharge_settings.lua"))

    async def apply_debits(
        self,
        batch: Sequence[tuple[str, Sequence[DebitLike]]],
        now_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[AccountOutcome]:
        """Apply every debit of the batch in one pipelined round trip.

        Idempotent per event key; safe to call again with the same batch after
        ``OutcomeUnknown``. Returns one outcome per account, in the order given. Debits with
        a ``draw`` first take their billed seconds from the account's minute bucket (its
        ``plans`` allowance for the period included); see ``AccountOutcome.draws``.
        """
        plans = plans or {}
        pipe = self._r.pipeline(transaction=False)
        event = _DEBIT_EVENT.pack
        account = _DEBIT_ACCOUNT.pack
        for start in range(0, len(batch), self._max):
            chunk = batch[start : start + self._max]
            # Two binary arguments, whatever the number of events (encoding thousands of small
            # arguments is what a pipeline spends its client time on), every value in a
            # fixed-width field or behind its length (see debit.lua): struct.error on a value
            # out of its field's range, before anything is sent.
            parts: list[bytes] = []
            heads: list[bytes] = []
            for a, ds in chunk:
                p = plans.get(a)
                heads.append(account(len(ds), *p) if p else account(len(ds), 0, 0, 0))
                for d in ds:
                    billed, rate, fee, at = d.draw or _NO_DRAW
                    call = d.call_id.encode() if d.call_id else b""
                    parts.append(
                        event(
                            d.event_key, d.fingerprint, d.amount, d.day,
                            billed, rate, fee, at, len(call),
                        )
                    )
                    if call:
                        parts.append(call)
            await self._debit(
                keys=[keys.account(a) for a, _ in chunk],
                args=[now_s, keys.DEDUP_KEEP_S, b"".join(parts), b"".join(heads)],
                client=pipe,
            )
        try:
            replies = await _execute(pipe)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"debit batch outcome unknown: {exc}") from exc
        outcomes: list[AccountOutcome] = []
        i = 0
        for reply in replies:
            for line in reply.split(b"\n"):
                found, bal, st, codes, dups, out, draws = line.split(b"\t")
                account_id = batch[i][0]
                i += 1
                if found == b"0":
                    outcomes.append(AccountOutcome(account_id, False))
                    continue
                outcomes.append(
                    AccountOutcome(
                        account_id,
                        True,
                        int(bal),
                        st.decode(),
                        codes.decode(),
                        [int(x) for x in dups.split(b",")] if dups else [],
                        _decode_outbox(out.split(b";")) if out else [],
                        _decode_draws(draws) if draws else {},
                    )
                )
        return outcomes

    async def grant_minutes(
        self,
        account_id: str,
        grant_id: str,
        *,
        price: int,
        seconds: int,
        valid_from: int,
        expires_at: int,
        now_s: int,
    ) -> GrantOutcome:
        """Take ``price`` micro-units from the balance and add ``seconds`` to the account's
        minute bucket, usable from ``valid_from`` until ``expires_at`` (unix seconds); both
        or neither, once per ``grant_id`` (no ``,`` or ``;``). Refused whole when the available
        credit does not cover the price. May queue a low-balance or hold signal."""
        if "," in grant_id or ";" in grant_id:
            raise ValueError("a grant id cannot contain ',' or ';'")
        await self.mark_outbox_pending([account_id])
        try:
            result, bal, st = await self._grant(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[grant_id, price, seconds, valid_from, expires_at, now_s],
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"grant {grant_id} outcome unknown: {exc}") from exc
        await self.mark_outbox_pending([account_id])
        names = {1: "applied", 0: "repeat", -1: "unknown_account", -2: "insufficient_credit"}
        return GrantOutcome(names[int(result)], int(bal), st.decode())

    async def bucket(self, account_id: str) -> bytes | None:
        """The raw minute bucket of an account (``rating.plans.parse_bucket`` reads it)."""
        raw = await self._r.hget(keys.account(account_id), "min")
        return cast(bytes | None, raw)

    async def reserve(
        self,
        account_id: str,
        call_id: str,
        direction: str,
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
            [(account_id, call_id, direction, tariff)],
            now_s=now_s,
            grant_s=grant_s,
            grace_s=grace_s,
            max_s=max_s,
            plans={account_id: plan} if plan else None,
        )
        return r

    async def reserve_many(
        self,
        calls: Sequence[tuple[str, str, str, Tariff]],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        force: bool = False,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Reservation]:
        """``reserve`` for many ``(account_id, call_id, direction, tariff)`` in one round trip.

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
        pipe = self._r.pipeline(transaction=False)
        first_expiry = now_s + grant_s + grace_s
        for account_id, call_id, direction, t in calls:
            pipe.zadd(
                keys.RESERVATION_EXPIRY, {f"{account_id}\x00{call_id}": first_expiry}, gt=True
            )
            await self._reserve(
                keys=[keys.account(account_id), keys.reservations(account_id)],
                args=[
                    call_id,
                    direction,
                    now_s,
                    grant_s,
                    grace_s,
                    max_s,
                    t.rate_per_min,
                    t.connect_fee,
                    t.initial_s,
                    t.subsequent_s,
                    "1" if force else "0",
                    _plan_line(plans.get(account_id)),
                ],
                client=pipe,
            )
        try:
            replies = await _execute(pipe)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"reservation outcome unknown: {exc}") from exc
        out = []
        fix = self._r.pipeline(transaction=False)
        for (account_id, call_id, _, _), r in zip(calls, replies[1::2], strict=True):
            decision, reason, max_d, reserved, granted, expires, held = r
            if decision == b"allow" and int(expires) < first_expiry:
                fix.zadd(keys.RESERVATION_EXPIRY, {f"{account_id}\x00{call_id}": int(expires)})
            out.append(
                Reservation(
                    decision.decode(),
                    reason.decode(),
                    int(max_d),
                    int(reserved),
                    int(granted),
                    int(expires),
                    int(held),
                )
            )
        if len(fix):
            await _execute(fix)
        return out

    async def progress(
        self,
        updates: Sequence[tuple[str, str, int, int]],
        *,
        now_s: int,
        grant_s: int,
        grace_s: int,
        max_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[Progress]:
        """Apply ``(account_id, call_id, started_at, elapsed_s)`` updates in one round trip.
        Extensions draw on the minute bucket (``plans`` as in ``reserve_many``) before money.

        Accounts whose update may queue a call.terminate are marked for the outbox relay
        first, for the same reason as in ``reserve``.
        """
        if not updates:
            return []
        await self._r.sadd(keys.OUTBOX_PENDING, *{a for a, _, _, _ in updates})
        plans = plans or {}
        pipe = self._r.pipeline(transaction=False)
        for account_id, call_id, started_at, elapsed in updates:
            await self._progress(
                keys=[
                    keys.account(account_id),
                    keys.reservations(account_id),
                    keys.outbox(account_id),
                ],
                args=[
                    call_id,
                    now_s,
                    started_at,
                    elapsed,
                    grant_s,
                    grace_s,
                    max_s,
                    _plan_line(plans.get(account_id)),
                ],
                client=pipe,
            )
            pipe.zadd(
                keys.RESERVATION_EXPIRY,
                {f"{account_id}\x00{call_id}": now_s + grant_s + grace_s},
                gt=True,
            )
        try:
            replies = await _execute(pipe)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"progress batch outcome unknown: {exc}") from exc
        await self._r.sadd(keys.OUTBOX_PENDING, *{a for a, _, _, _ in updates})
        out = []
        for outcome, until, box in replies[0::2]:
            out.append(
                Progress(
                    outcome.decode(), int(until), _decode_outbox(box.split(b";")) if box else []
                )
            )
        return out

    async def release(self, account_id: str, call_id: str, *, now_s: int) -> int:
        """Close a reservation without charging it (the charge comes with the hangup).
        Returns the micro-units released (its bucket seconds are free again too)."""
        n, _ = await self._release(
            keys=[keys.account(account_id), keys.reservations(account_id)],
            args=[call_id, now_s, "0"],
        )
        await self._r.zrem(keys.RESERVATION_EXPIRY, f"{account_id}\x00{call_id}")
        return int(n)

    async def sweep_expired(
        self, *, now_s: int, limit: int = 1000
    ) -> list[tuple[str, str, int, int]]:
        """Release reservations whose call was never closed (hangup lost), at most ``limit``.

        Returns ``(account_id, call_id, micro-units released, bucket seconds released)``.
        Policy: nothing is charged for them; a hangup arriving later is still charged in full,
        exactly once.
        """
        due = cast(
            list[bytes],
            await self._r.zrangebyscore(keys.RESERVATION_EXPIRY, "-inf", now_s, 0, limit),
        )
        if not due:
            return []
        pipe = self._r.pipeline(transaction=False)
        pairs = []
        for member in due:
            account_id, call_id = member.decode().split("\x00", 1)
            pairs.append((account_id, call_id))
            await self._release(
                keys=[keys.account(account_id), keys.reservations(account_id)],
                args=[call_id, now_s, "1"],
                client=pipe,
            )
        results = await _execute(pipe)
        done = []
        pipe = self._r.pipeline(transaction=False)
        for (account_id, call_id), member, (released, held) in zip(
            pairs, due, results, strict=True
        ):
            if int(released) < 0:  # extended since it was listed: list it at its new expiry
                pipe.zadd(keys.RESERVATION_EXPIRY, {member: -int(released)})
                continue
            pipe.zrem(keys.RESERVATION_EXPIRY, member)
            if int(released) > 0 or int(held) > 0:
                done.append((account_id, call_id, int(released), int(held)))
        await _execute(pipe)
        return done

    async def set_status(
        self, account_id: str, action: str, reason: str, *, now_s: int | None = None
    ) -> tuple[int, str]:
        """``action`` "suspend", "hold" (pinned whatever the credit, see set_status.lua) or
        "resume" (lifts both). Returns ``(changed, status)``: changed is 1 when a signal was
        queued, 0 when the account already was so, -1 for an unknown account. ``now_s`` (unix
        s, default: the clock) decides which minute-bucket grants count for a resumed account."""
        if action not in ("suspend", "hold", "resume"):
            raise ValueError(f"unknown action {action!r}")
        now = self._now(now_s)
        await self.mark_outbox_pending([account_id])
        changed, status = await self._status(
            keys=[keys.account(account_id), keys.outbox(account_id)], args=[action, reason, now]
        )
        await self.mark_outbox_pending([account_id])
        return int(changed), status.decode()

    async def set_auto_recharge(self, account_id: str, threshold: int | None) -> int | None:
        """Turn auto-recharge on at ``threshold`` micro-units (None: off) in the account's
        real-time state. Returns the seq of the trigger this fired (the account was already at
        or below the threshold), 0 when none, None for an unknown account."""
        await self.mark_outbox_pending([account_id])
        args: list[str | int] = ["off"] if threshold is None else ["on", threshold]
        found, seq = await self._recharge(
            keys=[keys.account(account_id), keys.outbox(account_id)], args=args
        )
        return int(seq) if found else None

    async def close_recharge_trigger(self, account_id: str, seq: int) -> bool:
        """The recharge worker is done with trigger ``seq``: the next crossing fires anew.
        False when another trigger is open (or none)."""
        _, closed = await self._recharge(
            keys=[keys.account(account_id), keys.outbox(account_id)], args=["close", seq]
        )
        return bool(closed)

    async def recharge_state(self, account_id: str) -> tuple[int | None, int | None, str | None]:
        """``(threshold, open trigger seq, pinned hold reason)`` of the real-time state."""
        raw: list[bytes | None] = await self._r.hmget(  # type: ignore[assignment]
            keys.account(account_id), ["rth", "rq", "hr"]
        )
        rth, rq, hr = raw
        return (
            int(rth) if rth is not None else None,
            int(rq) if rq is not None else None,
            hr.decode() if hr is not None else None,
        )

    async def reservations(self, account_id: str) -> dict[str, int]:
        """Live reservations of an account: call_id -> micro-units held."""
        raw = cast(dict[bytes, bytes], await self._r.hgetall(keys.reservations(account_id)))
        return {k.decode(): int(v.split(b"|", 1)[0]) for k, v in raw.items()}

    async def held_seconds(self, account_id: str) -> dict[str, int]:
        """Live reservations of an account: call_id -> seconds of the minute bucket held."""
        raw = cast(dict[bytes, bytes], await self._r.hgetall(keys.reservations(account_id)))
        out = {}
        for k, v in raw.items():
            f = v.split(b"|")
            out[k.decode()] = int(f[9]) if len(f) > 9 else 0
        return out

    async def mark_outbox_pending(self, account_ids: Sequence[str]) -> None:
        if account_ids:
            await self._r.sadd(keys.OUTBOX_PENDING, *account_ids)

    async def pending_outboxes(self, limit: int = 1000) -> dict[str, list[PendingSignal]]:
        """Accounts marked as maybe having unpublished signals, with their outboxes."""
        members = cast(list[bytes], await self._r.srandmember(keys.OUTBOX_PENDING, limit))
        ids = [a.decode() for a in members]
        if not ids:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for a in ids:
            pipe.lrange(keys.outbox(a), 0, -1)
        boxes = await _execute(pipe)
        return {a: _decode_outbox(b) for a, b in zip(ids, boxes, strict=True)}

    async def clear_outbox_pending(self, account_ids: Sequence[str]) -> None:
        """Unmark accounts whose outbox is now empty.

        Unmark first, then look: a writer marks an account before *and* after its script, so
        a signal queued meanwhile always leaves a mark behind (and the next script touching
        the account returns it anyway).
        """
        for a in account_ids:
            await self._r.srem(keys.OUTBOX_PENDING, a)
            if await self._r.llen(keys.outbox(a)):
                await self._r.sadd(keys.OUTBOX_PENDING, a)

    async def ack_outbox(self, acks: dict[str, int]) -> None:
        """Remove published signals (``seq <= acked``) from each account's outbox."""
        if not acks:
            return
        pipe = self._r.pipeline(transaction=False)
        for account_id, seq in acks.items():
            await self._ack(
                keys=[keys.outbox(account_id), keys.account(account_id)], args=[seq], client=pipe
            )
        await _execute(pipe)

    async def pending_outbox(self, account_id: str) -> list[PendingSignal]:
        entries: list[bytes] = await self._r.lrange(keys.outbox(account_id), 0, -1)  # type: ignore[assignment]
        return _decode_outbox(entries)

    def _now(self, now_s: int | None) -> int:
        """``now_s``, or the injected clock's whole seconds."""
        return int(self._clock()) if now_s is None else now_s

    async def credit(
        self,
        account_id: str,
        credit_id: str,
        amount: int,
        *,
        payment: bool = False,
        now_s: int | None = None,
    ) -> CreditOutcome:
        """Credit ``amount`` once per ``credit_id``. May queue ``account.resume`` (the outbox
        relay publishes it). A ``payment`` also lifts a hold the service pinned (``hold``).
        ``now_s`` (unix s, default: the clock) decides which minute-bucket grants count for the
        account's state."""
        now = self._now(now_s)
        try:
            await self.mark_outbox_pending([account_id])
            applied, bal, st = await self._credit(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[credit_id, amount, "1" if payment else "0", now],
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"credit {credit_id} outcome unknown: {exc}") from exc
        if applied == -1:
            return CreditOutcome(False, 0, "", found=False)
        return CreditOutcome(applied == 1, int(bal), st.decode())

    async def credit_many(
        self, credits: Sequence[tuple[str, str, int]], *, now_s: int | None = None
    ) -> list[CreditOutcome]:
        """``credit`` for many ``(account_id, credit_id, amount)`` in one pipelined round trip
        (``now_s`` as in ``credit``, one for the whole batch)."""
        now = self._now(now_s)
        pipe = self._r.pipeline(transaction=False)
        for account_id, credit_id, amount in credits:
            await self._credit(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[credit_id, amount, "0", now],
                client=pipe,
            )
        try:
            replies = await _execute(pipe)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"credit batch outcome unknown: {exc}") from exc
        return [
            CreditOutcome(applied == 1, int(bal), st.decode(), found=applied != -1)
            for applied, bal, st in replies
        ]

    async def undraw_many(self, draws: Sequence[tuple[str, bytes, int, int, int]]) -> list[int]:
        """Give back seconds drawn from minute buckets, once per event: ``(account_id,
        event_key, day, drawn_s, answered_at)``, in one round trip (see ``undraw.lua``).
        Returns the seconds given back for each; minus ``drawn_s`` where no grant could take
        them back."""
        if not draws:
            return []
        pipe = self._r.pipeline(transaction=False)
        for account_id, event_key, day, drawn, answered_at in draws:
            await self._undraw(
                keys=[
                    keys.account(account_id),
                    keys.credits(account_id),
                    keys.applied(account_id, day),
                ],
                args=["undraw:" + event_key.hex(), event_key, drawn, answered_at],
                client=pipe,
            )
        try:
            return [int(n) for n in await _execute(pipe)]
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"undraw batch outcome unknown: {exc}") from exc

    async def create_account(
        self,
        account_id: str,
        *,
        balance: int,
        credit_limit: int,
        low_threshold: int,
        status: str = "active",
        seq: int = 0,
        bucket: str = "",
        recharge_threshold: int | None = None,
        recharge_trigger: int | None = None,
        hold_reason: str | None = None,
        credited: Sequence[str] = (),
    ) -> bool:
        """Create the account's state if absent (rebuild from the ledger uses this too).
        ``bucket``: its minute bucket, a ``min`` field (``rating.plans.format_bucket``);
        the auto-recharge threshold and open trigger, a pinned hold's reason; ``credited``:
        credit ids the balance already includes (see ``load_account.lua``)."""
        if status not in ACCOUNT_STATES:
            raise ValueError(f"unknown account status {status!r}")

        def opt(v: object) -> str:
            return "" if v is None else str(v)

        r = await self._load(
            keys=[keys.account(account_id), keys.credits(account_id)],
            args=[
                balance,
                credit_limit,
                low_threshold,
                status,
                seq,
                "create",
                bucket,
                opt(recharge_threshold),
                opt(recharge_trigger),
                opt(hold_reason),
                ",".join(credited),
            ],
        )
        return bool(r)

    async def get(self, account_id: str) -> AccountState | None:
        raw: list[bytes | None] = await self._r.hmget(  # type: ignore[assignment]
            keys.account(account_id), ["bal", "res", "cl", "lowth", "st", "seq"]
        )
        bal, res, cl, lowth, st, seq = raw
        if bal is None:
            return None
        return AccountState(
            int(bal),
            int(res or 0),
            int(cl or 0),
            int(lowth or 0),
            (st or b"active").decode(),
            int(seq or 0),
        )

    async def balances(self, account_ids: Sequence[str]) -> dict[str, int | None]:
        """Balances of many accounts in one pipelined round trip (``None`` if absent)."""
        pipe = self._r.pipeline(transaction=False)
        for a in account_ids:
            pipe.hget(keys.account(a), "bal")
        vals = await _execute(pipe)
        return {
            a: (int(v) if v is not None else None) for a, v in zip(account_ids, vals, strict=True)
        }
