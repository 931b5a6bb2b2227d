"""What the processor publishes: dead letters and the signals of the accounts' outboxes.

``SignalPublisher`` is the seam before the broker: what the processor needs of it, with
``KafkaSignalPublisher`` behind it (``tests/metering/test_publisher_contract.py`` holds it to the
Protocol's promises on a real broker). ``Outbox`` is the processor's side: which signals a
batch publishes, in ``seq`` order per account and at least once (a signal is dropped from its
account's outbox only after the broker acknowledged it; consumers drop a repeat by ``seq``),
and the counting of what was published.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from balance.protocol import BalanceStore
from balance.values import RECHARGE_REQUESTED, AccountOutcome
from contracts import topics
from contracts.payments import recharge_request
from contracts.signals import make_signal
from infra import metrics
from metering.batch import AccountSignal, BatchOutcome, Rejected

#: A dead letter carries the record unchanged up to this size (the producer's request limit is
#: 1 MiB, and the consumer fetches records of up to 8 MiB); past it, a bounded copy: the first
#: ``DEAD_LETTER_KEEP_BYTES`` with ``error.truncated`` (the original size) in its headers.
DEAD_LETTER_MAX_BYTES: Final = 512 * 1024
DEAD_LETTER_KEEP_BYTES: Final = 64 * 1024
#: No valid key is longer than an account id (64 characters): a longer one is cut to this.
DEAD_LETTER_MAX_KEY_BYTES: Final = 256

_CLOUDEVENT: Final = [("content-type", b"application/cloudevents+json")]


class SignalPublisher(Protocol):
    """Publishes a batch's dead letters and signals (``contracts``: ``billing.dead-letter``,
    ``billing.control-signals``, ``billing.recharge-requests``)."""

    async def publish(
        self, dead_letters: Sequence[Rejected], signals: Sequence[AccountSignal]
    ) -> None:
        """Publish every dead letter (``dead_letter``: the record, its reason and coordinates)
        and every signal (``recharge.requested`` to the recharge worker's topic, any other to
        call-control's, keyed by the account, stamped with the time of publishing), in the
        order given within each account.

        Returns once the broker acknowledged all of them: only then may a caller drop them
        from an outbox or commit the records behind them. Raises if any may not have been
        published; then some may have been, and the caller publishes them all again
        (consumers drop a signal they already have by its ``seq``)."""
        ...


class Producer(Protocol):
    """What ``KafkaSignalPublisher`` uses of aiokafka's ``AIOKafkaProducer``: ``send`` returns
    once the record is queued, with an awaitable that resolves when the broker acknowledged it."""

    async def send(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        *,
        headers: list[tuple[str, bytes]] | None = ...,
    ) -> Awaitable[Any]: ...


def dead_letter(r: Rejected) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The value, key and headers of a rejected record's dead letter: the record unchanged
    with ``error.reason``, ``error.detail`` and its coordinates (``error.topic``,
    ``error.partition``, ``error.offset``), or a bounded copy of it when it is too large to
    publish (``error.truncated``, ``error.key_truncated``: the original sizes), so that a dead
    letter can always be produced and never holds its partition up."""
    rec = r.record
    value, key = rec.value, rec.key
    headers = [
        ("error.reason", r.reason.encode()),
        ("error.detail", r.detail.encode("utf-8", "backslashreplace")[:1000]),
        ("error.topic", rec.topic.encode()),
        ("error.partition", str(rec.partition).encode()),
        ("error.offset", str(rec.offset).encode()),
    ]
    if value is not None and len(value) > DEAD_LETTER_MAX_BYTES:
        headers.append(("error.truncated", str(len(value)).encode()))
        value = value[:DEAD_LETTER_KEEP_BYTES]
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY_BYTES:
        headers.append(("error.key_truncated", str(len(key)).encode()))
        key = key[:DEAD_LETTER_MAX_KEY_BYTES]
    return value, key, headers


class KafkaSignalPublisher:
    """``SignalPublisher`` on a started Kafka producer (the caller starts and stops it). Every
    record is sent first and the acknowledgements awaited together: one round of the broker
    for a whole batch."""

    __slots__ = ("_producer",)

    def __init__(self, producer: Producer) -> None:
        self._producer = producer

    async def publish(
        self, dead_letters: Sequence[Rejected], signals: Sequence[AccountSignal]
    ) -> None:
        send = self._producer.send
        futures = []
        for r in dead_letters:
            value, key, headers = dead_letter(r)
            futures.append(await send(topics.DEAD_LETTER, value, key, headers=headers))
        at = datetime.now(UTC)
        for account_id, s in signals:
            if s.type == RECHARGE_REQUESTED:
                # Not for telephony: the trigger goes to the recharge worker on its own topic.
                req = recharge_request(account_id, s.seq, s.reason, at)
                topic, value = topics.RECHARGE_REQUESTS, req.model_dump_json().encode()
            else:
                extra: dict[str, object] = {}
                if s.call_id is not None:
                    extra["call_id"] = s.call_id
                if s.terminate_at is not None:
                    extra["terminate_at"] = datetime.fromtimestamp(s.terminate_at, UTC)
                if s.number is not None:
                    extra["number"] = s.number
                sig = make_signal(s.type, account_id, s.seq, s.reason, at, **extra)  # type: ignore[arg-type]
                topic, value = topics.CONTROL_SIGNALS, sig.model_dump_json().encode()
            futures.append(await send(topic, value, account_id.encode(), headers=_CLOUDEVENT))
        if futures:
            await asyncio.gather(*futures)


class SignalsNotPublished(Exception):
    """An earlier batch's signals were not all acknowledged, so this batch's were not sent:
    an account's signals reach the topic in ``seq`` order, and a consumer drops one below the
    highest it saw (the relay publishes both again from the outboxes)."""


class Outbox:
    """The processor's signals: which ones a batch publishes, and their acknowledgement to the
    accounts' outboxes once they are on the broker.

    A batch's signals are sent as soon as Redis has applied it (``send``), while its ledger
    write runs, and acknowledged in the outboxes only after both (``publish``): a hold reaches
    telephony a ledger write sooner, and a crash between the two leaves the signals in their
    outboxes, where the relay publishes and logs them again (at least once, as always). Each
    batch's sends start only once the previous batch's are acknowledged, so a failed send is
    never overtaken by a later signal of the same account; the relay's sends take their turn
    in the same chain.
    """

    __slots__ = ("_balances", "_published", "_publisher", "_sending")

    def __init__(self, publisher: SignalPublisher, balances: BalanceStore) -> None:
        self._publisher = publisher
        self._balances = balances
        # Highest signal seq sent per account: with batches overlapping, the outbox read by
        # batch N+1 still holds what batch N sent until N's ledger write is done. Losing this
        # map (restart, a failed send) only means a harmless re-publish, which consumers drop
        # by seq.
        self._published: dict[str, int] = {}
        self._sending: asyncio.Task[None] | None = None

    def pending(
        self, accounts: Sequence[AccountOutcome], control: Sequence[AccountSignal]
    ) -> list[AccountSignal]:
        """The signals a batch publishes: those in the outboxes its debits (``accounts``) and
        live-call updates (``control``) left, not published yet, once each, in seq order per
        account."""
        seen: set[tuple[str, int]] = set()
        pending = []
        published = self._published
        for a, s in [(o.account_id, s) for o in accounts if o.found for s in o.outbox] + list(
            control
        ):
            if s.seq > published.get(a, 0) and (a, s.seq) not in seen:
                seen.add((a, s.seq))
                pending.append((a, s))
        pending.sort(key=lambda p: (p[0], p[1].seq))  # in seq order per account
        return pending

    def forget(self) -> None:
        """A batch failed after ``send``: its signals go out again with its replay (and get
        their log rows from it), not only from the relay; and its replay's sends wait for
        nothing that failed before."""
        self._published.clear()
        self._sending = None

    def send(self, pending: list[AccountSignal]) -> asyncio.Task[None] | None:
        """Start publishing ``pending`` (after the previous ``send``'s are acknowledged);
        ``publish`` awaits it. None when there is nothing to send."""
        if not pending:
            return None
        published = self._published
        for account_id, s in pending:
            published[account_id] = max(published.get(account_id, 0), s.seq)
        task = asyncio.create_task(self._send_after(self._sending, pending))
        # Retrieved here too: a batch that failed before awaiting its sends leaves them to the
        # relay, and its task must not log "exception was never retrieved".
        task.add_done_callback(_retrieve)
        self._sending = task
        return task

    async def _send_after(
        self, before: asyncio.Task[None] | None, pending: list[AccountSignal]
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
            if before.cancelled() or before.exception() is not None:
                raise SignalsNotPublished("an earlier batch's signals were not acknowledged")
        await self._publisher.publish([], pending)

    async def publish(
        self,
        rejected: list[Rejected],
        pending: list[AccountSignal],
        out: BatchOutcome,
        sent: asyncio.Task[None] | None = None,
    ) -> None:
        """Publish the dead letters and signals (or, with ``sent``, await the signals ``send``
        started), count them in ``out`` and the metrics, and drop the signals from their
        outboxes once the broker has them. Raises if the publisher did (nothing is dropped from
        an outbox then)."""
        for r in rejected:
            out.dead_letters[r.reason] = out.dead_letters.get(r.reason, 0) + 1
            metrics.DEAD_LETTERS.labels(r.reason, r.type).inc()
        acks: dict[str, int] = {}
        published = self._published
        for account_id, s in pending:
            acks[account_id] = max(acks.get(account_id, 0), s.seq)
            if sent is None:
                published[account_id] = max(published.get(account_id, 0), s.seq)
            if s.type == RECHARGE_REQUESTED:
                metrics.RECHARGE_TRIGGERS.inc()
            else:
                metrics.SIGNALS_PUBLISHED.labels(s.type).inc()
            out.signals.append((account_id, s))
        try:
            if sent is None:
                await self._publisher.publish(rejected, pending)
            else:
                if rejected:
                    await self._publisher.publish(rejected, [])
                await sent
        except BaseException:
            # What was sent is unknown: publish it again rather than trust the map. (Without
            # ``sent`` this is a dead letter's publish: the chain of sends, the batches' and
            # the relay's, is not its, and stays.)
            if sent is None:
                published.clear()
            else:
                self.forget()
            raise
        if len(published) > 100_000:
            published.clear()
        # Only now are they on the topic: drop them from the outboxes.
        await self._balances.ack_outbox(acks)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
