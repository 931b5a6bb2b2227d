"""Accounts' outboxes in the balance store: signals the scripts queued, until published.

The scripts append to an account's outbox (``keys.outbox``) in the same step that changes its
state; the outbox relay (``metering.processor``) publishes them and acks them here. Accounts
that may hold unpublished entries are marked in ``keys.OUTBOX_PENDING``; a writer marks an
account before *and* after its script, so no entry is left without a mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from balance import keys, replies
from balance.errors import mapped
from balance.pipeline import round_trip
from balance.values import PendingSignal
from infra.redisclient import RedisClient


class OutboxStore:
    """The outbox part of ``balance.store.RedisBalances``. Errors: ``balance.errors``."""

    _r: RedisClient
    _ack: AsyncScript

    async def mark_outbox_pending(self, account_ids: Sequence[str]) -> None:
        if account_ids:
            with mapped("outbox mark"):
                await self._r.sadd(keys.OUTBOX_PENDING, *account_ids)

    async def pending_outboxes(self, limit: int = 1000) -> dict[str, list[PendingSignal]]:
        """Accounts marked as maybe having unpublished signals, with their outboxes."""
        with mapped("pending outboxes"):
            members = cast(list[bytes], await self._r.srandmember(keys.OUTBOX_PENDING, limit))
        ids = [a.decode() for a in members]
        if not ids:
            return {}

        async def build(pipe: Pipeline) -> None:
            for a in ids:
                pipe.lrange(keys.outbox(a), 0, -1)

        boxes = await round_trip(self._r, "pending outboxes", build)
        return {a: replies.decode_outbox(b) for a, b in zip(ids, boxes, strict=True)}

    async def clear_outbox_pending(self, account_ids: Sequence[str]) -> None:
        """Unmark accounts whose outbox is now empty.

        Unmark first, then look: a writer marks an account before *and* after its script, so
        a signal queued meanwhile always leaves a mark behind (and the next script touching
        the account returns it anyway).
        """
        with mapped("outbox unmark"):
            for a in account_ids:
                await self._r.srem(keys.OUTBOX_PENDING, a)
                if await self._r.llen(keys.outbox(a)):
                    await self._r.sadd(keys.OUTBOX_PENDING, a)

    async def ack_outbox(self, acks: dict[str, int]) -> None:
        """Remove published signals (``seq <= acked``) from each account's outbox."""
        if not acks:
            return

        async def build(pipe: Pipeline) -> None:
            for account_id, seq in acks.items():
                await self._ack(
                    keys=[keys.outbox(account_id), keys.account(account_id)],
                    args=[seq],
                    client=pipe,
                )

        await round_trip(self._r, "outbox ack", build)

    async def pending_outbox(self, account_id: str) -> list[PendingSignal]:
        with mapped("outbox"):
            entries: list[bytes] = await self._r.lrange(keys.outbox(account_id), 0, -1)  # type: ignore[assignment]
        return replies.decode_outbox(entries)
