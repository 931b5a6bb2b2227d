"""The balance store: typed wrappers around the Lua scripts in ``enforcement/lua``.

Errors (httpx-style tree)::

    BalanceStoreError
    └── OutcomeUnknown   the call may or may not have been applied (timeout, connection lost
                         after send). Never retry blindly: a retried debit is only safe because
                         debits are idempotent on their event key; a credit is idempotent on its
                         credit id. Resolve by re-sending the same ids, never new ones.

Scripts are loaded once (``register_script``); redis-py re-loads them on ``NOSCRIPT`` only.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from enforcement import keys

ACCOUNT_STATES: Final = ("active", "low", "hold", "suspended")


class BalanceStoreError(Exception):
    """Base class of balance-store failures."""


class OutcomeUnknown(BalanceStoreError):
    """The request may have been applied. Re-send the same idempotency keys to resolve it."""


def _lua(name: str) -> str:
    return importlib.resources.files("enforcement").joinpath("lua", name).read_text("utf-8")


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


@dataclass(frozen=True, slots=True)
class PendingSignal:
    seq: int
    type: str
    reason: str


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


class Balances(Protocol):
    """The seam before Redis. A fake implements the same calls for pure unit tests."""

    async def apply_debits(
        self, batch: Sequence[tuple[str, Sequence[DebitLike]]], now_s: int
    ) -> list[AccountOutcome]: ...

    async def ack_outbox(self, acks: dict[str, int]) -> None: ...

    async def credit(self, account_id: str, credit_id: str, amount: int) -> CreditOutcome: ...

    async def credit_many(self, credits: Sequence[tuple[str, str, int]]) -> list[CreditOutcome]: ...


def _decode_outbox(entries: list[bytes]) -> list[PendingSignal]:
    out = []
    for raw in entries:
        seq, type_, reason = raw.decode().split("|", 2)
        out.append(PendingSignal(int(seq), type_, reason))
    return out


class RedisBalances:
    """Balances in Redis. ``max_accounts_per_call`` bounds how long one script holds Redis.

    On a single Redis node one script may carry many accounts; on a cluster pass
    ``max_accounts_per_call=1`` (keys of one script must share a slot) and use a cluster client.
    """

    def __init__(self, client: aioredis.Redis, *, max_accounts_per_call: int = 256) -> None:
        self._r = client
        self._max = max_accounts_per_call
        self._debit: AsyncScript = client.register_script(_lua("debit.lua"))
        self._ack: AsyncScript = client.register_script(_lua("outbox_ack.lua"))
        self._credit: AsyncScript = client.register_script(_lua("credit.lua"))
        self._load: AsyncScript = client.register_script(_lua("load_account.lua"))

    async def apply_debits(
        self, batch: Sequence[tuple[str, Sequence[DebitLike]]], now_s: int
    ) -> list[AccountOutcome]:
        """Apply every debit of the batch in one pipelined round trip.

        Idempotent per event key; safe to call again with the same batch after
        ``OutcomeUnknown``. Returns one outcome per account, in the order given.
        """
        pipe = self._r.pipeline(transaction=False)
        for start in range(0, len(batch), self._max):
            chunk = batch[start : start + self._max]
            # Packed into five arguments, whatever the number of events: encoding thousands
            # of small arguments is what a pipeline spends its client time on.
            blob = b"".join(d.event_key + d.fingerprint for _, ds in chunk for d in ds)
            amounts = " ".join(f"{d.amount} {d.day}" for _, ds in chunk for d in ds)
            counts = " ".join(str(len(ds)) for _, ds in chunk)
            await self._debit(
                keys=[keys.account(a) for a, _ in chunk],
                args=[now_s, keys.DEDUP_KEEP_S, blob, amounts, counts],
                client=pipe,
            )
        try:
            replies = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"debit batch outcome unknown: {exc}") from exc
        outcomes: list[AccountOutcome] = []
        i = 0
        for reply in replies:
            for line in reply.split(b"\n"):
                found, bal, st, codes, dups, out = line.split(b"\t")
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
                    )
                )
        return outcomes

    async def ack_outbox(self, acks: dict[str, int]) -> None:
        """Remove published signals (``seq <= acked``) from each account's outbox."""
        if not acks:
            return
        pipe = self._r.pipeline(transaction=False)
        for account_id, seq in acks.items():
            await self._ack(
                keys=[keys.outbox(account_id), keys.account(account_id)], args=[seq], client=pipe
            )
        await pipe.execute()

    async def pending_outbox(self, account_id: str) -> list[PendingSignal]:
        entries: list[bytes] = await self._r.lrange(keys.outbox(account_id), 0, -1)  # type: ignore[assignment]
        return _decode_outbox(entries)

    async def credit(self, account_id: str, credit_id: str, amount: int) -> CreditOutcome:
        """Credit ``amount`` once per ``credit_id``. May queue ``account.resume``."""
        try:
            applied, bal, st = await self._credit(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[credit_id, amount],
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"credit {credit_id} outcome unknown: {exc}") from exc
        if applied == -1:
            return CreditOutcome(False, 0, "", found=False)
        return CreditOutcome(applied == 1, int(bal), st.decode())

    async def credit_many(self, credits: Sequence[tuple[str, str, int]]) -> list[CreditOutcome]:
        """``credit`` for many ``(account_id, credit_id, amount)`` in one pipelined round trip."""
        pipe = self._r.pipeline(transaction=False)
        for account_id, credit_id, amount in credits:
            await self._credit(
                keys=[keys.account(account_id), keys.credits(account_id), keys.outbox(account_id)],
                args=[credit_id, amount],
                client=pipe,
            )
        try:
            replies = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise OutcomeUnknown(f"credit batch outcome unknown: {exc}") from exc
        return [
            CreditOutcome(applied == 1, int(bal), st.decode(), found=applied != -1)
            for applied, bal, st in replies
        ]

    async def create_account(
        self,
        account_id: str,
        *,
        balance: int,
        credit_limit: int,
        low_threshold: int,
        status: str = "active",
        seq: int = 0,
    ) -> bool:
        """Create the account's state if absent (rebuild from the ledger uses this too)."""
        if status not in ACCOUNT_STATES:
            raise ValueError(f"unknown account status {status!r}")
        r = await self._load(
            keys=[keys.account(account_id)],
            args=[balance, credit_limit, low_threshold, status, seq, "create"],
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
        vals = await pipe.execute()
        return {
            a: (int(v) if v is not None else None) for a, v in zip(account_ids, vals, strict=True)
        }
