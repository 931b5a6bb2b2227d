"""What each control signal means on the switch, per account in ``seq`` order
(docs/integration.md, "What you receive"):

- ``call.terminate``: end ``call_id`` at ``terminate_at`` (at once when that has passed);
- ``account.suspend``: end every live dialog of the account (created up to the signal's time:
  a suspend replayed after the resume that followed it never ends the calls made since);
- ``account.hold``, ``account.resume``, ``account.low_balance``: nothing to do on the switch.
  Hold bars new outbound calls, and ``POST /v1/authorizations`` already denies them; live calls
  run on until their own ``call.terminate``;
- a type not known here: ignored (the contract may add types).

A signal at or below the highest ``seq`` seen for its account is stale (a redelivery, or an
old state after a newer one) and dropped. What survives a restart is only the consumer's
offsets, committed past a signal once it is enforced: a redelivered signal is enforced again,
which is harmless (ending a dialog that has ended finds nothing).

The switch unreachable: the signal is retried, with backoff, until it is enforced or the
bridge stops; ``meter_bridge_lag_seconds`` shows how late the oldest one is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from bridge.switch import SwitchControl, SwitchUnavailable
from contracts.events import ACCOUNT_ID_PATTERN
from infra import metrics
from infra.clock import Clock, system_clock

log = logging.getLogger(__name__)

#: Retry waits after a failed call to the switch: doubling from the first to the last.
RETRY_FIRST_S: Final = 0.2
RETRY_MAX_S: Final = 2.0
#: A suspend ends the dialogs created up to this long after its ``time`` (clocks of the
#: service and the switch, whole seconds on the switch's side).
SUSPEND_SLACK_S: Final = 2
#: Accounts whose highest ``seq`` is remembered; past it the memory starts again (a repeat
#: is then enforced again: harmless).
MAX_ACCOUNTS: Final = 1_000_000


class _Data(BaseModel):
    # Lenient on purpose: new optional fields may be added to the contract.
    model_config = ConfigDict(extra="ignore", frozen=True)

    account_id: str = Field(pattern=ACCOUNT_ID_PATTERN)
    seq: int = Field(ge=1)
    reason: str = ""
    call_id: str | None = Field(default=None, min_length=1, max_length=256)
    terminate_at: AwareDatetime | None = None


class _Signal(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = Field(max_length=64)
    time: AwareDatetime
    data: _Data


@dataclass(frozen=True, slots=True)
class SignalIn:
    """A control signal as the bridge reads it."""

    type: str
    account_id: str
    seq: int
    time: float  # unix s
    call_id: str | None = None
    terminate_at: float | None = None


def parse_signal(raw: bytes | None) -> SignalIn | None:
    """The signal in a record, or None when it is not one (logged, skipped)."""
    if raw is None:
        return None
    try:
        s = _Signal.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
        log.warning("bridge: skipping a record that is not a control signal: %s", exc)
        return None
    d = s.data
    return SignalIn(
        s.type,
        d.account_id,
        d.seq,
        s.time.timestamp(),
        d.call_id,
        None if d.terminate_at is None else d.terminate_at.timestamp(),
    )


class SignalBridge:
    """Enforces signals on ``switch``. ``handle`` returns once the signal is enforced, or, for
    a ``call.terminate`` due later, once it is scheduled; ``done`` (given to ``handle``) is
    called when it is enforced, which is when its record may be committed."""

    def __init__(
        self,
        switch: SwitchControl,
        *,
        clock: Clock = system_clock,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._switch = switch
        self._clock = clock
        self._stop = stop or asyncio.Event()
        self._seq: dict[str, int] = {}
        # call_id -> its terminate waiting for its moment, and what to call once it is done with
        self._timers: dict[str, tuple[asyncio.Task[None], Callable[[], None]]] = {}
        self._late: dict[int, float] = {}  # token -> since when it is due and not enforced
        self._tokens = 0

    @property
    def lag_s(self) -> float:
        """How late the oldest signal not yet enforced is, in seconds (0 when none)."""
        if not self._late:
            return 0.0
        return max(0.0, self._clock() - min(self._late.values()))

    def _gauge(self) -> None:
        metrics.BRIDGE_LAG.set(self.lag_s)

    async def handle(self, s: SignalIn, done: Callable[[], None]) -> str:
        """Enforce ``s``; the outcome (``applied``, ``stale``, ``ignored``, ``scheduled``)."""
        last = self._seq.get(s.account_id, 0)
        if s.seq <= last:
            outcome = "stale"
        else:
            if len(self._seq) >= MAX_ACCOUNTS:
                self._seq.clear()
            self._seq[s.account_id] = s.seq
            outcome = await self._enforce(s, done)
        metrics.BRIDGE_SIGNALS.labels(s.type, outcome).inc()
        if outcome != "scheduled":
            done()
        return outcome

    async def _enforce(self, s: SignalIn, done: Callable[[], None]) -> str:
        if s.type == "call.terminate" and s.call_id is not None:
            at = s.terminate_at if s.terminate_at is not None else s.time
            if at > self._clock():
                self._schedule(s.call_id, at, done)
                return "scheduled"
            await self._retrying(s.time, lambda: self._end_call(s.call_id or ""))
            return "applied"
        if s.type == "account.suspend":
            await self._retrying(s.time, lambda: self._end_account(s.account_id, s.time))
            return "applied"
        if s.type in ("account.hold", "account.resume", "account.low_balance"):
            return "applied"  # nothing on the switch: authorize bars new calls
        return "ignored"

    async def _end_call(self, call_id: str) -> None:
        ended = await self._switch.end_call(call_id)
        log.info("bridge: call.terminate %s: %d dialog(s) ended", call_id, ended)

    async def _end_account(self, account_id: str, since: float) -> None:
        dialogs = await self._switch.account_calls(account_id)
        ended = 0
        for d in dialogs:
            if d.created_at and d.created_at > since + SUSPEND_SLACK_S:
                continue  # made after this suspend (a replay after a resume)
            ended += await self._switch.end_dialog(d)
            self._drop_timer(d.call_id)  # ended now: nothing left to terminate later
        log.info("bridge: account.suspend %s: %d dialog(s) ended", account_id, ended)

    def _drop_timer(self, call_id: str) -> None:
        """Cancel a scheduled terminate that is no longer needed; its record is done with."""
        pending = self._timers.pop(call_id, None)
        if pending is not None:
            pending[0].cancel()
            pending[1]()

    def _schedule(self, call_id: str, at: float, done: Callable[[], None]) -> None:
        self._drop_timer(call_id)  # the newer terminate of the call decides

        async def later() -> None:
            await self._sleep_until(at)
            await self._retrying(at, lambda: self._end_call(call_id))
            if self._timers.get(call_id, (None,))[0] is task:
                del self._timers[call_id]
            done()  # only once enforced: a cancelled one stays uncommitted

        task = asyncio.create_task(later(), name=f"terminate:{call_id}")
        self._timers[call_id] = (task, done)

    async def _sleep_until(self, at: float) -> None:
        while not self._stop.is_set():
            left = at - self._clock()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.5))  # the clock may be moved by a test
        raise asyncio.CancelledError  # stopping: the record stays uncommitted

    async def _retrying(self, due: float, work: Callable[[], Awaitable[Any]]) -> None:
        self._tokens += 1
        token = self._tokens
        self._late[token] = due
        wait = RETRY_FIRST_S
        try:
            while True:
                try:
                    await work()
                    return
                except SwitchUnavailable as exc:
                    self._gauge()
                    log.warning("bridge: the switch did not answer (%s); retrying", exc)
                    if self._stop.is_set():
                        raise asyncio.CancelledError from exc
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RETRY_MAX_S)
        finally:
            del self._late[token]
            self._gauge()

    @property
    def scheduled(self) -> int:
        """Terminates waiting for their moment."""
        return len(self._timers)

    async def close(self) -> None:
        """Cancel what is scheduled (its records stay uncommitted: enforced after a restart)."""
        tasks = [t for t, _ in self._timers.values()]
        self._timers.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
