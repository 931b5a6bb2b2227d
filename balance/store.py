"""The balance store in Redis: typed wrappers around the Lua scripts in ``balance/lua``.

What goes in and comes out is in ``balance.values``; the errors every method raises (and the
one place Redis errors become them) in ``balance.errors``; the reply decoders in
``balance.replies``; the seam consumers take, ``BalanceStore``, in ``balance.protocol``.

Scripts are loaded once (``register_script``); they are re-sent only on ``NOSCRIPT``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Final, cast

import orjson
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from balance import keys, replies, scripts, slots
from balance.errors import call, mapped
from balance.outbox import OutboxStore
from balance.pipeline import ReplicaWait, round_trip
from balance.reservations import ReservationStore
from balance.values import (
    ACCOUNT_STATES,
    AccountOutcome,
    AccountState,
    AccountStatus,
    Credit,
    CreditOutcome,
    DebitLike,
    Draw,
    GrantOutcome,
    NewAccount,
    NumberAction,
    NumberOutcome,
    PlanPeriod,
    RechargeState,
    StatusAction,
    StatusChange,
    Undraw,
)
from infra.clock import Clock, system_clock
from infra.redisclient import RedisClient


def _lua(name: str) -> str:
    return scripts.source(name)


#: debit.lua's binary argument records (big-endian, as its EVENT and ACCOUNT formats):
#: event_key, fingerprint, amount, day, billed_s (-1: no draw), rate_per_min, connect_fee,
#: answered_at, len(call_id) -- the call id's bytes follow; and per account: its number of
#: events, included_s (0: no plan), period_start, period_end, previous_start (0: none).
_DEBIT_EVENT: Final = struct.Struct(">16s8sqiiqqqH")
_DEBIT_ACCOUNT: Final = struct.Struct(">Iqqqq")
_NO_DRAW: Final = Draw(-1, 0, 0, 0)


def _new_account_record(a: NewAccount) -> list[list[str]]:
    """``load_accounts.lua``'s record of one account: the fields ``load_account.lua`` sets at
    "create" (the optional ones only when present), and the credit ids already applied."""
    fields = [
        "bal", str(a.balance), "res", "0", "cl", str(a.credit_limit),
        "lowth", str(a.low_threshold), "st", a.status, "seq", str(a.seq),
    ]  # fmt: skip
    for name, value in (
        ("min", a.bucket),
        ("rth", a.recharge_threshold),
        ("rq", a.recharge_trigger),
        ("hr", a.hold_reason),
    ):
        if value is not None and value != "":
            fields += [name, str(value)]
    if a.max_calls < 0:
        raise ValueError("max_calls is a number of calls >= 0")
    if a.max_calls > 0:  # as load_account.lua: no field, no limit
        fields += ["mc", str(a.max_calls)]
    return [fields, list(a.credited)]


class RedisBalances(ReservationStore, OutboxStore):
    """Balances in Redis. ``max_accounts_per_call`` bounds how long one script holds Redis.

    One debit script call carries up to ``max_accounts_per_call`` accounts: on a single node any
    of the batch's, on a Redis Cluster (a ``RedisCluster`` client, ``infra.redisclient``) those of
    one hash slot (``balance.slots``).
    ``clock``: the time of the calls that take no ``now_s`` (see ``infra.clock``); the scripts
    never read Redis's own clock.
    ``wait_replicas`` (0: off): ``apply_debits``, ``credit`` and ``credit_many`` return only
    once that many replicas of every node they wrote to acknowledged it, waiting
    ``wait_timeout_ms`` at most, else raise ``NotReplicated`` (``balance.pipeline``). No other
    method waits.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        max_accounts_per_call: int = 256,
        clock: Clock = system_clock,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self._r = client
        self._max = max_accounts_per_call
        self._wait = ReplicaWait.for_client(client, wait_replicas, wait_timeout_ms)
        self._by_slot = isinstance(client, RedisCluster)
        self._clock = clock
        self._debit: AsyncScript = client.register_script(_lua("debit.lua"))
        self._ack: AsyncScript = client.register_script(_lua("outbox_ack.lua"))
        self._credit: AsyncScript = client.register_script(_lua("credit.lua"))
        self._load: AsyncScript = client.register_script(_lua("load_account.lua"))
        self._load_many: AsyncScript = client.register_script(_lua("load_accounts.lua"))
        self._reserve: AsyncScript = client.register_script(_lua("reserve.lua"))
        self._progress: AsyncScript = client.register_script(_lua("progress.lua"))
        self._release: AsyncScript = client.register_script(_lua("release.lua"))
        self._status: AsyncScript = client.register_script(_lua("set_status.lua"))
        self._grant: AsyncScript = client.register_script(_lua("grant.lua"))
        self._undraw: AsyncScript = client.register_script(_lua("undraw.lua"))
        self._recharge: AsyncScript = client.register_script(_lua("recharge_settings.lua"))
        self._limits: AsyncScript = client.register_script(_lua("set_limits.lua"))
        self._number: AsyncScript = client.register_script(_lua("number.lua"))
        self._plan: AsyncScript = client.register_script(_lua("plan.lua"))
        self._call_limit: AsyncScript = client.register_script(_lua("set_call_limit.lua"))

    def _now(self, now_s: int | None) -> int:
        """``now_s``, or the injected clock's whole seconds."""
        return int(self._clock()) if now_s is None else now_s

    async def apply_debits(
        self,
        batch: Mapping[str, Sequence[DebitLike]],
        now_s: int,
        plans: Mapping[str, PlanPeriod] | None = None,
    ) -> list[AccountOutcome]:
        """Apply every debit of the batch (account id -> its debits, applied in that order) in
        one pipelined round trip.

        Idempotent per event key; safe to call again with the same batch after
        ``OutcomeUnknown`` (``NotReplicated`` included: with ``wait_replicas``, the round trip
        ends with a ``WAIT`` on each node it wrote to). Returns one outcome per account, in the
        batch's order. Debits with a ``draw`` first take their billed seconds from the
        account's minute bucket (its ``plans`` allowance for the period included); see
        ``AccountOutcome.draws``.
        """
        plans = plans or {}
        event = _DEBIT_EVENT.pack
        account = _DEBIT_ACCOUNT.pack
        accounts = list(batch)
        chunks = slots.calls(accounts, self._max, by_slot=self._by_slot)
        calls: list[tuple[list[str], list[int | bytes]]] = []
        for chunk in chunks:
            # Two binary arguments, whatever the number of events (encoding thousands of small
            # arguments is what a pipeline spends its client time on), every value in a
            # fixed-width field or behind its length (see debit.lua): struct.error on a value
            # out of its field's range, before anything is sent.
            parts: list[bytes] = []
            heads: list[bytes] = []
            for a in chunk:
                ds = batch[a]
                p = plans.get(a)
                heads.append(
                    account(len(ds), p.included_s, p.period_start, p.period_end, p.previous_start)
                    if p
                    else account(len(ds), 0, 0, 0, 0)
                )
                for d in ds:
                    billed, rate, fee, at = d.draw or _NO_DRAW
                    call_id = d.call_id.encode() if d.call_id else b""
                    parts.append(
                        event(
                            d.event_key, d.fingerprint, d.amount, d.day,
                            billed, rate, fee, at, len(call_id),
                        )
                    )
                    if call_id:
                        parts.append(call_id)
            calls.append(
                (
                    [keys.account(a) for a in chunk],
                    [now_s, keys.DEDUP_KEEP_S, b"".join(parts), b"".join(heads)],
                )
            )

        async def build(pipe: Pipeline) -> None:
            for ks, args in calls:
                await self._debit(keys=ks, args=args, client=pipe)

        # A mark in each call's slot: the WAIT of every node the calls go to (balance.pipeline).
        marks = [keys.wait_mark(chunk[0]) for chunk in chunks] if self._wait else []
        raw = await round_trip(self._r, "debit batch", build, wait=self._wait, marks=marks)
        if not self._by_slot:
            return replies.decode_debits(accounts, raw)
        sent = [a for chunk in chunks for a in chunk]  # grouped by slot: back to the batch's order
        by_id = {o.account_id: o for o in replies.decode_debits(sent, raw)}
        return [by_id[a] for a in accounts]

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
        result, bal, st = await call(
            f"grant {grant_id}",
            lambda: self._grant(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[grant_id, price, seconds, valid_from, expires_at, now_s],
            ),
        )
        await self.mark_outbox_pending([account_id])
        return GrantOutcome(
            replies.GRANT_RESULTS[int(result)], int(bal), replies.status_or_none(st)
        )

    async def number_step(
        self,
        account_id: str,
        action: NumberAction,
        number: str,
        token: str,
        *,
        fee: int = 0,
        reason: str = "-",
        now_s: int | None = None,
    ) -> NumberOutcome:
        """A number's renewal (take ``fee`` micro-units, refused whole when the available
        credit does not cover it; ``reason`` "resume" queues ``number.resume``), hold or
        release (queue ``number.hold`` / ``number.release`` with ``reason``), once per
        ``token`` ("<lease>:<period>" or "<lease>"): see ``number.lua``. A renewal may queue
        the account's own signals and its auto-recharge trigger, as any debit."""
        now = self._now(now_s)
        await self.mark_outbox_pending([account_id])
        result, bal, st, recharging = await call(
            f"number {action}",
            lambda: self._number(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[action, number, token, fee, now, reason],
            ),
        )
        await self.mark_outbox_pending([account_id])
        return NumberOutcome(
            replies.GRANT_RESULTS[int(result)],
            int(bal),
            replies.status_or_none(st),
            int(recharging) == 1,
        )

    async def plan_step(
        self,
        account_id: str,
        token: str,
        *,
        fee: int,
        included_s: int,
        period: tuple[int, int],
        add_s: int = 0,
        cover: bool = False,
        now_s: int | None = None,
    ) -> GrantOutcome:
        """A subscription's step (``plan.lua``), once per ``token``: take ``fee`` micro-units
        (refused whole when ``cover`` and the available credit does not cover it), make sure
        the minute bucket holds the allowance of ``period`` (``(start, end)`` unix s:
        ``included_s`` if it has none, ``add_s`` more if it has), and move the account where
        its credit and minutes put it (a held account with a fresh allowance resumes)."""
        now = self._now(now_s)
        await self.mark_outbox_pending([account_id])
        result, bal, st = await call(
            f"plan {token}",
            lambda: self._plan(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[
                    token,
                    fee,
                    now,
                    included_s,
                    period[0],
                    period[1],
                    add_s,
                    "1" if cover else "0",
                ],
            ),
        )
        await self.mark_outbox_pending([account_id])
        return GrantOutcome(
            replies.GRANT_RESULTS[int(result)], int(bal), replies.status_or_none(st)
        )

    async def bucket(self, account_id: str) -> bytes | None:
        """The raw minute bucket of an account (``rating.plans.parse_bucket`` reads it)."""
        with mapped("bucket"):
            raw = await self._r.hget(keys.account(account_id), "min")
        return cast(bytes | None, raw)

    async def set_status(
        self,
        account_id: str,
        action: StatusAction,
        reason: str,
        *,
        now_s: int | None = None,
        lift_hold: bool = False,
    ) -> StatusChange | None:
        """``action`` "suspend", "hold" (pinned whatever the credit, see set_status.lua) or
        "resume": lifts the suspension, and the pinned hold only with ``lift_hold`` (an
        operator's resume: what may lift what is ``enforcement.account_admin``'s). Returns what
        changed (``changed``: a signal was queued or a pin set or lifted; False: the account
        already was so), None for an unknown account. ``reason``: a short code
        (``[a-z0-9_]{1,64}``). ``now_s`` (unix s, default: the clock) decides which
        minute-bucket grants count for a resumed account."""
        if action not in ("suspend", "hold", "resume"):
            raise ValueError(f"unknown action {action!r}")
        if lift_hold and action != "resume":
            raise ValueError("only a resume lifts a pinned hold")
        now = self._now(now_s)
        await self.mark_outbox_pending([account_id])
        changed, status = await call(
            f"set status {action}",
            lambda: self._status(
                keys=[keys.account(account_id), keys.outbox(account_id)],
                args=[action, reason, now, "1" if lift_hold else "0"],
            ),
        )
        await self.mark_outbox_pending([account_id])
        if int(changed) < 0:
            return None
        return StatusChange(int(changed) == 1, replies.status(status))

    async def set_limits(
        self, account_id: str, *, credit_limit: int, low_threshold: int, now_s: int | None = None
    ) -> AccountStatus | None:
        """Set the credit limit and low-balance threshold (micro-units, >= 0), moving the
        account where its credit now puts it (``set_limits.lua``: a signal may be queued).
        Returns its status, None for an unknown account."""
        if credit_limit < 0 or low_threshold < 0:
            raise ValueError("limits are micro-units >= 0")
        now = self._now(now_s)
        await self.mark_outbox_pending([account_id])
        found, status = await call(
            "set limits",
            lambda: self._limits(
                keys=[keys.account(account_id), keys.outbox(account_id)],
                args=[credit_limit, low_threshold, now],
            ),
        )
        if int(found) < 0:
            return None
        return replies.status(status)

    async def set_auto_recharge(self, account_id: str, threshold: int | None) -> int | None:
        """Turn auto-recharge on at ``threshold`` micro-units (None: off) in the account's
        real-time state. Returns the seq of the trigger this fired (the account was already at
        or below the threshold), 0 when none, None for an unknown account."""
        await self.mark_outbox_pending([account_id])
        args: list[str | int] = ["off"] if threshold is None else ["on", threshold]
        found, seq = await call(
            "auto-recharge settings",
            lambda: self._recharge(
                keys=[keys.account(account_id), keys.outbox(account_id)], args=args
            ),
        )
        return int(seq) if found else None

    async def close_recharge_trigger(self, account_id: str, seq: int) -> bool:
        """The recharge worker is done with trigger ``seq``: the next crossing fires anew.
        False when another trigger is open (or none)."""
        _, closed = await call(
            f"close recharge trigger {seq}",
            lambda: self._recharge(
                keys=[keys.account(account_id), keys.outbox(account_id)], args=["close", seq]
            ),
        )
        return bool(closed)

    async def recharge_state(self, account_id: str) -> RechargeState:
        """The auto-recharge part of the account's real-time state (all None when absent)."""
        with mapped("recharge state"):
            raw: list[bytes | None] = await self._r.hmget(  # type: ignore[assignment]
                keys.account(account_id), ["rth", "rq", "hr"]
            )
        rth, rq, hr = raw
        return RechargeState(
            int(rth) if rth is not None else None,
            int(rq) if rq is not None else None,
            hr.decode() if hr is not None else None,
        )

    async def credit(
        self,
        account_id: str,
        credit_id: str,
        amount: int,
        *,
        payment: bool = False,
        refund: bool = False,
        now_s: int | None = None,
    ) -> CreditOutcome:
        """Credit ``amount`` once per ``credit_id``. May queue ``account.resume`` (the outbox
        relay publishes it). A ``payment`` also lifts a hold the service pinned (``hold``); a
        ``refund`` (money given back) never fires auto-recharge: the crossing it causes counts
        as handled until the credit is above the threshold again (``credit.lua``). ``now_s``
        (unix s, default: the clock) decides which minute-bucket grants count for the
        account's state."""
        if payment and refund:
            raise ValueError("a credit is a payment or a refund, not both")
        now = self._now(now_s)
        ks = [keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)]
        args: list[str | int] = [credit_id, amount, "1" if payment else "r" if refund else "0", now]
        await self.mark_outbox_pending([account_id])
        if self._wait is None:
            applied, bal, st = await call(
                f"credit {credit_id}", lambda: self._credit(keys=ks, args=args)
            )
        else:
            # Money in must not vanish with a failover either: NotReplicated leaves the
            # payment (or refund) not marked credited, and its recovery credits it again,
            # once per credit id (balance.pipeline).
            async def build(pipe: Pipeline) -> None:
                await self._credit(keys=ks, args=args, client=pipe)

            [(applied, bal, st)] = await round_trip(
                self._r,
                f"credit {credit_id}",
                build,
                wait=self._wait,
                marks=[keys.wait_mark(account_id)],
            )
        if applied == -1:
            return CreditOutcome(False, 0, "", found=False)
        return CreditOutcome(applied == 1, int(bal), replies.status(st))

    async def credit_many(
        self, credits: Sequence[Credit], *, now_s: int | None = None
    ) -> list[CreditOutcome]:
        """``credit`` (not a ``payment``) for many credits in one pipelined round trip, one
        outcome each in their order (``now_s`` as in ``credit``, one for the whole batch)."""
        now = self._now(now_s)

        async def build(pipe: Pipeline) -> None:
            for c in credits:
                await self._credit(
                    keys=[
                        keys.account(c.account_id),
                        keys.credits(c.account_id),
                        keys.outbox(c.account_id),
                    ],
                    args=[c.credit_id, c.amount, "0", now],
                    client=pipe,
                )

        marks = [keys.wait_mark(c.account_id) for c in credits] if self._wait else []
        raw = await round_trip(self._r, "credit batch", build, wait=self._wait, marks=marks)
        return [
            CreditOutcome(applied == 1, int(bal), replies.status_or_none(st), found=applied != -1)
            for applied, bal, st in raw
        ]

    async def undraw_many(self, draws: Sequence[Undraw]) -> list[int]:
        """Give back seconds drawn from minute buckets, once per event, in one round trip (see
        ``undraw.lua``). Returns the seconds given back for each; minus ``drawn_s`` where no
        grant could take them back."""
        if not draws:
            return []

        async def build(pipe: Pipeline) -> None:
            for u in draws:
                await self._undraw(
                    keys=[
                        keys.account(u.account_id),
                        keys.credits(u.account_id),
                        keys.applied(u.account_id, u.day),
                    ],
                    args=["undraw:" + u.event_key.hex(), u.event_key, u.drawn_s, u.answered_at],
                    client=pipe,
                )

        return [int(n) for n in await round_trip(self._r, "undraw batch", build)]

    async def create_account(
        self,
        account_id: str,
        *,
        balance: int,
        credit_limit: int,
        low_threshold: int,
        status: AccountStatus = "active",
        seq: int = 0,
        bucket: str = "",
        recharge_threshold: int | None = None,
        recharge_trigger: int | None = None,
        hold_reason: str | None = None,
        credited: Sequence[str] = (),
        max_calls: int = 0,
    ) -> bool:
        """Create the account's state if absent (rebuild from the ledger uses this too).
        ``bucket``: its minute bucket, a ``min`` field (``rating.plans.format_bucket``);
        the auto-recharge threshold and open trigger, a pinned hold's reason; ``credited``:
        credit ids the balance already includes (see ``load_account.lua``); ``max_calls``: its
        plan's concurrent-call limit (0: none)."""
        if status not in ACCOUNT_STATES:
            raise ValueError(f"unknown account status {status!r}")
        if max_calls < 0:
            raise ValueError("max_calls is a number of calls >= 0")

        def opt(v: object) -> str:
            return "" if v is None else str(v)

        args = [
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
            max_calls,
        ]
        r = await call(
            f"create account {account_id}",
            lambda: self._load(
                keys=[keys.account(account_id), keys.credits(account_id)], args=args
            ),
        )
        return bool(r)

    async def create_accounts(self, accounts: Sequence[NewAccount]) -> list[bool]:
        """``create_account`` for many accounts in one pipelined round trip (a rebuild of
        thousands at a time, ``load_accounts.lua``: many accounts per script call, of one slot
        on a cluster); one answer each, in their order: True if written, False if the
        account's state was there already (left as it was). Writes the same fields as
        ``create_account`` (``load_account.lua``)."""
        if not accounts:
            return []
        by_id = {a.account_id: a for a in accounts}
        if len(by_id) != len(accounts):
            raise ValueError("create_accounts: an account is listed twice")
        for a in accounts:
            if a.status not in ACCOUNT_STATES:
                raise ValueError(f"unknown account status {a.status!r}")
        chunks = slots.calls(list(by_id), self._max, by_slot=self._by_slot)

        async def build(pipe: Pipeline) -> None:
            for chunk in chunks:
                records = [_new_account_record(by_id[a]) for a in chunk]
                await self._load_many(
                    keys=[keys.account(a) for a in chunk],
                    args=[orjson.dumps(records)],
                    client=pipe,
                )

        replies_ = await round_trip(self._r, "create accounts", build)
        written = {
            a: bool(w)
            for chunk, got in zip(chunks, replies_, strict=True)
            for a, w in zip(chunk, got, strict=True)
        }
        return [written[a.account_id] for a in accounts]

    async def get(self, account_id: str) -> AccountState | None:
        with mapped("account state"):
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
            replies.status(st or b"active"),
            int(seq or 0),
        )

    async def balances(self, account_ids: Sequence[str]) -> dict[str, int | None]:
        """Balances of many accounts in one pipelined round trip (``None`` if absent)."""

        async def build(pipe: Pipeline) -> None:
            for a in account_ids:
                pipe.hget(keys.account(a), "bal")

        vals = await round_trip(self._r, "balances", build)
        return {
            a: (int(v) if v is not None else None) for a, v in zip(account_ids, vals, strict=True)
        }

    async def set_call_limit(
        self, account_id: str, max_calls: int, *, now_s: int | None = None
    ) -> int | None:
        """Set the account's concurrent-call limit: at most ``max_calls`` live calls at once,
        inbound and outbound (0: no limit), from the next authorization on; calls already up
        are never cut (``set_call_limit.lua``). Idempotent. Returns the live calls the account
        has now (they may be more than the new limit), None for an unknown account.
        ``now_s`` is taken as every setter takes it; the limit does not depend on time."""
        if max_calls < 0:
            raise ValueError("max_calls is a number of calls >= 0")
        live = await call(
            f"set call limit {account_id}",
            lambda: self._call_limit(
                keys=[keys.account(account_id), keys.reservations(account_id)], args=[max_calls]
            ),
        )
        return None if int(live) < 0 else int(live)
