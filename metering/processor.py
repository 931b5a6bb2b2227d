"""The usage stream processor: the metering hot path, one batch at a time.

Per batch, never per event::

    getmany -> validate (bad ones to the dead-letter topic)      metering.validate
      -> rate                                                    metering.rate, .numbers
      -> live-call updates on reservations                       metering.calls
      -> one pipelined Redis round trip applying every debit idempotently (debit.lua)
      -> send the signals the batch caused                       metering.publish
      -> one ledger statement, idempotent on the event key       metering.apply
      -> produce dead letters, await them and the signals' acknowledgements,
         then drop the signals from their outboxes               metering.publish
      -> commit offsets                                          metering.worker

Nothing is committed before it is in the ledger. A duplicate that Redis already applied still
gets its ledger row if it is missing (Redis's memory of an event is never proof that the ledger
has it), written with the amount Redis applied the first time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from balance.protocol import BalanceStore
from infra import metrics
from infra.ledger import Ledger, SignalRow
from infra.settings import CallControl
from metering.apply import (
    Rebuild,
    apply_debits,
    compensate,
    count_charges,
    skip_known_old,
    write_ledger,
)
from metering.batch import AccountSignal, Applied, BatchOutcome, Record, Rejected
from metering.calls import restore_late_markers, sweep_reservations, update_live_calls
from metering.numbers import rate_numbers
from metering.publish import Outbox, SignalPublisher
from metering.rate import rate
from metering.validate import CONTROL, SIDE, Chargeable, Validator
from rating.catalog import Catalog

#: The processor and the types of its signatures, for its callers.
__all__ = ["Applied", "BatchOutcome", "MeteringProcessor", "Record", "Rejected"]


class MeteringProcessor:
    """Processes one batch of records; the caller commits offsets after ``process`` returns.

    ``process`` raises if any step failed; the caller must then not commit and should re-read
    from the last committed offsets (every step is idempotent, so a replay charges nothing
    twice).
    """

    def __init__(
        self,
        *,
        balances: BalanceStore,
        ledger: Ledger,
        catalog: Catalog,
        publisher: SignalPublisher,
        rebuild: Rebuild,
        max_message_bytes: int = 65_536,
        max_call_s: int = 86_400,
        max_clock_skew_s: int = 300,
        clock: Callable[[], float] = time.time,
        call_control: CallControl | None = None,
    ) -> None:
        self._balances = balances
        self._ledger = ledger
        self._catalog = catalog
        self._rebuild = rebuild
        self._max_bytes = max_message_bytes
        self._max_call_s = max_call_s
        self._skew_s = max_clock_skew_s
        self._validator = Validator(
            max_message_bytes=max_message_bytes,
            max_call_s=max_call_s,
            max_clock_skew_s=max_clock_skew_s,
        )
        self._clock = clock
        self._outbox = Outbox(publisher, balances)
        self._call_control = call_control or CallControl()

    async def process(self, records: Sequence[Record]) -> BatchOutcome:
        """The whole batch: ``finish(await apply(records))``."""
        return await self.finish(await self.apply(records))

    async def apply(self, records: Sequence[Record]) -> Applied:
        """First half: validate, rate, and apply the debits in Redis (idempotent).

        The worker overlaps this with the previous batch's ``finish``: Redis may run ahead of
        the ledger by one batch, which a replay after a crash repairs (see module docstring).
        """
        out = BatchOutcome(records=len(records))
        now = self._clock()
        t0 = time.perf_counter()
        rejected: list[Rejected] = []
        parsed: list[tuple[Record, Chargeable]] = []
        check = self._validator.check
        for rec in records:
            r = check(rec, now)
            if type(r) is Rejected:
                rejected.append(r)
            else:
                parsed.append((rec, r))  # type: ignore[arg-type]
        await self._catalog.resolve({ev.subject for _, ev in parsed})
        get = self._catalog.get
        latest = now + self._skew_s
        control: list[tuple[Record, Any]] = []
        numbers: list[tuple[Record, Any]] = []
        side = [(r, ev) for r, ev in parsed if ev.type in SIDE]
        if side:
            parsed = [(r, ev) for r, ev in parsed if ev.type not in SIDE]
            for item in side:
                (control if item[1].type in CONTROL else numbers).append(item)
        charges = rate(parsed, get=get, latest=latest, rejected=rejected)
        if numbers:
            charges += rate_numbers(numbers, get=get, latest=latest, rejected=rejected, out=out)
        t1 = time.perf_counter()
        metrics.STAGE_SECONDS.labels("decode_rate").observe(t1 - t0)

        # Live-call updates first: a hangup later in the same batch then closes what they opened.
        control_outbox: list[AccountSignal] = []
        if control:
            control_outbox = await update_live_calls(
                self._balances,
                control,
                get=get,
                call_control=self._call_control,
                now=now,
                rejected=rejected,
            )
        out.call_updates = len(control)
        await skip_known_old(self._ledger, charges, now)
        await restore_late_markers(self._balances, self._ledger, charges, now)
        outcomes = await apply_debits(
            self._balances,
            charges,
            get=get,
            rebuild=self._rebuild,
            now_s=int(now),
            rejected=rejected,
        )
        metrics.STAGE_SECONDS.labels("redis").observe(time.perf_counter() - t1)
        # The signals go out now, while the ledger is written; their outboxes keep them until
        # both are done (metering.publish.Outbox).
        signals = self._outbox.pending(outcomes, control_outbox)
        return Applied(
            outcome=out,
            rejected=rejected,
            charges=charges,
            signals=signals,
            sent=self._outbox.send(signals),
        )

    async def finish(self, applied: Applied) -> BatchOutcome:
        """Second half: the ledger write, then dead letters and signals, awaited together.

        When it returns, the batch's offsets may be committed.
        """
        try:
            t2 = time.perf_counter()
            out, rejected, charges = applied.outcome, applied.rejected, applied.charges
            pending = applied.signals
            signal_rows = [SignalRow(a, s.seq, s.type, s.reason) for a, s in pending]
            already = await write_ledger(self._ledger, charges, rejected, signal_rows)
            t3 = time.perf_counter()
            metrics.STAGE_SECONDS.labels("ledger").observe(t3 - t2)

            if already:
                await compensate(self._balances, charges, already, out)
            count_charges(charges, out)
            await self._outbox.publish(rejected, pending, out, applied.sent)
            metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - t3)
            return out
        except BaseException:
            self._outbox.forget()
            raise

    async def dead_letter_unprocessable(self, rec: Record, exc: BaseException) -> BatchOutcome:
        """Dead-letter a record that fails on its own for a reason retrying cannot cure
        (``metering.isolate``), reason ``unprocessable`` with the error as its detail."""
        out = BatchOutcome(records=1)
        detail = f"{type(exc).__name__}: {exc}"
        await self._outbox.publish(
            [Rejected(record=rec, reason="unprocessable", detail=detail)], [], out
        )
        return out

    # -- timers ------------------------------------------------------------------------------

    async def relay_outboxes(self) -> int:
        """Publish signals queued outside a batch (operator suspend/resume, live-call updates
        whose batch died before publishing). Returns how many were published."""
        boxes = await self._balances.pending_outboxes()
        if not boxes:
            return 0
        pending = sorted(
            ((a, s) for a, ss in boxes.items() for s in ss), key=lambda p: (p[0], p[1].seq)
        )
        if pending:
            await self._ledger.write_usage(
                [], [], [SignalRow(a, s.seq, s.type, s.reason) for a, s in pending]
            )
            # In the batches' chain of sends: an operator's signal (seq N+1) must not reach the
            # topic ahead of a batch's seq N still being sent, which consumers would then drop.
            await self._outbox.publish([], pending, BatchOutcome(), self._outbox.send(pending))
        await self._balances.clear_outbox_pending(list(boxes))
        return len(pending)

    async def sweep_reservations(self) -> int:
        """Close reservations whose call was never closed (``metering.calls``). Returns how
        many were closed."""
        return await sweep_reservations(self._balances, self._ledger, int(self._clock()))
